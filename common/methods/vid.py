"""Variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai,
CVPR 2019).

VID maximises a variational lower bound of the mutual information between the
teacher's and the student's features: a Gaussian q(t | s) with mean μ(s), a
small regressor of the student's feature map, and a variance σ²_c per teacher
channel c. Its negative log-likelihood (without the constant ½ log 2π) is

    σ²_c  = softplus(α_c) + ε
    VID   = mean over examples, positions and channels of ½ ((t − μ(s))² / σ²_c + log σ²_c)
    L     = CE(y, softmax(z_s)) + λ · VID

The reference is mdistiller `mdistiller/distillers/VID.py` (`vid_loss`,
`init_vid_modules`) with its defaults in `mdistiller/engine/cfg.py`
(`VID.LOSS.CE_WEIGHT` 1, `VID.LOSS.FEAT_WEIGHT` λ = 1 (`--vid-weight`),
`VID.EPS` ε = 1e-5, `VID.INIT_PRED_VAR` 5 (`--vid-init-pred-var`)):

- μ is `conv1x1(C_s, C_t) → ReLU → conv1x1(C_t, C_t) → ReLU → conv1x1(C_t, C_t)`,
  1×1 convolutions without bias, initialised as PyTorch's `Conv2d` default
  (kaiming-uniform with a = √5: uniform in ±1/√fan_in, here
  `VarianceScaling(1/3, "fan_in", "uniform")`);
- α starts at log(exp(v₀ − ε) − 1) for every channel, so σ² = v₀ = 5 at first;
- when the maps differ in size the larger is average-pooled to the smaller
  (PyTorch's `adaptive_avg_pool2d`, the student's map before the regressor) by
  their heights, as there (to (h, w) of the smaller here; the reference pools
  to (h, h), the same for the square maps it is used on).

Deviations, stated:

- One pair of maps: the student's and teacher's last feature maps (`"spatial"`),
  where mdistiller sums the loss over every stage after the stem
  (`feats[1:]`, one regressor and variance per stage); this toolkit's task
  models expose one comparable map each. Task 1: the CNN teacher's 11×11×64 map
  and the MLP student's first hidden layer read as a 28×28×1 map (pooled to
  11×11, a 1 → 64 → 64 → 64 regressor); Task 2: the bases' 7×7 maps at 224 px
  (MobileNetV2's 1,280 channels regressed to ResNet50V2's 2,048: about 11.0 M
  regressor weights, trained with the student and not kept).
- α is trained with the regressor, as in the paper and RepDistiller
  (`distiller_zoo/VID.py`, where `log_scale` is a parameter of the trained
  module). mdistiller keeps its `log_scales` in a plain Python list, which is
  neither registered as parameters nor returned by `get_learnable_parameters`,
  so there σ² stays at its initial 5 throughout: the objective at the first
  step is the same.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.at import adaptive_average_pool
from kdtoolkit.methods.base import Distiller, register

EPSILON = 1e-5  # mdistiller's VID.EPS


def initial_log_scale(init_pred_var, eps=EPSILON):
    """α₀ = log(exp(v₀ − ε) − 1): softplus(α₀) + ε = v₀."""
    return math.log(math.expm1(init_pred_var - eps))


class PredictiveVariance(keras.layers.Layer):
    """The per-channel variance σ² = softplus(α) + ε of VID's Gaussian, α trained."""

    def __init__(self, channels, init_pred_var, eps=EPSILON, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.eps = eps
        self.log_scale = self.add_weight(shape=(channels,), name="log_scale",
                                         initializer=keras.initializers.Constant(initial_log_scale(init_pred_var, eps)))
        self.built = True

    def value(self):
        """`(C,)` σ² of each teacher channel."""
        return tf.math.softplus(self.log_scale) + self.eps


def regressor_layers(teacher_channels):
    """mdistiller's VID regressor: three bias-free 1×1 convolutions to the teacher's
    channels, ReLU between them, PyTorch's default initialisation."""
    def conv():
        return keras.layers.Conv2D(teacher_channels, 1, use_bias=False, dtype="float32",
                                   kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"))

    return [conv(), keras.layers.ReLU(dtype="float32"), conv(), keras.layers.ReLU(dtype="float32"), conv()]


def match_sizes(teacher_features, student_features):
    """The two `(batch, H, W, C)` maps with the larger (by height) average-pooled to the
    smaller's height and width, as the reference's `vid_loss` does."""
    teacher_size, student_size = tuple(teacher_features.shape[1:3]), tuple(student_features.shape[1:3])
    if student_size[0] > teacher_size[0]:
        student_features = adaptive_average_pool(student_features, teacher_size)
    elif student_size[0] < teacher_size[0]:
        teacher_features = adaptive_average_pool(teacher_features, student_size)
    return tf.cast(teacher_features, tf.float32), tf.cast(student_features, tf.float32)


def gaussian_nll(teacher_features, predicted_mean, variance):
    """Mean over every element of ½ ((t − μ)² / σ² + log σ²), σ² `(C,)` per channel."""
    return tf.reduce_mean(0.5 * (tf.square(predicted_mean - teacher_features) / variance + tf.math.log(variance)))


@dataclasses.dataclass(frozen=True)
class VIDOptions:
    weight: float = dataclasses.field(default=1.0, metadata={"help": "lambda, weight of the VID loss"})
    init_pred_var: float = dataclasses.field(default=5.0, metadata={
        "help": "initial variance of the Gaussian, each teacher channel", "minimum": EPSILON, "exclusive": True,
        "maximum": 100.0})


@register
class VID(Distiller):
    """Logged terms: `ce` and `vid` (already multiplied by λ). The regressor and the
    variance are the method's extra layers."""

    name = "vid"
    summary = "VID, variational information distillation (Ahn et al. 2019): CE + lambda Gaussian NLL of teacher maps"
    Options = VIDOptions
    term_names = ("ce", "vid")
    teacher_outputs = ("spatial",)
    student_outputs = ("logits", "spatial")

    def __init__(self, student, options=None, context=None, teacher=None, **values):
        super().__init__(student, options, context, teacher, **values)
        self.regressor, self.variance = None, None
        self.extra_layers = ()

    def build_extras(self, teacher_shapes):
        teacher_shape, student_shape = teacher_shapes["spatial"], self.student_shapes()["spatial"]
        if len(teacher_shape) != 4 or len(student_shape) != 4:
            raise ValueError(f"vid: the teacher's {tuple(teacher_shape)} and the student's {tuple(student_shape)} "
                             "spatial outputs must both be (batch, H, W, C) feature maps")
        channels = int(teacher_shape[-1])
        self.regressor = keras.Sequential(regressor_layers(channels), name="vid_regressor")
        self.regressor.build((None, None, None, int(student_shape[-1])))
        self.variance = PredictiveVariance(channels, self.options.init_pred_var, name="vid_variance")
        self.extra_layers = (self.regressor, self.variance)

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        teacher, student = match_sizes(self.targets(batch)["spatial"], outputs["spatial"])
        nll = gaussian_nll(teacher, self.regressor(student, training=training), self.variance.value())
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "vid": self.options.weight * nll}, outputs["logits"]
