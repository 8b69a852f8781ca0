"""Pure loss functions of logits and labels.

Shapes: `labels` is `(batch,)` integer class ids; every `*_logits` argument is
`(batch, classes)` unnormalised scores. Each loss returns the batch mean as a
scalar `float32` tensor. `teacher_loss` and `distillation_loss` also take the
student logits of several models at once, `(members, batch, classes)` (fused
runs, `kdtoolkit.speed.fused`), and then return each member's batch mean,
`(members,)`; `distillation_loss`'s temperature may then be `(members,)` too.

Convention (Hinton et al. 2015; the course and keras.io use it too): in
`student_loss`, `alpha` weights the HARD-label cross-entropy and `1 - alpha` the
distillation term. `alpha = 1` is plain supervised training, `alpha = 0` is pure
distillation.
"""

import math

import numpy as np
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


LOSS_DTYPE = "float32"  # every loss here computes in float32, under every --precision (logits are cast)


def temperature_range(dtype=LOSS_DTYPE):
    """`(lowest, highest)` temperature at which a softened-logit term (`distillation_loss`)
    still carries a signal when computed in `dtype`, from that precision's range:

    - highest: `ln(1 / tiny) / eps` (7.3e8 in float32). `ln(1 / tiny)` (87.3) is the
      widest logit gap whose softmax at T = 1 is not yet exactly one-hot (exp(-gap)
      is still a normal number); divided by a T above the bound, even that gap
      falls below the precision's resolution `eps`, so the softened probabilities
      are uniform up to rounding and the term is exactly 0 or rounding noise
      (measured: at T = 1e9 a KD loss on logits 10 apart is exactly 0 with zero
      gradient; at T = 7e8 on logits 87 apart its gradient is 3.8 times off the
      exact one).
    - lowest: `sqrt(tiny)` (1.1e-19): below it T², which scales the term, is no
      longer a normal number and the term is flushed towards 0.
    """
    info = np.finfo(dtype)
    tiny, eps = float(info.tiny), float(info.eps)
    return math.sqrt(tiny), -math.log(tiny) / eps


def temperature_problem(temperature, flag="--temperature", dtype=LOSS_DTYPE):
    """A one-line message when `temperature` is outside `temperature_range(dtype)`
    (the term it softens would underflow), else None."""
    lowest, highest = temperature_range(dtype)
    info = np.finfo(dtype)
    if temperature > highest:
        return (f"{flag} {temperature:g} is above {highest:.2g}, where {dtype} (the precision of the loss) cannot "
                f"resolve softened probabilities: even logits {-math.log(float(info.tiny)):.1f} apart (the widest gap "
                f"its softmax resolves at T=1) divided by T fall below its resolution {float(info.eps):.2g}, so the "
                f"term is 0 or rounding noise; use a temperature below {highest:.2g} (1-20 is usual)")
    if temperature < lowest:
        return (f"{flag} {temperature:g} is below {lowest:.2g}, where T² (which scales the term) underflows "
                f"in {dtype}, the precision of the loss; use a temperature above {lowest:.2g} (1-20 is usual)")
    return None


def weight_problem(alpha, flag="--alpha", dtype=LOSS_DTYPE):
    """A one-line message when `alpha` (hard-label weight; `1 - alpha` weights
    distillation) gives a term a nonzero weight too small relative to the other's to
    survive their sum in `dtype`: below half its resolution `eps`, that term's
    gradient rounds away when added to one of comparable size. None otherwise;
    0 and 1 (one term only) are fine."""
    small, large = sorted((float(alpha), 1.0 - float(alpha)))
    half_eps = float(np.finfo(dtype).eps) / 2
    if 0 < small and small < half_eps * large:
        term = "hard-label" if float(alpha) < 0.5 else "distillation"
        other = 0 if float(alpha) < 0.5 else 1
        return (f"{flag} {alpha:.10g} weights the {term} term {small / large:.2g} times the other, below half the "
                f"resolution of {dtype} ({half_eps:.2g}): its gradient rounds away in the sum; use {flag} {other} "
                f"to drop that term, or give it a weight of at least {half_eps:.2g} of the other's")
    return None


def teacher_loss(labels, logits):
    """Softmax cross-entropy with integer labels, batch mean (nats): a scalar, or
    `(members,)` for `(members, batch, classes)` logits."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    if logits.shape.rank > 2:  # each member's logits against the same labels
        labels = tf.broadcast_to(labels, tf.shape(logits)[:-1])
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_mean(per_example, axis=-1)


def distillation_loss(teacher_logits, student_logits, temperature):
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean.

    KL differs from the soft-target cross-entropy only by the teacher's entropy,
    which does not depend on the student, so both give the same gradients; KL is
    used because it is 0 when the student matches the teacher. The T² factor keeps
    the soft-target gradients on the scale of the hard-label ones (they shrink as
    1/T²), so `alpha` means the same thing at every temperature. `temperature`: a
    number, or a float32 tensor (a shared step's runtime setting, checked when set):
    a scalar, or `(members,)` for `(members, batch, classes)` student logits.
    """
    if not tf.is_tensor(temperature):
        temperature = validate_temperature(temperature)
    temperature = tf.cast(temperature, tf.float32)  # T and T² in float32 however T is given
    scale = temperature[:, None, None] if temperature.shape.rank else temperature  # per member
    teacher_log_probs = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / scale)
    student_log_probs = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / scale)
    kl = tf.reduce_sum(
        tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1
    )
    return tf.reduce_mean(kl, axis=-1) * (temperature**2)


def student_loss(labels, student_logits, teacher_logits, temperature, alpha):
    """`alpha * teacher_loss(labels, student) + (1 - alpha) * distillation_loss`."""
    alpha = validate_alpha(alpha)
    hard = teacher_loss(labels, student_logits)
    soft = distillation_loss(teacher_logits, student_logits, temperature)
    return alpha * hard + (1.0 - alpha) * soft


# -- Logit standardization (Sun, Ren, Li, Wang & Cao, CVPR 2024) -----------------
#
# A pre-processing of the logits of a logit method: each example's logits are
# z-scored, z̃ = (z − mean_k z) / (ε + std_k z), teacher's and student's alike,
# before they are divided by the temperature (then a "base temperature"). The
# softened targets then depend only on the teacher's logit *relations*, not on
# their range, and the student need not match the teacher's logit scale: the
# term is unchanged when either's logits of an example are shifted or scaled by
# a positive number (up to ε). Reference: sunshangquan/logit-standardization-KD,
# `mdistiller/distillers/KD.py` and `DKD.py`, `normalize` (torch's `std`: the
# unbiased, n − 1 estimate; ε = 1e-7 added to it), applied with its
# `tools/train.py --logit-stand`, which also sets the temperature to
# `--base-temp` (default 2) and the KD weight to `--kd-weight` (default 9: KD's
# KD_WEIGHT becomes 9; DKD's ALPHA and BETA are multiplied by 9).
#
# On two classes the z-scores are ±1/√2 whatever the logits: the standardized
# targets carry only which class is larger, and the term's gradient is ~ε (no signal).

STANDARDIZE_EPSILON = 1e-7  # the reference's `normalize`: (logit - mean) / (1e-7 + std)
STANDARDIZED_KD_WEIGHT = 9.0  # the reference's `--kd-weight` default, applied with --logit-stand


def safe_sqrt(x):
    """√x of non-negative `x`, elementwise, with a zero (not NaN) gradient where x = 0."""
    positive = x > 0.0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, 1.0)), 0.0)


def standardize_logits(logits, epsilon=STANDARDIZE_EPSILON):
    """(z − mean) / (ε + std) over the last axis (classes), std with n − 1 as the
    reference's torch `std`; float32. Logits that are all equal give zeros, with a
    finite gradient ((I − 1/K) / ε, the exact one there: no NaN from the square root)."""
    logits = tf.cast(logits, tf.float32)
    centred = logits - tf.reduce_mean(logits, axis=-1, keepdims=True)
    classes = tf.cast(tf.shape(logits)[-1], tf.float32)
    variance = tf.reduce_sum(tf.square(centred), axis=-1, keepdims=True) / tf.maximum(classes - 1.0, 1.0)
    return centred / (epsilon + safe_sqrt(variance))


def standardized(teacher_logits, student_logits, standardize):
    """`(teacher, student)` logits, both z-scored by `standardize_logits` when
    `standardize` (a Python bool), else as given: the one place a logit method's
    `standardize` option acts."""
    if not standardize:
        return teacher_logits, student_logits
    return standardize_logits(teacher_logits), standardize_logits(student_logits)


def soft_target_entropy(logits, temperature):
    """Mean entropy (nats) of softmax(logits / T): how soft the targets are at T."""
    temperature = validate_temperature(temperature)
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32) / temperature)
    return tf.reduce_mean(-tf.reduce_sum(tf.exp(log_probs) * log_probs, axis=-1))


# -- Subclass distillation (Müller, Kornblith & Hinton 2020) --------------------
#
# A network with C classes and S subclasses per class outputs K = C·S subclass
# logits z ∈ R^K, ordered class-major: subclass k = c·S + s belongs to class c.
#
#   class logit        ℓ_c = log Σ_s exp(z_{c·S+s})        (logsumexp over c's subclasses)
#   so                 softmax(ℓ)_c = Σ_s softmax(z)_{c·S+s}
#   teacher loss       L_T = CE(y, softmax(ℓ)) + β · L_aux
#   auxiliary loss     ẑ_i = (z_i − mean_k z_ik) / (std_k z_ik · √K)   (unit vectors)
#                      s_ij = ẑ_i · ẑ_j / τ    (correlation of examples i, j, over τ)
#                      L_aux = (1/n) Σ_i [logsumexp_j s_ij − s_ii] − log n
#   L_aux is 0 when every example has the same logit pattern and falls as the
#   patterns of different examples in the batch are pushed apart, so the teacher
#   spreads examples over its subclasses instead of collapsing onto one each.
#   student loss       L_S = α · CE(y, softmax(ℓ_student)) + (1 − α) · T² · KL(softmax(z_T/T) ‖ softmax(z_S/T))


def class_logits_from_subclass_logits(subclass_logits, num_classes):
    """`(batch, C·S)` class-major subclass logits -> `(batch, C)` class logits (logsumexp)."""
    subclass_logits = tf.cast(subclass_logits, tf.float32)
    total = subclass_logits.shape[-1]
    if total is None or total % num_classes:
        raise ValueError(
            f"subclass logits have {total} columns, not a multiple of {num_classes} classes"
        )
    grouped = tf.reshape(subclass_logits, (-1, num_classes, total // num_classes))
    return tf.reduce_logsumexp(grouped, axis=-1)


def subclass_auxiliary_loss(subclass_logits, temperature=1.0, epsilon=1e-9):
    """L_aux of subclass distillation (see above): pushes examples' logit patterns apart."""
    temperature = validate_temperature(temperature)
    z = tf.cast(subclass_logits, tf.float32)
    num_logits = tf.cast(tf.shape(z)[-1], tf.float32)
    batch = tf.cast(tf.shape(z)[0], tf.float32)
    mean, variance = tf.nn.moments(z, axes=[-1], keepdims=True)
    unit = (z - mean) / tf.sqrt((variance + epsilon) * num_logits)
    similarity = tf.matmul(unit, unit, transpose_b=True) / temperature
    self_similarity = tf.linalg.diag_part(similarity)
    return (
        tf.reduce_mean(tf.reduce_logsumexp(similarity, axis=-1) - self_similarity)
        - tf.math.log(batch)
    )
