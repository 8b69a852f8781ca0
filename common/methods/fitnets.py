"""FitNets hints (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015).

The student's guided layer v (its penultimate `"embedding"`, `(batch, D_s)`) is
mapped by a trained linear regressor r to the teacher's hint layer u (its
`"embedding"`, `(batch, D_t)`):

    L_HT = ½ ‖u − r(v)‖²                     (paper, per example)
    L    = CE(y, softmax(z_s)) + β · mean over examples and the D_t units of (u − r(v))²

β = `--fitnets-weight`. The paper trains the hint first and then KD in a second
stage; this is the one-stage form that mdistiller and torchdistill also use. The
regressor is trained with the student and saved in epoch checkpoints, not with
the student's weights.
"""

import dataclasses

import keras
import tensorflow as tf

from common import losses
from common.methods.base import Distiller


def hint_loss(teacher_hint, student_regressed):
    """Mean squared difference over the batch and units: `(batch, D)`, `(batch, D)` -> scalar."""
    difference = tf.cast(student_regressed, tf.float32) - tf.cast(teacher_hint, tf.float32)
    return tf.reduce_mean(tf.square(difference))


@dataclasses.dataclass(frozen=True)
class FitNetsOptions:
    weight: float = dataclasses.field(default=1.0, metadata={"help": "beta, weight of the hint loss"})



class FitNets(Distiller):
    """Logged terms: `ce` and `hint` (already multiplied by β)."""

    name = "fitnets"
    summary = "FitNets hints (Romero et al. 2015): CE + beta MSE(teacher embedding, regressor(student embedding))"
    Options = FitNetsOptions
    term_names = ("ce", "hint")
    teacher_outputs = ("embedding",)
    student_outputs = ("logits", "embedding")

    def __init__(self, student, options=None, context=None, teacher=None):
        super().__init__(student, options, context, teacher)
        self.regressor = None
        self.extra_layers = ()

    def build_extras(self, teacher_shapes):
        self.regressor = keras.layers.Dense(teacher_shapes["embedding"][-1], name="fitnets_regressor", dtype="float32")
        self.regressor.build(self.student_shapes()["embedding"])
        self.extra_layers = (self.regressor,)

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        hint = hint_loss(self.targets(batch)["embedding"], self.regressor(tf.cast(outputs["embedding"], tf.float32)))
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "hint": self.options.weight * hint}, outputs["logits"]


METHOD = FitNets
