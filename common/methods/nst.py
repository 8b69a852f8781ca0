"""Neuron selectivity transfer (Huang & Wang, "Like What You Like", 2017).

A feature map A ∈ R^{H×W×C} is read as C samples, one per channel: its map
a_c ∈ R^{HW}, L2-normalised (f_c = a_c / max(‖a_c‖₂, 1e-12)). With the
polynomial kernel k(x, y) = (xᵀy)² (d = 2, c = 0), the squared maximum mean
discrepancy between the teacher's channels f^T (C_T of them) and the student's
f^S (C_S) is, per example,

    MMD² = mean_{i,i'} k(f^T_i, f^T_i') + mean_{j,j'} k(f^S_j, f^S_j') − 2 mean_{i,j} k(f^S_j, f^T_i)
    L    = CE(y, softmax(z_s)) + λ · mean over examples of MMD²

λ = 50 (`--nst-weight`), the cross-entropy weight 1. This is the objective of
mdistiller `mdistiller/distillers/NST.py` (`single_stage_nst_loss`,
`poly_kernel`) with its constants from `mdistiller/engine/cfg.py`
(`NST.LOSS.CE_WEIGHT` 1.0, `NST.LOSS.FEAT_WEIGHT` 50.0). As there, the larger
of the two maps is first average-pooled to the smaller one (PyTorch's
`adaptive_avg_pool2d`), so the channels' maps have one length; the teacher's
maps are cached per example and either side may be the one pooled.

Deviations: (1) the reference sums this loss over every stage after the stem
(`feats[1:]`); here one pair of maps, the last (`"spatial"`), is transferred,
since each model exposes one comparable map. (2) mdistiller pools to (h, h)
from the heights alone; here each axis is pooled to the smaller of the two
maps' sizes (the same for square maps, which all of the course's are).
(3) The value is computed from the channels' second moments over positions,
M = Σ_c f_c f_cᵀ (HW × HW), as MMD² = ‖M_T / C_T − M_S / C_S‖²_F, which is the
three kernel means above exactly (Σ_{j,i} (f^S_jᵀ f^T_i)² = ⟨M_S, M_T⟩_F), but
a sum of squares, without the cancellation of three means of similar size, and
it is computed in float64 from the pooling on (returned as float32): for maps
within 1e-3 of each other float32 kept 4 digits in this form, and at most one in
the reference's three means (none within 1e-4), against a float64 translation
of the reference. The cost is one (HW × C) x (C × HW) product per example and
map; HW is the smaller map's (7x7 in Task 2, 11x11 in Task 1).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.at import adaptive_average_pool
from kdtoolkit.methods.base import Distiller, LabelFreeTerm, register


def common_size(teacher_features, student_features):
    """`(h, w)`: the smaller of the two maps' heights and of their widths."""
    return (min(int(teacher_features.shape[1]), int(student_features.shape[1])),
            min(int(teacher_features.shape[2]), int(student_features.shape[2])))


def channel_moments(features, size):
    """`(batch, H, W, C)` -> float64 `(batch, hw, hw)`: M / C, M = Σ_c f_c f_cᵀ of the map
    pooled to `size`, each channel's map f_c L2-normalised over the positions."""
    x = adaptive_average_pool(tf.cast(features, tf.float64), size, np.float64)
    x = tf.reshape(x, (tf.shape(x)[0], size[0] * size[1], int(x.shape[-1])))
    x = tf.math.l2_normalize(x, axis=1, epsilon=1e-24)  # 1 / max(‖f_c‖, 1e-12), PyTorch's F.normalize
    return tf.einsum("bpc,bqc->bpq", x, x) / float(x.shape[-1])


def nst_loss(teacher_features, student_features):
    """The unweighted NST loss of two `(batch, H, W, C)` maps (any sizes), a float32
    scalar: the batch mean of the polynomial-kernel MMD² of their normalised channels."""
    size = common_size(teacher_features, student_features)
    student = channel_moments(student_features, size)
    teacher = tf.stop_gradient(channel_moments(teacher_features, size))
    return tf.cast(tf.reduce_mean(tf.reduce_sum(tf.square(teacher - student), axis=[1, 2])), tf.float32)


@dataclasses.dataclass(frozen=True)
class NSTOptions:
    weight: float = dataclasses.field(default=50.0, metadata={"help": "lambda, weight of the MMD loss"})


@register
class NeuronSelectivityTransfer(Distiller):
    """Logged terms: `ce` and `nst` (already multiplied by λ)."""

    name = "nst"
    summary = "NST, neuron selectivity transfer (Huang & Wang 2017): CE + lambda polynomial-kernel MMD of channel maps"
    Options = NSTOptions
    term_names = ("ce", "nst")
    teacher_outputs = ("spatial",)
    student_outputs = ("logits", "spatial")
    label_free_term = LabelFreeTerm(lambda options, teacher, student: options.weight * nst_loss(teacher, student),
                                    ("weight",))

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        nst = nst_loss(self.targets(batch)["spatial"], outputs["spatial"])
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "nst": self.options.weight * nst}, outputs["logits"]
