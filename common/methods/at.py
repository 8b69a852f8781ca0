"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based.

For a feature map A ∈ R^{H×W×C} the spatial attention map is

    F(A) = (1/C) Σ_c A_c^p          (p = 2),      Q = vec(F(A)) / ‖vec(F(A))‖₂

and, with the student's and teacher's last feature maps (`"spatial"`),

    L = CE(y, softmax(z_s)) + β · mean over examples and positions of (Q_S − Q_T)²

β = 1000 (`--at-weight`). This is the objective of the reference code:
mdistiller `mdistiller/distillers/AT.py` (`FEAT_WEIGHT` 1000 times
`single_stage_at_loss`), RepDistiller `distiller_zoo/AT.py` (`-b 1000`) and the
authors' `szagoruyko/attention-transfer` `cifar.py` (`opt.beta * at_loss`). The
paper writes β/2 on the p-norm of Q_S − Q_T; the codes weight the mean by β.
The references sum this term over every stage's pair of maps; here one pair, the
last feature maps, is transferred (stated deviation: the course's models expose
one comparable map each).

When the two maps differ in size, the larger feature map is average-pooled to
the smaller one (PyTorch's `adaptive_avg_pool2d`, as mdistiller and RepDistiller
do) before its attention map is taken. The teacher's attention maps are what is
cached per example, so the teacher's map must be the smaller (or equal) one: the
course's pairs are (Task 1: teacher 11×11, student 28×28; Task 2: both 7×7 at
224 px); a larger teacher map is a one-line error.

Task 1's MLP student has no feature map: its first hidden layer (one unit per
input pixel) is read as a 28×28 one-channel map (pooled to the teacher's 11×11),
so AT teaches it where the teacher attends.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, LabelFreeTerm, register


def adaptive_pool_matrix(size_in, size_out, dtype=np.float32):
    """`(size_out, size_in)` averaging weights (`dtype`) of PyTorch's adaptive average
    pooling along one axis: output i averages inputs floor(i·n/m) .. ceil((i+1)·n/m) − 1."""
    matrix = np.zeros((size_out, size_in), dtype)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_average_pool(features, size, dtype=np.float32):
    """`(batch, H, W, C)` -> `(batch, h, w, C)` in `dtype`, `size = (h, w)`: each output
    cell the mean of its window (`adaptive_pool_matrix` on each axis); the input
    unchanged at its own size."""
    height, width = int(features.shape[1]), int(features.shape[2])
    if (height, width) == tuple(size):
        return features
    rows = tf.constant(adaptive_pool_matrix(height, size[0], dtype))
    columns = tf.constant(adaptive_pool_matrix(width, size[1], dtype))
    return tf.einsum("ih,bhwc,jw->bijc", rows, tf.cast(features, dtype), columns)


def attention_map(features, p=2.0):
    """`(batch, H, W, C)` -> `(batch, H, W)`: mean over channels of |A|^p (not normalised)."""
    return tf.reduce_mean(tf.pow(tf.abs(tf.cast(features, tf.float32)), p), axis=-1)


def attention_distance(teacher_map, student_map):
    """Mean squared difference of the L2-normalised, flattened `(batch, H, W)` maps
    (of one size)."""
    batch = tf.shape(student_map)[0]
    student_q = tf.math.l2_normalize(tf.reshape(tf.cast(student_map, tf.float32), (batch, -1)), axis=-1)
    teacher_q = tf.math.l2_normalize(tf.reshape(tf.cast(teacher_map, tf.float32), (batch, -1)), axis=-1)
    return tf.reduce_mean(tf.square(student_q - teacher_q))


def attention_loss(teacher_map, student_features):
    """The unweighted AT distance of the teacher's `(batch, h, w)` attention map and
    the student's `(batch, H, W, C)` feature map, pooled to h×w first (H, W >= h, w)."""
    size = tuple(int(d) for d in teacher_map.shape[1:3])
    return attention_distance(teacher_map, attention_map(adaptive_average_pool(student_features, size)))


def feature_map_loss(teacher_features, student_features):
    """The unweighted AT distance of two `(batch, H, W, C)` feature maps, the larger
    average-pooled to the smaller first (mdistiller's `single_stage_at_loss`)."""
    teacher_size, student_size = tuple(teacher_features.shape[1:3]), tuple(student_features.shape[1:3])
    if teacher_size[0] > student_size[0]:
        teacher_features = adaptive_average_pool(teacher_features, student_size)
    return attention_loss(attention_map(teacher_features), student_features)


def check_sizes(teacher_size, student_size):
    """Raises `ValueError` unless the teacher's cached map is no larger than the student's."""
    if teacher_size[0] > student_size[0] or teacher_size[1] > student_size[1]:
        raise ValueError(
            f"at: the teacher's feature map ({teacher_size[0]}x{teacher_size[1]}) is larger than the "
            f"student's ({student_size[0]}x{student_size[1]}); the reference pools the larger map, and only "
            "the teacher's attention is cached: give the student a feature layer at least as large")


@dataclasses.dataclass(frozen=True)
class ATOptions:
    weight: float = dataclasses.field(default=1000.0, metadata={"help": "beta; the loss is beta times the map MSE"})


@register
class AttentionTransfer(Distiller):
    """Logged terms: `ce` and `at` (already multiplied by β). The teacher's
    attention maps, not its feature maps, are what is cached per example."""

    name = "at"
    summary = "AT, attention transfer (Zagoruyko & Komodakis 2017): CE + beta MSE of normalised attention maps"
    Options = ATOptions
    term_names = ("ce", "at")
    teacher_outputs = ("spatial",)
    student_outputs = ("logits", "spatial")
    label_free_term = LabelFreeTerm(lambda options, teacher, student: options.weight * feature_map_loss(
        teacher, student), ("weight",))

    @classmethod
    def teacher_targets(cls, outputs):
        return {"attention": attention_map(outputs["spatial"])}

    @classmethod
    def target_names(cls):
        return ("attention",)

    def build_extras(self, teacher_shapes):
        if "attention" in teacher_shapes:
            check_sizes(teacher_shapes["attention"][1:3], self.student_shapes()["spatial"][1:3])

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        teacher_map = self.targets(batch)["attention"]
        check_sizes(teacher_map.shape[1:3], outputs["spatial"].shape[1:3])
        at = attention_loss(teacher_map, outputs["spatial"])
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "at": self.options.weight * at}, outputs["logits"]
