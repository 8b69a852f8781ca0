"""Pure loss functions of logits and labels.

Shapes: `labels` is `(batch,)` integer class ids; every `*_logits` argument is
`(batch, classes)` unnormalised scores. Each loss returns the batch mean as a
scalar `float32` tensor.

Convention (Hinton et al. 2015; the course and keras.io use it too): in
`student_loss`, `alpha` weights the HARD-label cross-entropy and `1 - alpha` the
distillation term. `alpha = 1` is plain supervised training, `alpha = 0` is pure
distillation.
"""

import math

import tensorflow as tf


def validate_temperature(temperature):
    """Returns `temperature` as a float; raises `ValueError` unless it is finite and > 0."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def validate_alpha(alpha):
    """Returns `alpha` as a float; raises `ValueError` unless 0 <= alpha <= 1."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (it weights the hard-label term), got {alpha!r}"
        )
    return value


def teacher_loss(labels, logits):
    """Softmax cross-entropy with integer labels, batch mean (nats)."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=tf.cast(logits, tf.float32)
    )
    return tf.reduce_mean(per_example)


def distillation_loss(teacher_logits, student_logits, temperature):
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean.

    KL differs from the soft-target cross-entropy only by the teacher's entropy,
    which does not depend on the student, so both give the same gradients; KL is
    used because it is 0 when the student matches the teacher. The T² factor keeps
    the soft-target gradients on the scale of the hard-label ones (they shrink as
    1/T²), so `alpha` means the same thing at every temperature.
    """
    temperature = validate_temperature(temperature)
    teacher_log_probs = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature)
    student_log_probs = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature)
    kl = tf.reduce_sum(
        tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1
    )
    return tf.reduce_mean(kl) * (temperature**2)


def student_loss(labels, student_logits, teacher_logits, temperature, alpha):
    """`alpha * teacher_loss(labels, student) + (1 - alpha) * distillation_loss`."""
    alpha = validate_alpha(alpha)
    hard = teacher_loss(labels, student_logits)
    soft = distillation_loss(teacher_logits, student_logits, temperature)
    return alpha * hard + (1.0 - alpha) * soft


def soft_target_entropy(logits, temperature):
    """Mean entropy (nats) of softmax(logits / T): how soft the targets are at T."""
    temperature = validate_temperature(temperature)
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32) / temperature)
    return tf.reduce_mean(-tf.reduce_sum(tf.exp(log_probs) * log_probs, axis=-1))
