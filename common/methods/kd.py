"""Knowledge distillation (Hinton, Vinyals & Dean 2015).

    L = α · CE(y, softmax(z_s)) + (1 − α) · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))

z_s, z_t: student and teacher logits; T: `--temperature`; α: `--alpha`. The loss
functions are `kdtoolkit.losses.teacher_loss` and `kdtoolkit.losses.distillation_loss`.
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, LabelFreeTerm, SharedStep, alpha_field, register, temperature_field


@dataclasses.dataclass(frozen=True)
class KDOptions:
    temperature: float = temperature_field()
    alpha: float = alpha_field()


@register
class Distillation(Distiller):
    """Hinton KD; the two weighted parts are logged as `ce` and `kd` (their sum is
    exactly `losses.student_loss`). `teacher` is only needed when batches carry no
    `"teacher_logits"`; it is never trained here."""

    name = "kd"
    summary = "KD (Hinton et al. 2015): alpha CE + (1 - alpha) T^2 KL of softened logits (--temperature, --alpha)"
    Options = KDOptions
    term_names = ("ce", "kd")
    # A teacher that runs per step (no cached targets) is part of the step.
    shared_step = SharedStep(lambda method: (id(method.teacher),), runtime=("temperature", "alpha"), stackable=True)
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
        return {
            "ce": alpha * losses.teacher_loss(batch["y"], logits),
            "kd": (1.0 - alpha) * losses.distillation_loss(self.teacher_logits(batch), outputs, self.temperature),
        }, logits
