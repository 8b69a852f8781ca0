"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022).

With p = softmax(z / T) over C classes and t the label, KD's KL splits into a
target-class part and a non-target part:

    b = [p_t, 1 − p_t]                       binary (target vs rest) probabilities
    p̂_i = p_i / (1 − p_t),  i ≠ t           distribution over the non-target classes
    KL(p^T ‖ p^S) = TCKD + (1 − p^T_t) · NCKD
    TCKD = KL(b^T ‖ b^S),  NCKD = KL(p̂^T ‖ p̂^S)

DKD drops the coupling weight (1 − p^T_t) and weights the parts freely:

    L = CE(y, softmax(z_s)) + T² · (α · TCKD + β · NCKD)

α = `--dkd-tckd-weight` (paper: 1), β = `--dkd-nckd-weight` (paper: 8), T =
`--temperature` (paper: 4). As in the reference code (mdistiller
`mdistiller/distillers/DKD.py`, `configs/cifar100/dkd/*.yaml`), the KD part is
warmed up: in epoch e (1-based) it is scaled by min(e / W, 1), W = 20 epochs of a
240-epoch schedule. Here W = `--dkd-warmup` × the epochs of the schedule being
trained (default 20/240: the reference's share), so the warm-up keeps its place
in a shorter schedule; 0 turns it off. In the course's 12 epochs W = 1 epoch,
and the scale is 1 from the first epoch: the same objective as without warm-up.

`--dkd-standardize` (off by default): logit standardization (Sun et al., CVPR
2024) as its reference applies it to DKD (sunshangquan/logit-standardization-KD,
`mdistiller/distillers/DKD.py` `dkd_loss` with `logit_stand`, set by
`tools/train.py --logit-stand --base-temp 2 --kd-weight 9`): both parts are
computed on the z-scored logits (`losses.standardize_logits`) at the base
temperature T = `--temperature` (the reference's base temperature is 2), and α and β are multiplied by the reference's
KD weight 9 (defaults: 9 TCKD + 72 NCKD); the CE weight (1) and the warm-up are
unchanged, as there.
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, register, standardize_field, temperature_field


def dkd_parts(labels, student_logits, teacher_logits, temperature):
    """`(tckd, nckd)`: batch means of the two KL parts above at temperature T (no T²)."""
    temperature = losses.validate_temperature(temperature)
    student = tf.cast(student_logits, tf.float32) / temperature
    teacher = tf.cast(teacher_logits, tf.float32) / temperature
    target = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), tf.shape(student)[-1])

    def binary_log_probs(scaled):
        log_p = tf.nn.log_softmax(scaled)
        log_target = tf.reduce_sum(log_p * target, axis=-1)
        log_rest = tf.reduce_logsumexp(log_p - 1000.0 * target, axis=-1)  # log(1 − p_t), stably
        return tf.stack([log_target, log_rest], axis=-1)

    def kl(log_p, log_q):
        return tf.reduce_mean(tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1))

    tckd = kl(binary_log_probs(teacher), binary_log_probs(student))
    # Removing the target class: its logit minus 1000 has probability exp(-1000) = 0 in float32.
    nckd = kl(tf.nn.log_softmax(teacher - 1000.0 * target), tf.nn.log_softmax(student - 1000.0 * target))
    return tckd, nckd


@dataclasses.dataclass(frozen=True)
class DKDOptions:
    temperature: float = temperature_field()
    tckd_weight: float = dataclasses.field(default=1.0, metadata={"help": "alpha, weight of target-class KD"})
    nckd_weight: float = dataclasses.field(default=8.0, metadata={"help": "beta, weight of non-target-class KD"})
    warmup: float = dataclasses.field(default=20.0 / 240.0, metadata={
        "help": "warm-up of the KD part, as a share of the schedule's epochs (the reference's 20 of 240); 0: none"})
    standardize: bool = standardize_field()


def warmup_scale(epoch, epochs, warmup):
    """min(epoch / W, 1) with W = `warmup` × `epochs` (1 when W is 0)."""
    length = warmup * epochs
    return 1.0 if length <= 0 else min(epoch / length, 1.0)



@register
class DKD(Distiller):
    """Logged terms: `ce`, `tckd` and `nckd` (each already weighted, warmed up and
    scaled by T²; standardized, weighted × 9 more: see the module)."""

    name = "dkd"
    summary = "DKD, decoupled KD (Zhao et al. 2022): CE + T^2 (a TCKD + b NCKD)"
    Options = DKDOptions
    term_names = ("ce", "tckd", "nckd")

    def __init__(self, student, options=None, context=None, teacher=None):
        super().__init__(student, options, context, teacher)
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="dkd_warmup_scale")

    def begin_epoch(self, epoch, epochs):
        self.scale.assign(warmup_scale(epoch, epochs, self.options.warmup))

    def loss_terms(self, batch, training=True):
        logits = self.student(batch["x"], training)["logits"]
        temperature, standardize = self.options.temperature, self.options.standardize
        teacher, student = losses.standardized(self.targets(batch)["logits"], logits, standardize)
        tckd, nckd = dkd_parts(batch["y"], student, teacher, temperature)
        scale = temperature**2 * self.scale
        if standardize:  # the reference's --kd-weight multiplies alpha and beta
            scale = losses.STANDARDIZED_KD_WEIGHT * scale
        return {"ce": losses.teacher_loss(batch["y"], logits),
                "tckd": self.options.tckd_weight * scale * tckd,
                "nckd": self.options.nckd_weight * scale * nckd}, logits
