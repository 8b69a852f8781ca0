"""FitNets hints (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015).

The student's guided layer v is mapped by a trained regressor r to the shape of
the teacher's hint layer u (both the task's `"hint"` output):

    L_HT = ½ ‖u − r(v)‖²                     (paper, per example)
    L    = CE(y, softmax(z_s)) + β · mean over examples and units of (u − r(v))²

β = 100 (`--fitnets-weight`), the reference's `FITNET.LOSS.FEAT_WEIGHT`
(mdistiller `mdistiller/distillers/FitNet.py`, `mdistiller/engine/cfg.py`), in
the reference's one-stage form (the paper trains the hint first and then KD in a
second stage). The regressor is the reference's `ConvReg`
(`mdistiller/distillers/_common.py`) for feature maps: a convolution chosen from
the two sizes (3×3 stride 2 when the student's map is twice the teacher's, a
4×4 stride-2 transposed convolution when half, else a valid convolution of
kernel 1 + H_s − H_t), then BatchNorm and ReLU. For vectors it is the same with a
Dense layer in place of the convolution.

Hint layers (`"hint"` of each task's feature model): the reference takes the
middle stage (`HINT_LAYER` 2). Task 1: the teacher CNN's 11×11×64 map after its
second conv block (the middle of its four weight layers), guided by the MLP
student's first hidden layer (the middle of its three), one unit per input
pixel, read as a 28×28×1 map (as AT reads it), so the regressor is an 18×18
convolution to 64 channels. Task 2 keeps the global-average-pooled features of
the two bases (2,048 and 1,280 units): its teacher outputs are cached per
training image and dihedral view, and the middle stage's maps would be about
7 GB of float32 for MHIST's 2,175 images in 8 views (stated deviation).

The regressor is trained with the student and saved in epoch checkpoints, not
with the student's weights.
"""

import dataclasses

import keras
import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, register


def hint_loss(teacher_hint, student_regressed):
    """Mean squared difference over the batch and units: two tensors of one shape -> scalar."""
    difference = tf.cast(student_regressed, tf.float32) - tf.cast(teacher_hint, tf.float32)
    return tf.reduce_mean(tf.square(difference))


def regressor_layers(student_shape, teacher_shape):
    """The layers of the reference's `ConvReg` from the student's guided shape to the
    teacher's hint shape (batch dimension excluded): `(H, W, C)` maps or `(D,)` vectors."""
    if len(student_shape) != len(teacher_shape) or len(teacher_shape) not in (1, 3):
        raise ValueError(f"fitnets: the student's guided layer {tuple(student_shape)} and the teacher's hint "
                         f"{tuple(teacher_shape)} must both be vectors or both feature maps")

    def finish():  # PyTorch's BatchNorm2d defaults (eps 1e-5, running-average momentum 0.1 = Keras' 0.9)
        return [keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, dtype="float32"),
                keras.layers.ReLU(dtype="float32")]

    if len(teacher_shape) == 1:
        first = keras.layers.Dense(teacher_shape[0], dtype="float32")
    else:
        (s_h, s_w, _), (t_h, t_w, t_c) = student_shape, teacher_shape
        if s_h == 2 * t_h:  # PyTorch's padding 1 on each side ("same" would pad bottom and right only)
            return [keras.layers.ZeroPadding2D(1, dtype="float32"),
                    keras.layers.Conv2D(t_c, 3, strides=2, padding="valid", dtype="float32"), *finish()]
        elif 2 * s_h == t_h:
            first = keras.layers.Conv2DTranspose(t_c, 4, strides=2, padding="same", dtype="float32")
        elif s_h >= t_h and s_w >= t_w:
            first = keras.layers.Conv2D(t_c, (1 + s_h - t_h, 1 + s_w - t_w), padding="valid", dtype="float32")
        else:
            raise ValueError(f"fitnets: the student's guided map ({s_h}x{s_w}) is smaller than the teacher's hint "
                             f"({t_h}x{t_w}) and not half of it; the reference's regressor has no form for that")
    return [first, *finish()]


@dataclasses.dataclass(frozen=True)
class FitNetsOptions:
    weight: float = dataclasses.field(default=100.0, metadata={"help": "beta, weight of the hint loss"})


@register
class FitNets(Distiller):
    """Logged terms: `ce` and `hint` (already multiplied by β)."""

    name = "fitnets"
    summary = "FitNets hints (Romero et al. 2015): CE + beta MSE(teacher hint, regressor(student guided layer))"
    Options = FitNetsOptions
    term_names = ("ce", "hint")
    teacher_outputs = ("hint",)
    student_outputs = ("logits", "hint")

    def __init__(self, student, options=None, context=None, teacher=None):
        super().__init__(student, options, context, teacher)
        self.regressor = None
        self.extra_layers = ()

    def build_extras(self, teacher_shapes):
        student_shape = self.student_shapes()["hint"]
        self.regressor = keras.Sequential(regressor_layers(student_shape[1:], teacher_shapes["hint"][1:]),
                                          name="fitnets_regressor")
        self.regressor.build((None, *student_shape[1:]))
        self.extra_layers = (self.regressor,)

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        regressed = self.regressor(tf.cast(outputs["hint"], tf.float32), training=training)
        hint = hint_loss(self.targets(batch)["hint"], regressed)
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "hint": self.options.weight * hint}, outputs["logits"]
