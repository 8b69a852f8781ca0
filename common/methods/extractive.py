"""Extractive knowledge distillation (Kobayashi, WACV 2022).

KD's soft target carries, besides the teacher's distinctive classes, a floor of
probability spread over every class. Extractive KD keeps only the *distinctive*
part: the teacher's softened probabilities above the uniform level 1/K,
renormalised, optionally smoothed, and matched at the student's own temperature:

    p_t = softmax(z_t / T_t)
    d_k = max(p_t,k − 1/K, 0)                       the distinctive part
    q   = (1 − ε) · d / Σ_k d_k + ε / K             (q = uniform if Σ_k d_k = 0)
    L   = α · CE(y, softmax(z_s)) + (1 − α) · T_s² · KL(q ‖ softmax(z_s / T_s))

T_t: `--temperature` (4, as KD); T_s: `--extractive-student-temperature` (4);
ε: `--extractive-epsilon` (0); α: `--alpha` (0.5, as KD). The T_s² factor is
KD's: it keeps the soft term's gradients on the hard term's scale at any T_s.

Sources and choices. No code by the author was found, and the paper's text is
not readable on these machines: the target above is the reading-list's
description of the method (the part of the teacher's probabilities above the
uniform level, renormalised, optionally smoothed, with separate teacher and
student temperatures); "above the uniform level" is read as the excess
p − 1/K, not p itself where it exceeds 1/K. The other constants are KD's, so
that the one change from `kd` is the target. With ε = 0 a class at or below
1/K gets no target mass at all, so KL pushes the student's probability of it
down freely; ε > 0 keeps a floor.

On a binary task (Task 2, K = 2) at most one class can be above 1/2, so d is
the teacher's top class alone and q is the teacher's hard label smoothed by ε:
the method is then label smoothing towards the teacher's (not the annotators')
label, and its only teacher knowledge is which class the teacher picks.
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, alpha_field, register, temperature_field


def distinctive_target(teacher_logits, temperature, smoothing=0.0):
    """`(batch, K)` target q from the teacher's `(batch, K)` logits (module docstring)."""
    probabilities = tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / temperature)
    classes = tf.cast(tf.shape(probabilities)[-1], tf.float32)
    excess = tf.nn.relu(probabilities - 1.0 / classes)
    total = tf.reduce_sum(excess, axis=-1, keepdims=True)
    uniform = tf.ones_like(probabilities) / classes
    target = tf.where(total > 0, excess / tf.where(total > 0, total, 1.0), uniform)
    return (1.0 - smoothing) * target + smoothing / classes


def extractive_loss(target, student_logits, temperature):
    """T_s² · KL(q ‖ softmax(z_s / T_s)), batch mean; classes with q = 0 add nothing."""
    log_student = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature)
    kl = tf.reduce_sum(tf.math.xlogy(target, target) - target * log_student, axis=-1)
    return tf.reduce_mean(kl) * temperature**2


@dataclasses.dataclass(frozen=True)
class ExtractiveOptions:
    temperature: float = temperature_field()
    student_temperature: float = dataclasses.field(default=4.0, metadata={
        "help": "T_s, the student's temperature in the extractive term", "exclusive": True})
    epsilon: float = dataclasses.field(default=0.0, metadata={
        "help": "epsilon, uniform smoothing of the distinctive target", "maximum": 1.0})
    alpha: float = alpha_field()


@register
class ExtractiveKD(Distiller):
    """Logged terms: `ce` and `extractive` (already weighted by α and 1 − α)."""

    name = "extractive"
    summary = ("extractive KD (Kobayashi 2022): KD towards the teacher's probabilities above 1/K, renormalised "
               "(--temperature for the teacher, --extractive-student-temperature)")
    Options = ExtractiveOptions
    term_names = ("ce", "extractive")

    def loss_terms(self, batch, training=True):
        o = self.options
        logits = self.student(batch["x"], training)["logits"]
        target = distinctive_target(self.targets(batch)["logits"], o.temperature, o.epsilon)
        return {"ce": o.alpha * losses.teacher_loss(batch["y"], logits),
                "extractive": (1.0 - o.alpha) * extractive_loss(target, logits, o.student_temperature)}, logits
