"""Logit standardization (Sun et al., CVPR 2024), the `standardize` option of kd,
dkd and dist: the weighted terms against a float64 NumPy translation of the
reference code (sunshangquan/logit-standardization-KD, `mdistiller/distillers/KD.py`
`normalize` / `kd_loss`, `mdistiller/distillers/DKD.py` `dkd_loss`, with the
weights and base temperature its `tools/train.py --logit-stand` sets: KD weight 9,
DKD's alpha and beta × 9, T = 2 given as the temperature); the option off leaves every term, run name and
identity as it was; the invariances the paper states; one short fit."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import losses, methods
from kdtoolkit.distiller import Distiller
from kdtoolkit.methods import dist, dkd
from kdtoolkit.runner.run_spec import method_stem
from kdtoolkit.speed import step_sharing

pytestmark = pytest.mark.usefixtures("exact_float32")

BATCH, CLASSES = 6, 7
RTOL = 1e-5


# -- float64 translation of the reference (torch -> NumPy) ------------------------------

def ref_normalize(logit):
    """`normalize`: (logit - mean) / (1e-7 + std), torch's std being the n - 1 one."""
    mean = logit.mean(axis=-1, keepdims=True)
    stdv = logit.std(axis=-1, ddof=1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def kl_div_sum(log_input, target):
    """torch `F.kl_div(input, target, reduction="sum")`: sum of target (log target - input), 0 where target is 0."""
    safe = np.where(target > 0, target, 1.0)
    return np.sum(np.where(target > 0, target * (np.log(safe) - log_input), 0.0))


def ref_kd_loss(logits_student_in, logits_teacher_in, temperature, logit_stand):
    logits_student = ref_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = ref_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = log_softmax(logits_student / temperature)
    pred_teacher = softmax(logits_teacher / temperature)
    return kl_div_sum(log_pred_student, pred_teacher) / len(logits_student) * temperature**2


def ref_cross_entropy(logits, target):
    return -np.mean(log_softmax(logits)[np.arange(len(target)), target])


def ref_kd(logits_student, logits_teacher, target, ce_weight, kd_weight, temperature, logit_stand):
    """`KD.forward_train`'s losses: (loss_ce, loss_kd)."""
    return (ce_weight * ref_cross_entropy(logits_student, target),
            kd_weight * ref_kd_loss(logits_student, logits_teacher, temperature, logit_stand))


def ref_dkd(logits_student_in, logits_teacher_in, target, alpha, beta, temperature, logit_stand):
    """`dkd_loss`, its two summands returned apart: (alpha * tckd_loss, beta * nckd_loss)."""
    logits_student = ref_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = ref_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    gt_mask = np.eye(logits_student.shape[1])[target]
    other_mask = 1.0 - gt_mask

    def cat_mask(t):
        return np.stack([(t * gt_mask).sum(axis=1), (t * other_mask).sum(axis=1)], axis=1)

    pred_student = cat_mask(softmax(logits_student / temperature))
    pred_teacher = cat_mask(softmax(logits_teacher / temperature))
    tckd_loss = kl_div_sum(np.log(pred_student), pred_teacher) * temperature**2 / target.shape[0]
    pred_teacher_part2 = softmax(logits_teacher / temperature - 1000.0 * gt_mask)
    log_pred_student_part2 = log_softmax(logits_student / temperature - 1000.0 * gt_mask)
    nckd_loss = kl_div_sum(log_pred_student_part2, pred_teacher_part2) * temperature**2 / target.shape[0]
    return alpha * tckd_loss, beta * nckd_loss


# -- the methods on given logits -----------------------------------------------------

@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return {"student": rng.normal(0, 3, (BATCH, CLASSES)), "teacher": rng.normal(1, 5, (BATCH, CLASSES)),
            "y": np.array([0, 1, 2, 3, 4, 6], np.int32)}


def method(name, options=None, **values):
    """Registered `name` on an identity student (the batch's `x` are its logits), its
    options made as the runner and `Distiller` make them (`make_options`)."""
    identity = keras.layers.Lambda(lambda x: x)
    cls = methods.get(name)
    made = options if options is not None else methods.make_options(cls, values)
    return cls.create(identity, made, methods.Context(num_classes=CLASSES))


def terms(m, student, teacher, y):
    batch = {"x": tf.constant(student, tf.float32), "y": tf.constant(y),
             "teacher_logits": tf.constant(teacher, tf.float32)}
    found, _ = m.loss_terms(batch)
    return {k: float(v) for k, v in found.items()}


def float32(x):
    return np.asarray(x, np.float32).astype(np.float64)  # what the method sees


def test_standardized_logits_have_zero_mean_and_unit_sample_std(logits):
    z = losses.standardize_logits(tf.constant(logits["student"], tf.float32)).numpy().astype(np.float64)
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(axis=1, ddof=1), 1.0, rtol=1e-5)  # torch's std: n - 1
    np.testing.assert_allclose(z, ref_normalize(float32(logits["student"])), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_standardized_kd_terms_match_the_reference(logits, alpha):
    """--logit-stand --base-temp 2 --kd-weight 9: loss_ce = CE_WEIGHT CE (here alpha), loss_kd = 9 T^2 KL."""
    m = method("kd", standardize=True, alpha=alpha, temperature=2.0)  # the reference's --base-temp 2
    found = terms(m, logits["student"], logits["teacher"], logits["y"])
    ce, kd = ref_kd(float32(logits["student"]), float32(logits["teacher"]), logits["y"], ce_weight=alpha,
                    kd_weight=9.0, temperature=2.0, logit_stand=True)
    assert found["ce"] == pytest.approx(ce, rel=RTOL)
    assert found["kd"] == pytest.approx(kd, rel=RTOL)
    plain = ref_kd_loss(float32(logits["student"]), float32(logits["teacher"]), 2.0, False)
    assert found["kd"] != pytest.approx(9.0 * plain, rel=1e-2)  # standardization changed the term


@pytest.mark.parametrize("temperature", [2.0, 3.0])
@pytest.mark.parametrize("weights", [(1.0, 8.0), (2.0, 0.5)])
def test_standardized_dkd_terms_match_the_reference(logits, temperature, weights):
    """dkd_loss with logit_stand; ALPHA and BETA × 9, T = the base temperature (the reference's: 2)."""
    tckd_weight, nckd_weight = weights
    m = method("dkd", standardize=True, tckd_weight=tckd_weight, nckd_weight=nckd_weight, temperature=temperature)
    t = temperature
    assert m.options.temperature == t
    found = terms(m, logits["student"], logits["teacher"], logits["y"])
    ce = ref_cross_entropy(float32(logits["student"]), logits["y"])
    tckd, nckd = ref_dkd(float32(logits["student"]), float32(logits["teacher"]), logits["y"],
                         9.0 * tckd_weight, 9.0 * nckd_weight, t, logit_stand=True)
    assert found["ce"] == pytest.approx(ce, rel=RTOL)
    assert found["tckd"] == pytest.approx(tckd, rel=RTOL)
    assert found["nckd"] == pytest.approx(nckd, rel=RTOL)


def test_dkd_translation_matches_the_method_without_standardization(logits):
    """The NumPy translation itself, checked on the existing (unstandardized) DKD: it can tell."""
    found = terms(method("dkd"), logits["student"], logits["teacher"], logits["y"])
    tckd, nckd = ref_dkd(float32(logits["student"]), float32(logits["teacher"]), logits["y"], 1.0, 8.0, 4.0, False)
    assert (found["tckd"], found["nckd"]) == (pytest.approx(tckd, rel=RTOL), pytest.approx(nckd, rel=RTOL))


def test_standardized_dist_is_dist_on_standardized_logits_at_the_base_temperature(logits):
    m = method("dist", standardize=True, temperature=2.0)
    assert m.options.weight == 2.0
    found = terms(m, logits["student"], logits["teacher"], logits["y"])
    inter, intra = dist.dist_relations(tf.constant(ref_normalize(float32(logits["student"])), tf.float32),
                                       tf.constant(ref_normalize(float32(logits["teacher"])), tf.float32), 2.0)
    assert found["inter"] == pytest.approx(2.0 * 4.0 * float(inter), rel=RTOL)
    assert found["intra"] == pytest.approx(2.0 * 4.0 * float(intra), rel=RTOL)


# -- off: the methods as they were ---------------------------------------------------

def test_off_by_default_and_the_terms_are_exactly_the_existing_ones(logits):
    s, t, y = (tf.constant(logits["student"], tf.float32), tf.constant(logits["teacher"], tf.float32),
               tf.constant(logits["y"]))
    for name in ("kd", "dkd", "dist", "sftn"):
        assert methods.get(name).Options().standardize is False
    kd = terms(method("kd"), logits["student"], logits["teacher"], logits["y"])
    assert kd == terms(method("kd", standardize=False), logits["student"], logits["teacher"], logits["y"])
    alpha = tf.constant(0.5, tf.float32)
    assert kd["ce"] == float(alpha * losses.teacher_loss(y, s))
    assert kd["kd"] == float((1.0 - alpha) * losses.distillation_loss(t, s, 4.0))

    got = terms(method("dkd"), logits["student"], logits["teacher"], logits["y"])
    tckd, nckd = dkd.dkd_parts(y, s, t, 4.0)
    assert got == {"ce": float(losses.teacher_loss(y, s)), "tckd": float(1.0 * (16.0 * tf.constant(1.0)) * tckd),
                   "nckd": float(8.0 * (16.0 * tf.constant(1.0)) * nckd)}

    got = terms(method("dist"), logits["student"], logits["teacher"], logits["y"])
    inter, intra = dist.dist_relations(s, t, 4.0)
    assert got == {"ce": float(losses.teacher_loss(y, s)), "inter": float(2.0 * 16.0 * 1.0 * inter),
                   "intra": float(2.0 * 16.0 * 1.0 * intra)}


def test_off_run_names_and_identities_are_unchanged(synthetic_mnist, tmp_path):
    from task1_mnist import run as cli
    from task1_mnist.experiments import Task1

    task = Task1(cli.parse_config(["--out", str(tmp_path)]), arrays=synthetic_mnist)
    settings = task.method_settings(methods.Distillation)
    assert settings == {"temperature": 4.0, "alpha": 0.5}  # no `standardize` key: names and hashes as before
    assert method_stem("kd", ["kd"], settings) == "kd-T4-a0.5"
    assert task.method_settings(dkd.DKD) == {"temperature": 4.0, "tckd_weight": 1.0, "nckd_weight": 8.0,
                                             "warmup": 20 / 240}
    assert task.method_settings(dist.DIST) == {"temperature": 4.0, "beta": 1.0, "gamma": 1.0, "weight": 2.0}
    spec = task.spec(method_stem("kd", ["kd"], settings), "kd", **settings)
    assert spec.name == "kd-T4-a0.5-s0" and "standardize" not in spec.identity
    assert list(spec.identity)[-2:] == ["temperature", "alpha"]  # the identity's method part, as before


def test_the_flag_turns_it_on_at_the_tasks_temperature_and_names_the_run(synthetic_mnist, tmp_path):
    from task1_mnist import run as cli
    from task1_mnist.experiments import Task1

    config = cli.parse_config(["--out", str(tmp_path), "--kd-standardize", "--dkd-standardize", "--temperature", "3"])
    assert config.method_options == {"kd": {"standardize": True}, "dkd": {"standardize": True}}
    task = Task1(config, arrays=synthetic_mnist)
    settings = task.method_settings(methods.Distillation)
    assert settings == {"temperature": 3.0, "alpha": 0.5, "standardize": True}  # --temperature, as always
    assert method_stem("kd", ["kd"], settings) == "kd-T3-a0.5-std"
    assert task.method_settings(dist.DIST)["temperature"] == 3.0
    assert task.method_settings(methods.Distillation, temperature=5.0)["temperature"] == 5.0
    built = task.factory(dkd.DKD)(keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                                    keras.layers.Dense(10)]))
    assert built.options.standardize and built.options.temperature == 3.0


def test_options_are_checked_and_standardized_kd_compiles_its_own_step():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"--kd-standardize must be True or False, got 1"):
        methods.make_options("kd", {"standardize": 1})
    with pytest.raises(ValueError, match=r"^standardize must be True or False, got 'yes'"):
        methods.make_options("dkd", {"standardize": "yes"}, naming=methods.argument_name)  # Distiller's naming
    plain, standardized = methods.Distillation(model), methods.Distillation(model, standardize=True)
    assert standardized.options.temperature == plain.options.temperature == 4.0  # T is never changed by it
    assert step_sharing.signature(plain) == (id(None),)  # as before
    assert step_sharing.signature(standardized) != step_sharing.signature(plain)
    assert step_sharing.loss_key(standardized) != step_sharing.loss_key(plain)
    assert methods.run_settings(standardized.options) == {**dataclasses.asdict(plain.options), "standardize": True}


# -- what the paper states -----------------------------------------------------------

@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_invariant_to_shifting_and_scaling_either_models_logits(logits, name):
    """Sun et al. 2024: the standardized loss does not depend on each example's logit
    mean and scale, so the student need not match the teacher's range."""
    rng = np.random.default_rng(1)
    scale, shift = rng.uniform(0.2, 5.0, (BATCH, 1)), rng.uniform(-10, 10, (BATCH, 1))
    s, t, y = logits["student"], logits["teacher"], logits["y"]
    on = method(name, standardize=True)
    base = terms(on, s, t, y)
    for student, teacher in ((scale * s + shift, t), (s, scale * t + shift), (scale * s + shift, 3 * t - 1)):
        moved = terms(on, student, teacher, y)
        for term in base:
            if term != "ce":
                assert moved[term] == pytest.approx(base[term], rel=RTOL, abs=1e-6), term
    off = method(name)
    moved = terms(off, scale * s + shift, t, y)
    assert any(moved[k] != pytest.approx(v, rel=1e-3) for k, v in terms(off, s, t, y).items() if k != "ce")


def test_two_classes_leave_no_signal():
    """With K = 2 the z-scores are ±1/√2 whatever the logits (Task 2 is binary): the
    standardized KD term is piecewise constant, its gradient ~ε."""
    rng = np.random.default_rng(2)
    student = tf.Variable(rng.normal(0, 3, (8, 2)).astype(np.float32))
    teacher = tf.constant(rng.normal(0, 3, (8, 2)).astype(np.float32))
    z = losses.standardize_logits(student).numpy()
    np.testing.assert_allclose(np.abs(z), 1 / np.sqrt(2), rtol=1e-5)
    for standardize, small in ((True, True), (False, False)):
        with tf.GradientTape() as tape:
            t, s = losses.standardized(teacher, student, standardize)
            loss = losses.distillation_loss(t, s, 2.0)
        largest = float(tf.reduce_max(tf.abs(tape.gradient(loss, student))))
        assert (largest < 1e-5) == small, largest


def test_equal_logits_give_zeros_and_a_finite_gradient():
    logits = tf.Variable(tf.fill((2, 5), 3.0))
    with tf.GradientTape() as tape:
        z = losses.standardize_logits(logits)
        loss = losses.distillation_loss(tf.constant([[1.0, 0, 0, 0, 2], [0, 1, 0, 0, 0]]), z, 2.0)
    assert np.all(z.numpy() == 0.0)
    assert np.all(np.isfinite(tape.gradient(loss, logits).numpy()))


@pytest.mark.slow
def test_a_short_standardized_kd_fit_logs_finite_terms():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96).astype("int32")
    x = 0.3 * rng.uniform(size=(96, 12, 12, 1)).astype("float32")
    for i, label in enumerate(y):
        x[i, 4 * label:4 * label + 4, 2:10] = 1.0
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(3)])
    student = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Flatten(), keras.layers.Dense(8, "relu"),
                                keras.layers.Dense(3)])
    before = [w.numpy().copy() for w in student.weights]
    distiller = Distiller(teacher, student, method="kd", standardize=True, temperature=2.0, seed=0)
    assert distiller.options.standardize and distiller.options.temperature == 2.0
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    for term in ("ce", "kd"):
        values = np.asarray(history[term])
        assert np.all(np.isfinite(values)) and np.all(values > 0.0), f"{term}: {values}"
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(before, student.weights))
