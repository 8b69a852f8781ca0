"""Similarity-preserving knowledge distillation (Tung & Mori, ICCV 2019).

With A_T, A_S the teacher's and student's last feature maps (`"spatial"`,
`(B, H, W, C)`; sizes may differ) of the B examples of a batch, each flattened
to Q = reshape(A, (B, H·W·C)):

    G̃ = Q Qᵀ                                     (B × B: every pair of examples)
    G  = G̃ with each row divided by max(‖row‖₂, 1e-12)
    L_SP = (1 / B²) ‖G_T − G_S‖²_F
    L    = CE(y, softmax(z_s)) + γ · L_SP

γ = 3000 (`--sp-weight`), the cross-entropy weight 1. This is the objective of
mdistiller `mdistiller/distillers/SP.py` (`similarity_loss`, PyTorch's
`F.normalize` of the Gram matrix's rows) with its constants from
`mdistiller/engine/cfg.py` (`SP.LOSS.CE_WEIGHT` 1.0, `SP.LOSS.FEAT_WEIGHT`
3000.0). The reference transfers one pair of maps, the last stage's
(`feats[-1]`, the map before global pooling), which is our `"spatial"`: no
deviation in what is read, except where a model's `"spatial"` is not its very
last map (at 32x32 the keras.applications bases end in 1x1 maps, and
`kdtoolkit.features` then takes the last 2x2 one). The paper's γ/B² on the summed
squares is the same loss.

The loss is computed in float64 from the (float32 or bfloat16) maps and returned
as float32: one (B, HWC) x (HWC, B) product. For a student whose maps are
within 1e-3 of the teacher's, float32 kept about 4 digits of the loss (3 within
1e-4: the difference of two rounded normalised Grams), against a float64
translation of the reference.

The teacher's maps are what is cached per example (its Gram matrix relates the
examples of each batch, so nothing smaller would do): H·W·C floats per training
example (and view), e.g. 7x7x2048 for Task 2's ResNet50V2 at 224 px.
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, LabelFreeTerm, register


def normalised_gram(features):
    """`(batch, ...)` -> float64 `(batch, batch)`: the Gram matrix of the flattened
    examples, each row L2-normalised (PyTorch's `F.normalize`, eps 1e-12 on the norm)."""
    x = tf.cast(features, tf.float64)
    x = tf.reshape(x, (tf.shape(x)[0], -1))
    gram = tf.matmul(x, x, transpose_b=True)
    return tf.math.l2_normalize(gram, axis=1, epsilon=1e-24)  # rsqrt(max(Σ g², 1e-24)) = 1 / max(‖g‖, 1e-12)


def sp_loss(teacher_features, student_features):
    """L_SP above (unweighted, a float32 scalar): ‖G_T − G_S‖²_F / B², computed in float64."""
    student = normalised_gram(student_features)
    teacher = tf.stop_gradient(normalised_gram(teacher_features))
    return tf.cast(tf.reduce_mean(tf.square(teacher - student)), tf.float32)


@dataclasses.dataclass(frozen=True)
class SPOptions:
    weight: float = dataclasses.field(default=3000.0, metadata={"help": "gamma, weight of the similarity loss"})


@register
class SimilarityPreserving(Distiller):
    """Logged terms: `ce` and `sp` (already multiplied by γ)."""

    name = "sp"
    summary = "SP, similarity-preserving KD (Tung & Mori 2019): CE + gamma MSE of row-normalised batch Gram matrices"
    Options = SPOptions
    term_names = ("ce", "sp")
    teacher_outputs = ("spatial",)
    student_outputs = ("logits", "spatial")
    label_free_term = LabelFreeTerm(lambda options, teacher, student: options.weight * sp_loss(teacher, student),
                                    ("weight",))
    single_replica = ("its Gram matrices relate every pair of examples of the batch, and each replica would see "
                      "only its share")

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        sp = sp_loss(self.targets(batch)["spatial"], outputs["spatial"])
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "sp": self.options.weight * sp}, outputs["logits"]
