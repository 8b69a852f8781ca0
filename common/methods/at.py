"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based.

For a feature map A ∈ R^{H×W×C} the spatial attention map is

    F(A) = (1/C) Σ_c |A_c|^p          (p = 2),      Q = vec(F(A)) / ‖vec(F(A))‖₂

and, with the student's and teacher's last feature maps (`"spatial"`),

    L = CE(y, softmax(z_s)) + (β / 2) · mean over examples and positions of (Q_S − Q_T)²

as in the authors' code (the paper writes the p-norm of Q_S − Q_T; β = 1000 there
and here, `--at-weight`). When the maps differ in size, the teacher's attention is
resized bilinearly to the student's before normalising. Task 1's MLP student has
no feature map: its first hidden layer (one unit per input pixel) is read as a
28×28 one-channel map, so AT teaches it where the teacher attends.
"""

import dataclasses

import tensorflow as tf

from common import losses
from common.methods.base import Distiller


def attention_map(features, p=2.0):
    """`(batch, H, W, C)` -> `(batch, H, W)`: mean over channels of |A|^p (not normalised)."""
    return tf.reduce_mean(tf.pow(tf.abs(tf.cast(features, tf.float32)), p), axis=-1)


def attention_loss(teacher_map, student_map):
    """Mean squared difference of the L2-normalised, flattened maps; the teacher's
    `(batch, H_t, W_t)` map is first resized to the student's `(batch, H_s, W_s)`."""
    student_map = tf.cast(student_map, tf.float32)
    teacher_map = tf.cast(teacher_map, tf.float32)
    same = teacher_map.shape[1:].is_fully_defined() and teacher_map.shape[1:] == student_map.shape[1:]
    if not same:  # (resizing to the same size would leave the map as it is)
        resized = tf.image.resize(teacher_map[..., None], tf.shape(student_map)[1:3], method="bilinear")
        teacher_map = resized[..., 0]
    batch = tf.shape(student_map)[0]
    student_q = tf.math.l2_normalize(tf.reshape(student_map, (batch, -1)), axis=-1)
    teacher_q = tf.math.l2_normalize(tf.reshape(teacher_map, (batch, -1)), axis=-1)
    return tf.reduce_mean(tf.square(student_q - teacher_q))


@dataclasses.dataclass(frozen=True)
class ATOptions:
    weight: float = dataclasses.field(default=1000.0, metadata={"help": "beta; the loss is beta/2 times the map MSE"})



class AttentionTransfer(Distiller):
    """Logged terms: `ce` and `at` (already multiplied by β/2). The teacher's
    attention maps, not its feature maps, are what is cached per example."""

    name = "at"
    summary = "attention transfer (Zagoruyko & Komodakis 2017): CE + beta/2 MSE of normalised attention maps"
    Options = ATOptions
    term_names = ("ce", "at")
    teacher_outputs = ("spatial",)
    student_outputs = ("logits", "spatial")

    @classmethod
    def teacher_targets(cls, outputs):
        return {"attention": attention_map(outputs["spatial"])}

    @classmethod
    def target_names(cls):
        return ("attention",)

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        at = attention_loss(self.targets(batch)["attention"], attention_map(outputs["spatial"]))
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "at": self.options.weight / 2.0 * at}, outputs["logits"]


METHOD = AttentionTransfer
