"""Knowledge distillation (Hinton, Vinyals & Dean 2015).

    L = α · CE(y, softmax(z_s)) + (1 − α) · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))

z_s, z_t: student and teacher logits; T: `--temperature`; α: `--alpha`. The loss
functions are `kdtoolkit.losses.teacher_loss` and `kdtoolkit.losses.distillation_loss`.

`--kd-standardize` (off by default; Python `standardize=True`): logit standardization
(Sun et al., CVPR 2024), as its reference applies it to KD (sunshangquan/logit-
standardization-KD, `mdistiller/distillers/KD.py` `kd_loss` with `logit_stand`,
set by `tools/train.py --logit-stand --base-temp 2 --kd-weight 9`):

    L = α · CE(y, softmax(z_s)) + 9 · T² · KL(softmax(z̃_t / T) ‖ softmax(z̃_s / T))

z̃ = `losses.standardize_logits(z)` (z-score per example), T `--temperature` (the
reference's base temperature is 2: `--temperature 2`). The reference's `--logit-stand` sets
KD_WEIGHT to 9 (its KD otherwise 0.9 = 1 − α) and leaves CE_WEIGHT as configured
(0.1 in its CIFAR-100 runs, 1.0 on ImageNet): here the KD term's weight is 9 in
place of 1 − α and the CE term keeps α, so `--alpha 0.1` is the reference's
CIFAR-100 objective and `--alpha 1` its ImageNet one (the course's default α 0.5
gives 0.5 CE + 9 KD).
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import (Distiller, LabelFreeTerm, SharedStep, alpha_field, register, standardize_field,
                                    temperature_field)


@dataclasses.dataclass(frozen=True)
class KDOptions:
    temperature: float = temperature_field()
    alpha: float = alpha_field()
    standardize: bool = standardize_field()


@register
class Distillation(Distiller):
    """Hinton KD; the two weighted parts are logged as `ce` and `kd` (their sum is
    exactly `losses.student_loss`; standardized, see the module). `teacher` is only
    needed when batches carry no `"teacher_logits"`; it is never trained here."""

    name = "kd"
    summary = "KD (Hinton et al. 2015): alpha CE + (1 - alpha) T^2 KL of softened logits (--temperature, --alpha)"
    Options = KDOptions
    term_names = ("ce", "kd")
    # A teacher that runs per step (no cached targets) is part of the step; so is standardization (another graph).
    shared_step = SharedStep(lambda method: (id(method.teacher),) + (("standardize",) if method.options.standardize
                                                                     else ()),
                             runtime=("temperature", "alpha"), stackable=True)
    label_free_term = LabelFreeTerm(lambda options, teacher, student: losses.distillation_loss(
        teacher, student, options.temperature), ("temperature",))

    def __init__(self, student, options=None, context=None, teacher=None, **values):
        super().__init__(student, options, context, teacher, **values)
        self.temperature, self.alpha = float(self.options.temperature), float(self.options.alpha)

    def teacher_logits(self, batch):
        return self.targets(batch)["logits"]

    def loss_terms(self, batch, training=True):
        outputs, logits = self.forward(batch["x"], training=training)
        # In float32 whether alpha is a number, a variable or fused cells' vector: the same weights each way.
        alpha = tf.cast(self.alpha, tf.float32)
        if self.options.standardize:  # the reference's KD weight in place of 1 - alpha (module docstring)
            teacher, student = losses.standardized(self.teacher_logits(batch), outputs, True)
            kd = losses.STANDARDIZED_KD_WEIGHT * losses.distillation_loss(teacher, student, self.temperature)
            return {"ce": alpha * losses.teacher_loss(batch["y"], logits), "kd": kd}, logits
        return {
            "ce": alpha * losses.teacher_loss(batch["y"], logits),
            "kd": (1.0 - alpha) * losses.distillation_loss(self.teacher_logits(batch), outputs, self.temperature),
        }, logits
