"""DIST, VID and Tf-KD_reg: each method's weighted loss terms (what a training step
minimises) against an independent float64 NumPy translation of its reference code
(hunto/image_classification_sota `lib/models/losses/dist_kd.py` with the
`KDLoss` weights of DIST_KD's recipe; mdistiller `mdistiller/distillers/VID.py`;
yuanli2333/Teacher-free-Knowledge-Distillation `my_loss_function.py`
`loss_kd_regularization`), then one short `fit` of each through
`kdtoolkit.distiller.Distiller`."""

import math

import keras
import numpy as np
import pytest

from kdtoolkit import methods
from kdtoolkit.distiller import Distiller
from kdtoolkit.methods import dist, tfkd, vid
from tests.test_reference import np_adaptive_avg_pool

pytestmark = pytest.mark.usefixtures("exact_float32")

BATCH, CLASSES, SIDE, CHANNELS = 6, 5, 6, 2
RTOL = 1e-5


def student_model(seed=0):
    """6x6x1 -> Dense 72 ("hidden", read as a 6x6x2 map) -> Dense 8 -> 5 logits."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((SIDE, SIDE, 1)), keras.layers.Flatten(),
        keras.layers.Dense(SIDE * SIDE * CHANNELS, activation="relu", name="hidden"),
        keras.layers.Dense(8, activation="relu", name="embedding"), keras.layers.Dense(CLASSES)])


def feature_model(model):
    spatial = keras.layers.Reshape((SIDE, SIDE, CHANNELS))(model.get_layer("hidden").output)
    return keras.Model(model.inputs[0], {"logits": model.outputs[0], "spatial": spatial})


def make(cls, model, teacher_shapes=None, **options):
    features = feature_model(model)
    context = methods.Context(num_classes=CLASSES, features=features)
    method = cls.create(model, methods.make_options(cls, options), context)
    method.build_extras(teacher_shapes or {})
    return method, features


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return {"x": rng.uniform(0, 1, (BATCH, SIDE, SIDE, 1)).astype(np.float32),
            "y": np.array([0, 1, 2, 3, 4, 1], np.int32), "index": np.arange(BATCH, dtype=np.int32),
            "teacher_logits": rng.normal(0, 2, (BATCH, CLASSES)).astype(np.float32)}


def outputs(features, x):
    return {k: v.numpy().astype(np.float64) for k, v in features(x, training=True).items()}


# -- float64 translations of the references -------------------------------------------


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_cross_entropy(logits, labels):  # F.cross_entropy
    return -np.mean(np_log_softmax(logits)[np.arange(len(labels)), labels])


def np_dist(z_s, z_t, beta, gamma, tau):
    """image_classification_sota lib/models/losses/dist_kd.py DIST.forward (eps 1e-8)."""
    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + eps)

    def pearson_correlation(a, b, eps=1e-8):
        return cosine_similarity(a - a.mean(1)[:, None], b - b.mean(1)[:, None], eps)

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    y_s, y_t = np.exp(np_log_softmax(z_s / tau)), np.exp(np_log_softmax(z_t / tau))
    inter_loss = tau**2 * inter_class_relation(y_s, y_t)
    intra_loss = tau**2 * inter_class_relation(y_s.T, y_t.T)  # intra_class_relation: the transposes
    return beta * inter_loss, gamma * intra_loss


def np_vid(f_s, f_t, kernels, log_scale, eps=1e-5):
    """mdistiller distillers/VID.py vid_loss, channels last; kernels: the three 1x1 convs (c_in, c_out)."""
    s_h, t_h = f_s.shape[1], f_t.shape[1]
    if s_h > t_h:
        f_s = np_adaptive_avg_pool(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = np_adaptive_avg_pool(f_t, (s_h, s_h))
    hidden = np.maximum(f_s @ kernels[0], 0)
    hidden = np.maximum(hidden @ kernels[1], 0)
    pred_mean = hidden @ kernels[2]
    pred_var = np.log(1.0 + np.exp(log_scale)) + eps
    neg_log_prob = 0.5 * ((pred_mean - f_t) ** 2 / pred_var + np.log(pred_var))
    return np.mean(neg_log_prob)


def np_tfkd(logits, labels, correct_prob, temperature, alpha, multiplier):
    """Teacher-free-Knowledge-Distillation my_loss_function.py loss_kd_regularization:
    `nn.KLDivLoss()` of PyTorch 1.2 averages over every element. Returns its two parts."""
    k = logits.shape[1]
    teacher_soft = np.full_like(logits, (1 - correct_prob) / (k - 1))
    teacher_soft[np.arange(len(labels)), labels] = correct_prob
    target = np.exp(np_log_softmax(teacher_soft / temperature))
    elements = target * (np.log(target) - np_log_softmax(logits))
    return (1 - alpha) * np_cross_entropy(logits, labels), alpha * np.mean(elements) * multiplier


# -- DIST --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "beta": 2.0, "gamma": 0.5, "weight": 1.0},
                                     {"temperature": 2.5, "beta": 0.0, "gamma": 3.0}])
def test_dist_terms_match_the_reference(data, options):
    method, features = make(dist.DIST, student_model(), **options)
    terms, logits = method.loss_terms(data)
    out = outputs(features, data["x"])["logits"]
    settings = {"temperature": 4.0, "beta": 1.0, "gamma": 1.0, "weight": 2.0, **options}  # the CIFAR recipe
    inter, intra = np_dist(out, data["teacher_logits"].astype(np.float64), settings["beta"], settings["gamma"],
                           settings["temperature"])
    weight = settings["weight"]  # KDLoss: ori_loss * 1 + kd_loss * kd_loss_weight
    np.testing.assert_allclose(float(terms["ce"]), np_cross_entropy(out, data["y"]), rtol=RTOL)
    np.testing.assert_allclose(float(terms["inter"]), weight * inter, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(float(terms["intra"]), weight * intra, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(logits.numpy(), out, rtol=1e-5, atol=1e-6)


def test_dist_defaults_and_one_replica():
    assert dist.DIST.Options() == dist.DISTOptions(temperature=4.0, beta=1.0, gamma=1.0, weight=2.0)
    assert dist.DIST.single_replica and "batch" in dist.DIST.single_replica
    assert dist.DIST.teacher_outputs == ("logits",)


def test_dist_intra_term_of_a_single_example_is_finite_with_finite_gradients():
    import tensorflow as tf

    student = tf.Variable([[0.3, -1.0, 2.0]])
    with tf.GradientTape() as tape:
        inter, intra = dist.dist_relations(student, tf.constant([[1.0, 0.0, -1.0]]), 4.0)
        loss = inter + intra
    gradient = tape.gradient(loss, student).numpy()
    assert float(intra) == pytest.approx(1.0)  # a constant column: correlation 0 / eps = 0, as the reference
    assert np.all(np.isfinite(gradient))


# -- VID ---------------------------------------------------------------------------------------


def test_vid_variance_starts_at_the_references_init_pred_var():
    method, _ = make(vid.VID, student_model(), {"spatial": (None, 3, 3, 4)})
    expected = np.log(np.exp(5.0 - 1e-5) - 1.0)  # mdistiller init_vid_modules, INIT_PRED_VAR 5, EPS 1e-5
    np.testing.assert_allclose(method.variance.log_scale.numpy(), np.full(4, expected), rtol=1e-6)
    np.testing.assert_allclose(method.variance.value().numpy(), np.full(4, 5.0), rtol=1e-6)
    assert method.variance.log_scale.trainable
    other, _ = make(vid.VID, student_model(), {"spatial": (None, 3, 3, 4)}, init_pred_var=0.5)
    np.testing.assert_allclose(other.variance.value().numpy(), np.full(4, 0.5), rtol=1e-6)
    kernels = [layer.kernel for layer in method.regressor.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [tuple(k.shape) for k in kernels] == [(1, 1, CHANNELS, 4), (1, 1, 4, 4), (1, 1, 4, 4)]
    assert all(not layer.use_bias for layer in method.regressor.layers if isinstance(layer, keras.layers.Conv2D))
    bound = 1 / math.sqrt(4)  # PyTorch's Conv2d default init: uniform in +-1/sqrt(fan_in)
    assert np.all(np.abs(kernels[1].numpy()) <= bound) and np.abs(kernels[1].numpy()).max() > 0.6 * bound


@pytest.mark.parametrize("teacher_side", [3, 6, 8])
def test_vid_terms_match_mdistiller(data, teacher_side):
    """3: the student's 6x6 map pooled to 3x3; 6: none; 8: the teacher's pooled to 6x6 (overlapping windows)."""
    rng = np.random.default_rng(teacher_side)
    teacher = rng.normal(0, 1, (BATCH, teacher_side, teacher_side, 4)).astype(np.float32)
    method, features = make(vid.VID, student_model(), {"spatial": (None, *teacher.shape[1:])}, weight=1.5)
    log_scale = rng.normal(0, 1, 4).astype(np.float32)  # per-channel variances, as after some training
    method.variance.log_scale.assign(log_scale)
    terms, _ = method.loss_terms({**data, "teacher_spatial": teacher})
    kernels = [layer.kernel.numpy()[0, 0].astype(np.float64) for layer in method.regressor.layers
               if isinstance(layer, keras.layers.Conv2D)]
    out = outputs(features, data["x"])
    expected = np_vid(out["spatial"], teacher.astype(np.float64), kernels, log_scale.astype(np.float64))
    np.testing.assert_allclose(float(terms["vid"]), 1.5 * expected, rtol=RTOL)
    np.testing.assert_allclose(float(terms["ce"]), np_cross_entropy(out["logits"], data["y"]), rtol=RTOL)


# -- Tf-KD_reg ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"correct_prob": 0.9, "reg_temperature": 20.0, "reg_alpha": 0.1,
                                          "multiplier": 100.0},
                                     {"reg_temperature": 1.0, "reg_alpha": 0.5, "correct_prob": 0.5}])
def test_tfkd_terms_match_the_reference(data, options):
    method, features = make(tfkd.TeacherFreeKD, student_model(), **options)
    batch = {k: v for k, v in data.items() if k != "teacher_logits"}  # it reads no teacher
    terms, _ = method.loss_terms(batch)
    out = outputs(features, data["x"])["logits"]
    settings = {"correct_prob": 0.99, "reg_temperature": 40.0, "reg_alpha": 0.95, "multiplier": 1.0, **options}
    ce, reg = np_tfkd(out, data["y"], settings["correct_prob"], settings["reg_temperature"], settings["reg_alpha"],
                      settings["multiplier"])
    np.testing.assert_allclose(float(terms["ce"]), ce, rtol=RTOL)
    np.testing.assert_allclose(float(terms["reg"]), reg, rtol=RTOL)


def test_tfkd_needs_no_teacher_and_refuses_one_class():
    assert tfkd.TeacherFreeKD.teacher_outputs == () and tfkd.TeacherFreeKD.target_names() == ()
    with pytest.raises(ValueError, match="at least 2 classes"):
        tfkd.regularization_loss(np.array([0]), np.zeros((1, 1), np.float32), 0.99, 40.0)


# -- one short fit of each, through the library entry point ------------------------------------


def fit_data(n=96, classes=3, seed=0):
    """Noise with a bright band whose row (of three) is the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype("int32")
    x = 0.3 * rng.uniform(size=(n, 12, 12, 1)).astype("float32")
    for i, label in enumerate(y):
        x[i, 4 * label:4 * label + 4, 2:10] = 1.0
    return x, y


def fit_models(classes=3):
    """A CNN teacher (last map 4x4x8) and a smaller CNN student (5x5x4): VID reads both maps."""
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                                keras.layers.Conv2D(8, 3, strides=2, activation="relu"), keras.layers.Flatten(),
                                keras.layers.Dense(16, activation="relu"), keras.layers.Dense(classes)])
    student = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(12, activation="relu"),
                                keras.layers.Dense(classes)])
    return teacher, student


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dist", "vid", "tfkd"])
def test_a_short_fit_logs_finite_non_zero_terms(method):
    x, y = fit_data()
    teacher, student = fit_models()
    before = [w.numpy().copy() for w in student.weights]
    distiller = Distiller(teacher, student, method, seed=0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    assert set(distiller.method.term_names) == set(methods.get(method).term_names) and distiller.method.term_names
    for term in distiller.method.term_names:
        values = np.asarray(history[term])
        assert np.all(np.isfinite(values)) and np.all(values != 0.0), f"{method} {term}: {values}"
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(before, student.weights))
    if method == "vid":  # its extra layers trained too: the regressor and the variance
        assert not np.allclose(distiller.method.variance.value().numpy(), 5.0)
