"""Losses against hand-computed values (plain `math`, no TensorFlow)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import losses

pytestmark = pytest.mark.usefixtures("exact_float32")  # hand values: no TF32 rounding on GPUs


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


TEACHER = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
STUDENT = [[3.0, 2.0, 1.0], [0.0, 0.0, 1.0]]
LABELS = [2, 0]


def hand_ce():
    return (-math.log(softmax(STUDENT[0])[2]) - math.log(softmax(STUDENT[1])[0])) / 2


def hand_kd(temperature):
    values = [
        kl(softmax([v / temperature for v in t]), softmax([v / temperature for v in s]))
        for t, s in zip(TEACHER, STUDENT)
    ]
    return temperature**2 * sum(values) / len(values)


def test_teacher_loss_is_mean_softmax_cross_entropy():
    assert float(losses.teacher_loss(LABELS, STUDENT)) == pytest.approx(hand_ce(), rel=1e-6)


def test_teacher_loss_single_example_value():
    # -log(e^3 / (e^1 + e^2 + e^3)) = 0.40760596...
    assert float(losses.teacher_loss([2], [[1.0, 2.0, 3.0]])) == pytest.approx(0.4076059644, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 16.0])
def test_distillation_loss_is_t_squared_kl(temperature):
    value = float(losses.distillation_loss(TEACHER, STUDENT, temperature))
    assert value == pytest.approx(hand_kd(temperature), rel=1e-5)


def test_distillation_loss_scales_with_t_squared():
    # The KL at T=4, multiplied by 16: the factor is applied, not forgotten.
    t = 4.0
    kl_only = hand_kd(t) / t**2
    assert float(losses.distillation_loss(TEACHER, STUDENT, t)) == pytest.approx(16 * kl_only, rel=1e-5)
    assert float(losses.distillation_loss(TEACHER, STUDENT, t)) != pytest.approx(kl_only, rel=1e-2)


def test_distillation_loss_is_zero_for_identical_logits():
    assert float(losses.distillation_loss(TEACHER, TEACHER, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_matches_keras_kl_divergence_times_t_squared():
    t = 2.0
    p = keras.ops.softmax(np.array(TEACHER) / t)
    q = keras.ops.softmax(np.array(STUDENT) / t)
    reference = float(keras.losses.KLDivergence()(p, q)) * t**2
    assert float(losses.distillation_loss(TEACHER, STUDENT, t)) == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_student_loss_alpha_weights_the_hard_label_term(alpha):
    t = 4.0
    expected = alpha * hand_ce() + (1 - alpha) * hand_kd(t)
    value = float(losses.student_loss(LABELS, STUDENT, TEACHER, t, alpha))
    assert value == pytest.approx(expected, rel=1e-5)


def test_student_loss_alpha_one_is_plain_cross_entropy():
    value = float(losses.student_loss(LABELS, STUDENT, TEACHER, 4.0, 1.0))
    assert value == pytest.approx(float(losses.teacher_loss(LABELS, STUDENT)), rel=1e-7)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "warm", None])
def test_bad_temperature_is_a_value_error(bad):
    with pytest.raises(ValueError, match="temperature"):
        losses.distillation_loss(TEACHER, STUDENT, bad)
    with pytest.raises(ValueError, match="temperature"):
        losses.student_loss(LABELS, STUDENT, TEACHER, bad, 0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_bad_alpha_is_a_value_error(bad):
    with pytest.raises(ValueError, match="alpha"):
        losses.student_loss(LABELS, STUDENT, TEACHER, 4.0, bad)


def test_soft_target_entropy():
    # Equal logits: uniform distribution, entropy log(C) at any T.
    assert float(losses.soft_target_entropy([[0.0] * 10], 3.0)) == pytest.approx(math.log(10), rel=1e-6)
    p = softmax([v / 2 for v in TEACHER[0]])
    expected = -sum(pi * math.log(pi) for pi in p)
    assert float(losses.soft_target_entropy([TEACHER[0]], 2.0)) == pytest.approx(expected, rel=1e-6)


def test_class_logits_from_subclass_logits_groups_class_major():
    # 2 classes x 2 subclasses: columns (c0s0, c0s1, c1s0, c1s1).
    z = [[0.0, math.log(3.0), 1.0, 1.0]]
    class_logits = losses.class_logits_from_subclass_logits(z, 2).numpy()
    assert class_logits[0, 0] == pytest.approx(math.log(1 + 3))
    assert class_logits[0, 1] == pytest.approx(math.log(2 * math.e))
    # softmax over classes equals summed subclass probabilities
    p = softmax(z[0])
    class_p = softmax(list(class_logits[0]))
    assert class_p[0] == pytest.approx(p[0] + p[1], rel=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        losses.class_logits_from_subclass_logits([[1.0, 2.0, 3.0]], 2)


def test_subclass_auxiliary_loss_hand_values():
    # Rows [1,2,3] and [3,2,1] have correlation -1; with tau = 1:
    # L = log(e + e^-1) - 1 - log 2 for both rows.
    value = float(losses.subclass_auxiliary_loss([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], 1.0))
    assert value == pytest.approx(math.log(math.e + math.exp(-1)) - 1 - math.log(2), rel=1e-5)
    # Identical patterns (collapse): every similarity is 1/tau, so L = 0.
    assert float(losses.subclass_auxiliary_loss([[1.0, 2.0, 4.0], [2.0, 4.0, 8.0]], 0.5)) == pytest.approx(0.0, abs=1e-5)
    # Uncorrelated rows [1,-1,0,0] and [0,0,1,-1], tau = 0.5: s = diag(2).
    value = float(losses.subclass_auxiliary_loss([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]], 0.5))
    assert value == pytest.approx(math.log(math.exp(2) + 1) - 2 - math.log(2), rel=1e-5)


def test_matches_keras_logits_distillation_given_a_kl_instance():
    # keras.distillation.LogitsDistillation(loss=KLDivergence()) applies softmax and T²
    # like Hinton; its default loss="kl_divergence" string does not (Keras 3.15.1), which
    # is why the benchmark passes the instance.
    t = 4.0
    reference = keras.distillation.LogitsDistillation(temperature=t, loss=keras.losses.KLDivergence())
    value = float(reference.compute_loss(np.array(TEACHER) * 5, np.array(STUDENT)))
    assert float(losses.distillation_loss(np.array(TEACHER) * 5, STUDENT, t)) == pytest.approx(value, rel=1e-4)


def test_losses_of_stacked_members_are_each_members_loss():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 6)
    teacher = rng.normal(size=(6, 5)).astype(np.float32)
    students = (2 * rng.normal(size=(3, 6, 5))).astype(np.float32)  # (members, batch, classes)
    temperatures = np.array([1.0, 4.0, 16.0], np.float32)
    ce = losses.teacher_loss(labels, students).numpy()
    kd = losses.distillation_loss(teacher, students, tf.constant(temperatures)).numpy()
    assert ce.shape == kd.shape == (3,)
    for k, temperature in enumerate(temperatures):
        assert ce[k] == pytest.approx(float(losses.teacher_loss(labels, students[k])), rel=1e-6)
        assert kd[k] == pytest.approx(float(losses.distillation_loss(teacher, students[k], float(temperature))),
                                      rel=1e-5)
    assert len(set(kd.round(4))) == 3  # the members' temperatures differ, so can their losses
    # The gradients are each member's own, up to float rounding (vectorised over other shapes).
    alphas = tf.constant([0.2, 0.5, 0.9])
    logits = tf.Variable(students)
    with tf.GradientTape() as tape:
        together = tf.reduce_sum(alphas * losses.teacher_loss(labels, logits)
                                 + (1 - alphas) * losses.distillation_loss(teacher, logits, tf.constant(temperatures)))
    gradients = tape.gradient(together, logits).numpy()
    for k, temperature in enumerate(temperatures):
        member = tf.Variable(students[k])
        with tf.GradientTape() as tape:
            alone = alphas[k] * losses.teacher_loss(labels, member) + (1 - alphas[k]) * losses.distillation_loss(
                teacher, member, tf.constant(temperature))
        np.testing.assert_allclose(gradients[k], tape.gradient(alone, member).numpy(), rtol=1e-6, atol=1e-8)


def kd_gradient(temperature, gap, seed=0):
    """The KD loss's gradient on student logits (64, 10) against teacher logits scaled to
    span `gap`, and the exact large-T limit `((s - mean s) - (t - mean t)) / (C B)`."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(64, 10))
    teacher = tf.constant(teacher / np.ptp(teacher, axis=1, keepdims=True) * gap, tf.float32)
    student = tf.Variable(rng.normal(size=(64, 10)) * gap / 3, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = losses.distillation_loss(teacher, student, temperature)
    s, t = student.numpy(), teacher.numpy()
    exact = ((s - s.mean(1, keepdims=True)) - (t - t.mean(1, keepdims=True))) / 10 / 64
    return float(loss), tape.gradient(loss, student).numpy(), exact


def test_temperature_range_is_where_the_kd_term_stops_carrying_a_signal():
    lowest, highest = losses.temperature_range("float32")
    assert highest == pytest.approx(-math.log(np.finfo(np.float32).tiny) / np.finfo(np.float32).eps)  # 7.3e8
    assert lowest == pytest.approx(math.sqrt(np.finfo(np.float32).tiny))
    # `--temperature 1e9` (above the bound): logits 10 apart give exactly no KD loss and no gradient
    loss, gradient, _ = kd_gradient(1e9, 10.0)
    assert loss == 0 and not gradient.any()
    # just below the bound, the widest gap float32's softmax resolves (87.3) still moves the student;
    # well inside it, the gradient is the exact one
    _, gradient, exact = kd_gradient(highest / 4, -math.log(np.finfo(np.float32).tiny))
    assert gradient.any()
    _, gradient, exact = kd_gradient(1e4, 10.0)
    assert np.linalg.norm(gradient - exact) / np.linalg.norm(exact) < 1e-2
    assert losses.temperature_problem(1e9) is not None and "7.3e+08" in losses.temperature_problem(1e9)
    assert losses.temperature_problem(1e-20) is not None and losses.temperature_problem(1e-20).count("\n") == 0
    assert all(losses.temperature_problem(t) is None for t in (1e-3, 1.0, 4.0, 64.0, 1e6))
    # a term weighted below half of float32's resolution relative to the other rounds away
    assert "--alpha 0 " in losses.weight_problem(1e-9) and "--alpha 1 " in losses.weight_problem(1 - 1e-9)
    assert all(losses.weight_problem(a) is None for a in (0.0, 1e-6, 0.5, 1 - 1e-6, 1.0))
    ce = tf.constant(0.7)
    assert float((1 - 1e-9) * ce + 1e-9 * ce) == float(ce)  # what the rule stands for: the small term is lost
