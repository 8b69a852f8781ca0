"""PKT, SP and NST (mdistiller's `PKT.py`, `SP.py`, `NST.py`): each method's weighted
loss terms (what a training step minimises) against an independent float64 NumPy
translation of the reference code, on small random inputs and at several batch
sizes; then a short `kdtoolkit.distiller.Distiller` fit on tiny CNNs."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import methods
from kdtoolkit.methods import nst, pkt, sp

pytestmark = pytest.mark.usefixtures("exact_float32")

BATCH, CLASSES, SIDE, CHANNELS = 6, 3, 6, 3
RTOL = 1e-5
CLASSES_OF = {"pkt": pkt.PKT, "sp": sp.SimilarityPreserving, "nst": nst.NeuronSelectivityTransfer}
WEIGHTS = {"pkt": 30000.0, "sp": 3000.0, "nst": 50.0}  # mdistiller/engine/cfg.py: *.LOSS.FEAT_WEIGHT


# -- float64 translations of mdistiller's code (NCHW there, NHWC maps here) ------------------


def np_pkt(f_s, f_t, eps=1e-7):  # mdistiller distillers/PKT.py pkt_loss
    def probabilities(f):
        f = f / (np.sqrt((f**2).sum(axis=1, keepdims=True)) + eps)
        f[f != f] = 0
        similarity = (f @ f.T + 1.0) / 2.0
        return similarity / similarity.sum(axis=1, keepdims=True)

    s, t = probabilities(f_s.copy()), probabilities(f_t.copy())
    return np.mean(t * np.log((t + eps) / (s + eps)))


def np_normalize_rows(x, eps=1e-12):  # F.normalize(x) (p=2, dim=1)
    return x / np.maximum(np.sqrt((x**2).sum(axis=1, keepdims=True)), eps)


def np_sp(f_s, f_t):  # mdistiller distillers/SP.py similarity_loss
    bsz = f_s.shape[0]
    f_s, f_t = f_s.reshape(bsz, -1), f_t.reshape(bsz, -1)
    g_s, g_t = np_normalize_rows(f_s @ f_s.T), np_normalize_rows(f_t @ f_t.T)
    return ((g_t - g_s) ** 2).sum() / (bsz * bsz)


def np_adaptive_pool_nchw(f, out):  # F.adaptive_avg_pool2d(f, (out, out)), f (b, c, H, W)
    h, w = f.shape[2:]
    pooled = np.zeros((*f.shape[:2], out, out))
    for i in range(out):
        for j in range(out):
            rows = slice((i * h) // out, -(-((i + 1) * h) // out))
            cols = slice((j * w) // out, -(-((j + 1) * w) // out))
            pooled[:, :, i, j] = f[:, :, rows, cols].mean(axis=(2, 3))
    return pooled


def np_poly_kernel(a, b):  # mdistiller poly_kernel: [n, i, j] = (b_i . a_j)^2
    return ((a[:, None, :, :] * b[:, :, None, :]).sum(-1)) ** 2


def np_nst_means(f_s, f_t):  # mdistiller distillers/NST.py single_stage_nst_loss (its three means); NHWC inputs
    f_s, f_t = f_s.transpose(0, 3, 1, 2), f_t.transpose(0, 3, 1, 2)
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = np_adaptive_pool_nchw(f_s, t_h)
    elif s_h < t_h:
        f_t = np_adaptive_pool_nchw(f_t, s_h)
    f_s = f_s.reshape(*f_s.shape[:2], -1)
    f_s = f_s / np.maximum(np.linalg.norm(f_s, axis=2, keepdims=True), 1e-12)  # F.normalize(dim=2)
    f_t = f_t.reshape(*f_t.shape[:2], -1)
    f_t = f_t / np.maximum(np.linalg.norm(f_t, axis=2, keepdims=True), 1e-12)
    return np_poly_kernel(f_t, f_t).mean(), np_poly_kernel(f_s, f_s).mean(), np_poly_kernel(f_s, f_t).mean()


def np_nst(f_s, f_t):
    teacher_teacher, student_student, student_teacher = np_nst_means(f_s, f_t)
    return teacher_teacher + student_student - 2 * student_teacher


def np_cross_entropy(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.mean(log_p[np.arange(len(labels)), labels])


# -- a student with a real multi-channel map --------------------------------------------------


def student_model(seed=0):
    """6x6x1 -> conv 3 channels ("conv", the spatial map) -> Dense 8 ReLU ("embedding") -> 3 logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIDE, SIDE, 1))
    conv = keras.layers.Conv2D(CHANNELS, 3, padding="same", activation="relu", name="conv")(inputs)
    embedding = keras.layers.Dense(8, activation="relu", name="embedding")(keras.layers.Flatten()(conv))
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(embedding))


def feature_model(model):
    return keras.Model(model.inputs[0], {"logits": model.outputs[0], "embedding": model.get_layer("embedding").output,
                                         "spatial": model.get_layer("conv").output})


def make(name, model, **options):
    cls = CLASSES_OF[name]
    context = methods.Context(num_classes=CLASSES, features=feature_model(model))
    method = cls(model, cls.Options(**options), context)
    method.build_extras({})
    return method


def batch_of(n, teacher_side=4, teacher_channels=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(0, 1, (n, SIDE, SIDE, 1)).astype(np.float32),
            "y": (np.arange(n) % CLASSES).astype(np.int32), "index": np.arange(n, dtype=np.int32),
            "teacher_embedding": np.abs(rng.normal(0, 1, (n, 5))).astype(np.float32),
            "teacher_spatial": np.maximum(rng.normal(0, 1, (n, teacher_side, teacher_side, teacher_channels)),
                                          0).astype(np.float32)}


def student_outputs(model, x):
    return {k: v.numpy().astype(np.float64) for k, v in feature_model(model)(x, training=True).items()}


def reference(name, out, batch):
    if name == "pkt":
        return np_pkt(out["embedding"], batch["teacher_embedding"].astype(np.float64))
    if name == "sp":
        return np_sp(out["spatial"], batch["teacher_spatial"].astype(np.float64))
    return np_nst(out["spatial"], batch["teacher_spatial"].astype(np.float64))


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pkt", "sp", "nst"])
@pytest.mark.parametrize("n", [BATCH, 2, 9])
def test_weighted_terms_match_mdistiller_at_its_defaults(name, n):
    """The default weights are the reference's cfg; the batch sizes show PKT's and SP's
    1/B² (a mean over all pairs) is the reference's."""
    model = student_model()
    batch = batch_of(n)
    terms, logits = make(name, model).loss_terms(batch)
    out = student_outputs(model, batch["x"])
    assert set(terms) == {"ce", name}
    np.testing.assert_allclose(float(terms[name]), WEIGHTS[name] * reference(name, out, batch), rtol=RTOL)
    np.testing.assert_allclose(float(terms["ce"]), np_cross_entropy(out["logits"], batch["y"]), rtol=RTOL)
    np.testing.assert_allclose(logits.numpy(), out["logits"], rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("name", ["pkt", "sp", "nst"])
def test_the_weight_option_scales_only_its_term(name):
    model = student_model()
    batch = batch_of(BATCH, seed=1)
    terms, _ = make(name, model, weight=2.5).loss_terms(batch)
    out = student_outputs(model, batch["x"])
    np.testing.assert_allclose(float(terms[name]), 2.5 * reference(name, out, batch), rtol=RTOL)


@pytest.mark.parametrize("teacher_side", [8, 6, 4, 3])
def test_nst_pools_the_larger_map_either_way(teacher_side):
    """Teacher map larger (8: the teacher's is pooled), equal, or smaller (the student's is)."""
    model = student_model()
    batch = batch_of(BATCH, teacher_side=teacher_side, teacher_channels=7, seed=2)
    terms, _ = make("nst", model).loss_terms(batch)
    out = student_outputs(model, batch["x"])
    np.testing.assert_allclose(float(terms["nst"]), 50.0 * np_nst(out["spatial"], batch["teacher_spatial"]
                                                                  .astype(np.float64)), rtol=RTOL)


@pytest.mark.parametrize("name", ["pkt", "sp", "nst"])
@pytest.mark.parametrize("closeness", [1e-3, 1e-4])
def test_a_student_close_to_its_teacher_keeps_every_digit(name, closeness):
    """The teacher's outputs within `closeness` (relative) of the student's, as after some
    training: each loss is a small remainder (NST's ~1e-6 of each kernel mean), where
    float32 kept 3 to 4 digits or none; the methods compute in float64."""
    rng = np.random.default_rng(3)
    student = np.abs(rng.normal(1.0, 1.0, (6, 5, 5, 4) if name != "pkt" else (6, 12))).astype(np.float32)
    teacher = (student * (1 + closeness * rng.normal(size=student.shape))).astype(np.float32)
    f_s, f_t = student.astype(np.float64), teacher.astype(np.float64)
    expected = {"pkt": np_pkt, "sp": np_sp, "nst": np_nst}[name](f_s, f_t)
    if name == "nst":
        assert 0 < expected < 1e-5 * np_nst_means(f_s, f_t)[0]
    loss = {"pkt": pkt.pkt_loss, "sp": sp.sp_loss, "nst": nst.nst_loss}[name]
    np.testing.assert_allclose(float(loss(tf.constant(teacher), tf.constant(student))), expected, rtol=RTOL)


@pytest.mark.parametrize("kind", ["random", "relu", "clustered"])
def test_pkt_and_sp_functions_match_on_other_inputs(kind):
    rng = np.random.default_rng(4)
    if kind == "random":
        f_s, f_t = rng.normal(size=(12, 7)), rng.normal(size=(12, 4, 4, 3))
    elif kind == "relu":
        f_s, f_t = np.maximum(rng.normal(size=(12, 7)), 0), np.maximum(rng.normal(size=(12, 4, 4, 3)), 0)
    else:  # a tight cluster far from the origin: cosines near 1
        f_s, f_t = 5 + 0.05 * rng.normal(size=(12, 7)), 3 + 0.05 * rng.normal(size=(12, 4, 4, 3))
    f_s, f_t = f_s.astype(np.float32), f_t.astype(np.float32)
    np.testing.assert_allclose(float(pkt.pkt_loss(tf.constant(f_t.reshape(12, -1)), tf.constant(f_s))),
                               np_pkt(f_s.astype(np.float64), f_t.reshape(12, -1).astype(np.float64)),
                               rtol=RTOL)
    sp_student = f_s.reshape(12, 7, 1, 1)
    np.testing.assert_allclose(float(sp.sp_loss(tf.constant(f_t), tf.constant(sp_student))),
                               np_sp(sp_student.astype(np.float64), f_t.astype(np.float64)), rtol=RTOL)


def test_pkt_all_zero_embedding_has_the_references_value_and_a_finite_gradient():
    """A ReLU embedding with every unit off: the reference's value, and a finite gradient
    (PyTorch's sqrt at 0 makes the reference's NaN)."""
    rng = np.random.default_rng(5)
    student = np.maximum(rng.normal(size=(5, 6)), 0).astype(np.float32)
    student[2] = 0.0
    teacher = rng.normal(size=(5, 4)).astype(np.float32)
    variable = tf.Variable(student)
    with tf.GradientTape() as tape:
        loss = pkt.pkt_loss(tf.constant(teacher), variable)
    gradient = tape.gradient(loss, variable).numpy()
    np.testing.assert_allclose(float(loss), np_pkt(student.astype(np.float64), teacher.astype(np.float64)), rtol=RTOL)
    assert np.all(np.isfinite(gradient)) and np.all(np.any(gradient != 0, axis=1))


@pytest.mark.parametrize("name", ["pkt", "sp", "nst"])
def test_batch_size_one_and_an_unknown_batch_dimension(name):
    """One compiled loss serves every batch size (the last, smaller batch of an epoch). At
    B = 1, PKT and SP have nothing to relate (their loss is 0, as the reference's)."""
    model = student_model()
    method = make(name, model)
    step = tf.function(lambda batch: method.loss_terms(batch)[0][name], reduce_retracing=True)
    for n in (1, 5, 3):
        batch = batch_of(n, seed=n)
        value = float(step({k: tf.constant(v) for k, v in batch.items()}))
        expected = WEIGHTS[name] * reference(name, student_outputs(model, batch["x"]), batch)
        if n == 1 and name in ("pkt", "sp"):
            assert abs(value) < 1e-9 and abs(expected) < 1e-12
        else:
            np.testing.assert_allclose(value, expected, rtol=RTOL)


@pytest.mark.parametrize("name", ["pkt", "sp", "nst"])
def test_which_methods_relate_the_examples_of_a_batch(name):
    """PKT and SP relate every pair of a batch: their loss on a batch is not the mean of its
    halves', so they refuse to be split across replicas. NST is per example: it splits."""
    rng = np.random.default_rng(6)
    teacher, student = rng.normal(size=(8, 3, 3, 4)), rng.normal(size=(8, 3, 3, 2))
    if name == "pkt":
        teacher, student = teacher.reshape(8, -1), student.reshape(8, -1)
    loss = {"pkt": pkt.pkt_loss, "sp": sp.sp_loss, "nst": nst.nst_loss}[name]
    whole = float(loss(tf.constant(teacher, tf.float32), tf.constant(student, tf.float32)))
    halves = np.mean([float(loss(tf.constant(teacher[h], tf.float32), tf.constant(student[h], tf.float32)))
                      for h in (slice(0, 4), slice(4, 8))])
    if name == "nst":
        assert not CLASSES_OF[name].single_replica
        np.testing.assert_allclose(whole, halves, rtol=RTOL)
    else:
        assert "pair" in CLASSES_OF[name].single_replica and "\n" not in CLASSES_OF[name].single_replica
        assert abs(whole - halves) > 1e-3 * abs(whole)


@pytest.mark.parametrize("name", ["pkt", "sp", "nst"])
def test_label_free_term_is_the_weighted_reference(name):
    rng = np.random.default_rng(7)
    shapes = {"pkt": ((6, 5), (6, 9)), "sp": ((6, 3, 3, 4), (6, 5, 5, 2)), "nst": ((6, 3, 3, 4), (6, 5, 5, 2))}[name]
    teacher, student = (np.abs(rng.normal(size=s)).astype(np.float32) for s in shapes)
    term = vars(CLASSES_OF[name])["label_free_term"]
    assert term.options == ("weight",)
    options = CLASSES_OF[name].Options(weight=4.0)
    value = float(term.function(options, tf.constant(teacher), tf.constant(student)))
    out = {"embedding": student, "spatial": student}
    batch = {"teacher_embedding": teacher, "teacher_spatial": teacher}
    np.testing.assert_allclose(value, 4.0 * reference(name, {k: v.astype(np.float64) for k, v in out.items()}, batch),
                               rtol=RTOL)


def test_options_are_checked_and_read_the_right_outputs():
    for name, cls in CLASSES_OF.items():
        assert cls.name == name and cls.term_names == ("ce", name)
        assert dataclasses.asdict(cls.Options()) == {"weight": WEIGHTS[name]}
        assert cls.teacher_outputs == (("embedding",) if name == "pkt" else ("spatial",))
        with pytest.raises(ValueError, match=f"--{name}-weight must be a number >= 0"):
            methods.check_options(cls.Options(weight=-1.0), name)


def test_registered_under_their_names_with_their_flags():
    for name, cls in CLASSES_OF.items():
        assert methods.get(name) is cls and cls.__module__ == f"kdtoolkit.methods.{name}"
        assert methods.make_options(name, {"weight": 7}).weight == 7.0
        assert (name, "weight", f"--{name}-weight", WEIGHTS[name]) in [f[:4] for f in methods.option_flags()]


def tiny_data(n=64, seed=0):
    """12x12 noise with a bright square in the top (class 0) or bottom (class 1) half."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype("int32")
    x = 0.3 * rng.uniform(size=(n, 12, 12, 1)).astype("float32")
    for i, label in enumerate(y):
        row, col = 1 + 6 * label, rng.integers(0, 8)
        x[i, row:row + 4, col:col + 4] = 1.0
    return x, y


def tiny_cnn(filters, width, name, seed, downsample):
    """Conv 3x3 (10x10 map), with `downsample` a stride-2 conv after it (4x4), then Dense `width`, 2 logits."""
    keras.utils.set_random_seed(seed)
    convs = [keras.layers.Conv2D(filters, 3, activation="relu")]
    if downsample:
        convs.append(keras.layers.Conv2D(filters, 3, strides=2, activation="relu"))
    return keras.Sequential([keras.Input((12, 12, 1)), *convs, keras.layers.Flatten(),
                             keras.layers.Dense(width, activation="relu"), keras.layers.Dense(2)], name=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pkt", "sp", "nst"])
def test_distiller_fit_logs_finite_non_zero_terms(name):
    from kdtoolkit.distiller import Distiller

    x, y = tiny_data()
    # The teacher's 4x4x6 map, the student's 10x10x3 (NST pools it to 4x4).
    teacher, student = tiny_cnn(6, 16, "teacher", 0, True), tiny_cnn(3, 8, "student", 1, False)
    before = [w.numpy().copy() for w in student.weights]
    distiller = Distiller(teacher, student, name, seed=0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    read = "embedding" if name == "pkt" else "spatial"
    assert set(distiller.teacher_reads) == {"logits", read} and read in distiller.student_reads
    if read == "spatial":
        assert "(batch, 4, 4, 6)" in distiller.teacher_reads[read]
        assert "(batch, 10, 10, 3)" in distiller.student_reads[read]
    for term in ("ce", name):
        values = np.array(history[term])
        assert np.all(np.isfinite(values)) and np.all(values != 0.0), (term, values)
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(before, student.weights))
