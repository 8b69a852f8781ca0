"""Each registered method's weighted loss terms (what a training step minimises)
against an independent float64 NumPy translation of its reference code:
mdistiller (KD, DKD, FitNets, AT, RKD), RepDistiller (CRD, AT) and the RKD
authors' `metric/loss.py`. The student's outputs come from the method itself;
everything from there to the weighted terms is recomputed here."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import keras

from kdtoolkit import methods
from kdtoolkit.methods import at, crd, dkd, fitnets, kd, rkd

pytestmark = pytest.mark.usefixtures("exact_float32")

BATCH, CLASSES, SIDE = 6, 3, 6
RTOL = 1e-5


def student_model(seed=0):
    """6x6x1 -> Dense 36 ("hidden", read as a 6x6x1 map) -> Dense 8 ("embedding") -> 3 logits."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((SIDE, SIDE, 1)), keras.layers.Flatten(),
        keras.layers.Dense(SIDE * SIDE, activation="relu", name="hidden"),
        keras.layers.Dense(8, activation="relu", name="embedding"), keras.layers.Dense(CLASSES)])


def feature_model(model):
    spatial = keras.layers.Reshape((SIDE, SIDE, 1))(model.get_layer("hidden").output)
    return keras.Model(model.inputs[0], {"logits": model.outputs[0], "embedding": model.get_layer("embedding").output,
                                         "spatial": spatial, "hint": spatial})


def context(labels=None):
    return methods.Context(num_classes=CLASSES, num_examples=0 if labels is None else len(labels), labels=labels)


def make(name, model, ctx, teacher_shapes, **options):
    ctx = dataclasses.replace(ctx, features=feature_model(model))
    method = methods.get(name).create(model, methods.make_options(name, options), ctx)
    method.build_extras(teacher_shapes)
    return method


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return {"x": rng.uniform(0, 1, (BATCH, SIDE, SIDE, 1)).astype(np.float32),
            "y": np.array([0, 1, 2, 0, 1, 2], np.int32), "index": np.array([0, 5, 10, 3, 7, 11], np.int32),
            "teacher_logits": rng.normal(0, 2, (BATCH, CLASSES)).astype(np.float32),
            "teacher_embedding": rng.normal(0, 1, (BATCH, 5)).astype(np.float32),
            "features": rng.normal(0, 1, (BATCH, 4, 4, 4)).astype(np.float32)}


def student_outputs(model, x):
    return {k: v.numpy().astype(np.float64) for k, v in feature_model(model)(x, training=True).items()}


# -- float64 translations of the references --------------------------------------


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_cross_entropy(logits, labels):  # F.cross_entropy
    return -np.mean(np_log_softmax(logits)[np.arange(len(labels)), labels])


def np_kl_sum(log_q, p):  # F.kl_div(log_q, p, size_average=False): sum of p (log p - log q)
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0.0))


def np_kd(student, teacher, temperature):  # mdistiller distillers/KD.py kd_loss
    log_s = np_log_softmax(student / temperature)
    p_t = np.exp(np_log_softmax(teacher / temperature))
    return np_kl_sum(log_s, p_t) / len(student) * temperature**2


def np_dkd(student, teacher, labels, alpha, beta, temperature):  # mdistiller distillers/DKD.py dkd_loss
    gt = np.zeros_like(student)
    gt[np.arange(len(labels)), labels] = 1
    other = 1 - gt
    p_s, p_t = np.exp(np_log_softmax(student / temperature)), np.exp(np_log_softmax(teacher / temperature))
    cat = lambda p: np.stack([(p * gt).sum(1), (p * other).sum(1)], axis=1)  # noqa: E731
    tckd = np_kl_sum(np.log(cat(p_s)), cat(p_t)) * temperature**2 / len(labels)
    p_t2 = np.exp(np_log_softmax(teacher / temperature - 1000.0 * gt))
    log_s2 = np_log_softmax(student / temperature - 1000.0 * gt)
    nckd = np_kl_sum(log_s2, p_t2) * temperature**2 / len(labels)
    return alpha * tckd, beta * nckd


def np_adaptive_avg_pool(f, out):  # F.adaptive_avg_pool2d on (b, H, W, C)
    h, w = f.shape[1:3]
    result = np.zeros((f.shape[0], out[0], out[1], f.shape[3]))
    for i in range(out[0]):
        for j in range(out[1]):
            r0, r1 = (i * h) // out[0], -(-((i + 1) * h) // out[0])
            c0, c1 = (j * w) // out[1], -(-((j + 1) * w) // out[1])
            result[:, i, j] = f[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return result


def np_normalize(x, eps=1e-12):  # F.normalize(p=2, dim=1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def np_at(f):  # (b, H, W, C) -> normalised (b, H*W): f.pow(2).mean(channels)
    return np_normalize((f**2).mean(axis=3).reshape(len(f), -1))


def np_at_loss(student_features, teacher_features):  # mdistiller distillers/AT.py single_stage_at_loss
    s_h, t_h = student_features.shape[1], teacher_features.shape[1]
    if s_h > t_h:
        student_features = np_adaptive_avg_pool(student_features, teacher_features.shape[1:3])
    elif s_h < t_h:
        teacher_features = np_adaptive_avg_pool(teacher_features, student_features.shape[1:3])
    return np.mean((np_at(student_features) - np_at(teacher_features)) ** 2)


def np_conv(x, kernel, bias, stride, pad):  # nn.Conv2d, channels last, kernel (kh, kw, c_in, c_out)
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, kernel.shape[3]))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel) + bias
    return out


def np_batch_norm_relu(x, gamma, beta, eps=1e-5):  # nn.BatchNorm2d in training mode, then ReLU
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return np.maximum((x - mean) / np.sqrt(var + eps) * gamma + beta, 0.0)


def np_rkd(student, teacher, eps=1e-12):  # RKD metric/loss.py: RkdDistance, RKdAngle
    def pdist(e):
        square = (e**2).sum(1)
        d = np.sqrt(np.maximum(square[:, None] + square[None, :] - 2 * e @ e.T, eps))
        np.fill_diagonal(d, 0)
        return d

    def smooth_l1(a, b):
        x = np.abs(a - b)
        return np.mean(np.where(x < 1, 0.5 * x**2, x - 0.5))

    def angles(e):
        diff = e[None, :, :] - e[:, None, :]  # [i, j] = e_j - e_i
        norm = diff / np.maximum(np.linalg.norm(diff, axis=2, keepdims=True), eps)
        return np.einsum("ijd,ikd->ijk", norm, norm)

    t_d, s_d = pdist(teacher), pdist(student)
    distance = smooth_l1(s_d / s_d[s_d > 0].mean(), t_d / t_d[t_d > 0].mean())
    return distance, smooth_l1(angles(student), angles(teacher))


def np_nce(x, n_data):  # RepDistiller crd/criterion.py ContrastLoss: x (b, K + 1), column 0 the positive
    m, pn, eps = x.shape[1] - 1, 1.0 / n_data, 1e-7
    log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + eps))
    log_d0 = np.log(m * pn / (x[:, 1:] + m * pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / len(x)


# -- the tests --------------------------------------------------------------------------


def test_kd_terms_match_mdistiller(data):
    model = student_model()
    method = kd.Distillation(model, temperature=2.0, alpha=0.3)
    terms, _ = method.loss_terms(data)
    out = student_outputs(model, data["x"])["logits"]
    np.testing.assert_allclose(float(terms["ce"]), 0.3 * np_cross_entropy(out, data["y"]), rtol=RTOL)
    np.testing.assert_allclose(float(terms["kd"]), 0.7 * np_kd(out, data["teacher_logits"].astype(np.float64), 2.0),
                               rtol=RTOL)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
def test_label_smoothing_matches_keras_formula(data, epsilon):
    model = student_model()
    method = make("ls", model, context(), {}, epsilon=epsilon)
    terms, _ = method.loss_terms(data)
    out = student_outputs(model, data["x"])["logits"].astype(np.float64)
    target = (1 - epsilon) * np.eye(CLASSES)[data["y"]] + epsilon / CLASSES  # Keras' label_smoothing
    log_p = out - out.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(terms["ls_ce"]), np.mean(-(target * log_p).sum(-1)), rtol=RTOL)
    if epsilon == 0.0:
        np.testing.assert_allclose(float(terms["ls_ce"]), np_cross_entropy(out, data["y"]), rtol=RTOL)


@pytest.mark.parametrize("epoch, epochs, scale", [(1, 24, 0.5), (2, 24, 1.0), (1, 12, 1.0), (3, 240, 3 / 20)])
def test_dkd_terms_match_mdistiller_with_its_warm_up(data, epoch, epochs, scale):
    model = student_model()
    method = make("dkd", model, context(), {}, temperature=4.0, tckd_weight=1.5, nckd_weight=8.0)
    method.begin_epoch(epoch, epochs)
    terms, _ = method.loss_terms(data)
    out = student_outputs(model, data["x"])["logits"]
    tckd, nckd = np_dkd(out, data["teacher_logits"].astype(np.float64), data["y"], 1.5, 8.0, 4.0)
    np.testing.assert_allclose(float(terms["ce"]), np_cross_entropy(out, data["y"]), rtol=RTOL)
    np.testing.assert_allclose(float(terms["tckd"]), scale * tckd, rtol=RTOL)
    np.testing.assert_allclose(float(terms["nckd"]), scale * nckd, rtol=RTOL)


def test_dkd_warm_up_off():
    assert dkd.warmup_scale(1, 240, 0.0) == 1.0
    assert dkd.warmup_scale(1, 240, 20 / 240) == pytest.approx(1 / 20)


@pytest.mark.parametrize("teacher_side", [4, 6, 3])
def test_at_terms_match_mdistiller_pooling_the_larger_map(data, teacher_side):
    model = student_model()
    features = data["features"][:, :teacher_side, :teacher_side] if teacher_side <= 4 else \
        np.random.default_rng(1).normal(0, 1, (BATCH, teacher_side, teacher_side, 4)).astype(np.float32)
    batch = {**data, **at.AttentionTransfer.teacher_targets({"spatial": tf.constant(features)})}
    batch = {**batch, "teacher_attention": batch.pop("attention")}
    method = make("at", model, context(), {"attention": (None, teacher_side, teacher_side)})
    terms, _ = method.loss_terms(batch)
    out = student_outputs(model, data["x"])
    np.testing.assert_allclose(batch["teacher_attention"].numpy(), (features.astype(np.float64) ** 2).mean(axis=3),
                               rtol=RTOL)
    np.testing.assert_allclose(float(terms["at"]), 1000.0 * np_at_loss(out["spatial"], features.astype(np.float64)),
                               rtol=RTOL)
    np.testing.assert_allclose(float(terms["ce"]), np_cross_entropy(out["logits"], data["y"]), rtol=RTOL)


@pytest.mark.parametrize("teacher_side, stride, pad", [(3, 2, 1), (4, 1, 0), (1, 1, 0)])
def test_fitnets_terms_match_mdistiller_conv_regressor(data, teacher_side, stride, pad):
    model = student_model()
    hint = np.random.default_rng(2).normal(0, 1, (BATCH, teacher_side, teacher_side, 4)).astype(np.float32)
    method = make("fitnets", model, context(), {"hint": (None, *hint.shape[1:])})
    terms, _ = method.loss_terms({**data, "teacher_hint": hint})
    conv, batch_norm = method.regressor.layers[-3], method.regressor.layers[-2]
    kernel, bias = (w.numpy().astype(np.float64) for w in conv.weights)
    assert kernel.shape[:2] == ((3, 3) if stride == 2 else (1 + SIDE - teacher_side,) * 2)
    out = student_outputs(model, data["x"])
    regressed = np_batch_norm_relu(np_conv(out["hint"], kernel, bias, stride, pad),
                                   batch_norm.gamma.numpy(), batch_norm.beta.numpy())
    np.testing.assert_allclose(float(terms["hint"]), 100.0 * np.mean((regressed - hint) ** 2), rtol=RTOL)


def test_fitnets_regressor_forms():
    assert isinstance(fitnets.regressor_layers((4, 4, 2), (8, 8, 3))[0], keras.layers.Conv2DTranspose)
    assert isinstance(fitnets.regressor_layers((16,), (5,))[0], keras.layers.Dense)
    with pytest.raises(ValueError, match="smaller than the teacher's"):
        fitnets.regressor_layers((4, 4, 2), (6, 6, 3))


def clustered(rng, n, d, offset=5.0, spread=0.05):
    """ReLU-like embeddings: a tight cluster far from the origin."""
    return np.abs(offset + spread * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_rkd_terms_match_the_reference(kind):
    rng = np.random.default_rng(3)
    if kind == "random":
        teacher, student = rng.normal(size=(16, 5)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    else:
        teacher, student = clustered(rng, 32, 64), clustered(rng, 32, 48, offset=3.0)
    distance, angle = rkd.rkd_losses(tf.constant(teacher), tf.constant(student))
    ref_distance, ref_angle = np_rkd(student.astype(np.float64), teacher.astype(np.float64))
    np.testing.assert_allclose(float(distance), ref_distance, rtol=RTOL)
    np.testing.assert_allclose(float(angle), ref_angle, rtol=RTOL)


def test_rkd_method_weights_its_terms(data):
    model = student_model()
    method = make("rkd", model, context(), {"embedding": (None, 5)})
    terms, _ = method.loss_terms(data)
    out = student_outputs(model, data["x"])["embedding"]
    ref_distance, ref_angle = np_rkd(out, data["teacher_embedding"].astype(np.float64))
    np.testing.assert_allclose(float(terms["distance"]), 25.0 * ref_distance, rtol=RTOL)
    np.testing.assert_allclose(float(terms["angle"]), 50.0 * ref_angle, rtol=RTOL)


def test_crd_terms_match_repdistiller(data):
    """K = every other-class example (N - n_c): the negatives are a fixed set, so the
    loss is deterministic and the reference's sum can be taken over them."""
    labels = np.arange(12) % 3
    model = student_model()
    method = make("crd", model, context(labels), {"embedding": (None, 5)}, negatives=8, dim=4)
    memory = method.memory
    m_s, m_t = memory.student_memory.numpy().astype(np.float64), memory.teacher_memory.numpy().astype(np.float64)
    assert not np.allclose(m_s, m_t)  # two independent draws
    heads = [[w.numpy().astype(np.float64) for w in head.weights] for head in (memory.student_head, memory.teacher_head)]
    terms, _ = method.loss_terms(data)
    out = student_outputs(model, data["x"])["embedding"]
    v_s = np_normalize(out @ heads[0][0] + heads[0][1])
    v_t = np_normalize(data["teacher_embedding"].astype(np.float64) @ heads[1][0] + heads[1][1])

    def side(v, bank):
        rows = [np.concatenate([[i], np.flatnonzero(labels != labels[i])]) for i in data["index"]]
        out = np.exp(np.stack([bank[r] @ v[b] for b, r in enumerate(rows)]) / 0.07)
        return np_nce(out / (out.mean() * len(labels)), len(labels))

    expected = 0.8 * (side(v_s, m_t) + side(v_t, m_s))
    np.testing.assert_allclose(float(terms["crd"]), expected, rtol=RTOL)


@pytest.mark.parametrize("negatives", [40, 150])
def test_crd_negatives_are_other_classes_never_the_anchor(negatives):
    rng = np.random.default_rng(4)
    labels = rng.choice(4, size=200, p=[0.1, 0.2, 0.3, 0.4])
    memory = crd.ContrastMemory(labels=labels, dim=4, temperature=0.07, negatives=negatives)
    index = tf.constant(np.arange(0, 200, 3), tf.int32)
    drawn = memory.negative_indices(index).numpy()
    counts = np.bincount(labels, minlength=4)
    assert drawn.shape == (len(index), negatives)
    for anchor, row in zip(index.numpy(), drawn):
        assert anchor not in row
        assert not np.any(labels[row] == labels[anchor])
        if negatives <= len(labels) - counts[labels[anchor]]:
            assert len(np.unique(row)) == negatives  # without replacement, as the reference
    assert memory.replace.any() == (negatives == 150)


@pytest.mark.slow
def test_crd_negatives_are_uniform_over_the_other_classes():
    labels = np.array([0] * 10 + [1] * 20 + [2] * 30)
    memory = crd.ContrastMemory(labels=labels, dim=4, temperature=0.07, negatives=12)
    assert memory.pool_size == 42  # a pool drawn per step, shared by the batch's anchors
    index = tf.constant([0], tf.int32)  # an anchor of class 0: 50 candidates
    draws = 400
    hits = np.bincount(np.concatenate([memory.negative_indices(index).numpy().ravel() for _ in range(draws)]),
                       minlength=60)
    assert hits[:10].sum() == 0
    expected = draws * 12 / 50
    assert np.all(np.abs(hits[10:] - expected) < 6 * np.sqrt(expected))


def test_crd_pool_is_drawn_when_the_set_is_large():
    labels = np.arange(5000) % 10
    memory = crd.ContrastMemory(labels=labels, dim=4, temperature=0.07, negatives=100)
    assert memory.pool_size == 100 + 500
    drawn = memory.negative_indices(tf.constant(np.arange(32), tf.int32)).numpy()
    for anchor, row in zip(range(32), drawn):
        assert len(np.unique(row)) == 100 and not np.any(labels[row] == labels[anchor])


@pytest.mark.parametrize("teacher_side, student_side", [(8, 4), (4, 6), (5, 5)])
def test_at_feature_map_loss_pools_the_larger_map_either_way(teacher_side, student_side):
    rng = np.random.default_rng(5)
    teacher = rng.normal(size=(3, teacher_side, teacher_side, 4)).astype(np.float32)
    student = rng.normal(size=(3, student_side, student_side, 2)).astype(np.float32)
    value = float(at.feature_map_loss(tf.constant(teacher), tf.constant(student)))
    np.testing.assert_allclose(value, np_at_loss(student.astype(np.float64), teacher.astype(np.float64)), rtol=RTOL)
