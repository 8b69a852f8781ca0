"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

With t_i, s_i the teacher's and student's embeddings (`"embedding"`, the
penultimate vectors; their sizes may differ) of the B examples of a batch:

    x̂_i    = x_i / (‖x_i‖₂ + ε)                           (ε = 1e-7; a NaN entry set to 0)
    K_ij   = (⟨x̂_i, x̂_j⟩ + 1) / 2                         (cosine similarity scaled to [0, 1])
    P_ij   = K_ij / Σ_k K_ik                               (each row a distribution, j = i included)
    L_PKT  = (1 / B²) Σ_ij P^t_ij · log((P^t_ij + ε) / (P^s_ij + ε))
    L      = CE(y, softmax(z_s)) + β · L_PKT

β = 30000 (`--pkt-weight`), the cross-entropy weight 1. This is the objective of
mdistiller `mdistiller/distillers/PKT.py` (`pkt_loss`, which reads the pooled
features `"pooled_feat"`, our `"embedding"`) with its constants from
`mdistiller/engine/cfg.py` (`PKT.LOSS.CE_WEIGHT` 1.0, `PKT.LOSS.FEAT_WEIGHT`
30000.0); mdistiller credits the code to the authors' passalis/probabilistic_kt.
The KL is a mean over all B² entries, not a sum over each row, so its scale
depends on the batch size, as in the reference.

The loss is computed in float64 from the (float32 or bfloat16) embeddings and
returned as float32: a (B, D) normalisation, one (B, D) x (D, B) product and
B x B numbers. The KL of two kernels that are close (a student that has
learnt, or tightly clustered ReLU embeddings whose cosines are all near 1) is
a sum of first-order terms that cancel to a second-order value; in float32 it
kept 3 digits on one of the tests' batches of 2, and none for a student within
1e-3 of its teacher, against a float64 translation of the reference.

Deviation: the reference's norm ‖x‖ = sqrt(Σ x²) has an infinite derivative at
an all-zero embedding (a ReLU layer with every unit off), which PyTorch turns
into a NaN gradient for the whole step; here the norm of an all-zero vector has
gradient 0 (its value is the same, 0), so that row's gradient is the finite
one of x / ε. The teacher's embeddings are what is cached per example: its
kernel relates the examples of each batch.
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, LabelFreeTerm, register

EPSILON = 1e-7  # pkt_loss's eps: added to the norms and to both probabilities in the log


def safe_norm(x):
    """`(batch, D)` -> `(batch, 1)` Euclidean norms; gradient 0 (not NaN) at an all-zero row."""
    return losses.safe_sqrt(tf.reduce_sum(tf.square(x), axis=1, keepdims=True))


def kernel_probabilities(embeddings):
    """`(batch, D)` -> `(batch, batch)` float64 P: the rows of the [0, 1]-scaled cosine
    similarities, each divided by its sum."""
    x = tf.cast(embeddings, tf.float64)
    x = x / (safe_norm(x) + EPSILON)
    x = tf.where(tf.math.is_nan(x), tf.zeros_like(x), x)
    similarity = (tf.matmul(x, x, transpose_b=True) + 1.0) / 2.0
    return similarity / tf.reduce_sum(similarity, axis=1, keepdims=True)


def pkt_loss(teacher_embeddings, student_embeddings):
    """L_PKT above (unweighted, a float32 scalar): the mean over the B² entries of
    P^t log((P^t + ε) / (P^s + ε)), computed in float64."""
    student = kernel_probabilities(student_embeddings)
    teacher = tf.stop_gradient(kernel_probabilities(teacher_embeddings))
    return tf.cast(tf.reduce_mean(teacher * tf.math.log((teacher + EPSILON) / (student + EPSILON))), tf.float32)


@dataclasses.dataclass(frozen=True)
class PKTOptions:
    weight: float = dataclasses.field(default=30000.0, metadata={"help": "beta, weight of the PKT KL term"})


@register
class PKT(Distiller):
    """Logged terms: `ce` and `pkt` (already multiplied by β)."""

    name = "pkt"
    summary = "PKT, probabilistic KT (Passalis & Tefas 2018): CE + beta KL of cosine-kernel probabilities of embeddings"
    Options = PKTOptions
    term_names = ("ce", "pkt")
    teacher_outputs = ("embedding",)
    student_outputs = ("logits", "embedding")
    label_free_term = LabelFreeTerm(lambda options, teacher, student: options.weight * pkt_loss(teacher, student),
                                    ("weight",))
    single_replica = "its kernel relates every pair of examples of the batch, and each replica would see only its share"

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        pkt = pkt_loss(self.targets(batch)["embedding"], outputs["embedding"])
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "pkt": self.options.weight * pkt}, outputs["logits"]
