"""Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019).

With t_i, s_i the teacher's and student's embeddings (`"embedding"`; their sizes
may differ) of the examples of a batch:

    ψ_D(t_i, t_j)      = ‖t_i − t_j‖₂ / μ,   μ = mean of ‖t_i − t_j‖₂ over pairs i ≠ j
    ψ_A(t_i, t_j, t_k) = ⟨e_ij, e_ik⟩,       e_ij = (t_j − t_i) / ‖t_j − t_i‖₂   (angle at t_i)
    L_D = mean over (i, j) of huber(ψ_D(s) − ψ_D(t)),  L_A = mean over (i, j, k) likewise
    L   = CE(y, softmax(z_s)) + λ_D · L_D + λ_A · L_A

huber(x) = x²/2 for |x| < 1, |x| − 1/2 otherwise (PyTorch's smooth L1, as in the
authors' code). λ_D = 25, λ_A = 50 as in the paper (`--rkd-distance-weight`,
`--rkd-angle-weight`). Pairs with i = j (and triples with j = i or k = i) enter the
means as zeros, as in the authors' code (`lenscloth/RKD` `metric/loss.py`, also
mdistiller `mdistiller/distillers/RKD.py` and RepDistiller `distiller_zoo/RKD.py`).

The reference computes the angles from the normalised direct differences, a
`(batch, batch, D)` tensor; here they come from the Gram matrix of the embeddings
centred on their batch mean, `(batch, batch, batch)` numbers. Distances and
angles do not change under a shift of all embeddings, so this is the same
quantity; the centring removes the cancellation that a Gram matrix of tightly
clustered embeddings far from the origin (ReLU features) would suffer in float32
(tested against a float64 translation of the reference on such embeddings).
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, LabelFreeTerm, register


def huber(x):
    """Elementwise smooth L1 with threshold 1."""
    absolute = tf.abs(x)
    return tf.where(absolute < 1.0, 0.5 * tf.square(x), absolute - 0.5)


def centred(embeddings):
    """`(batch, D)` float32 embeddings minus their batch mean (distances and angles unchanged)."""
    e = tf.cast(embeddings, tf.float32)
    return e - tf.reduce_mean(e, axis=0, keepdims=True)


def pairwise_distances(embeddings, epsilon=1e-12):
    """`(batch, D)` -> `(batch, batch)` Euclidean distances, exactly 0 on the diagonal."""
    e = centred(embeddings)
    squared = tf.reduce_sum(tf.square(e), axis=-1)
    gram = tf.matmul(e, e, transpose_b=True)
    distances = tf.sqrt(tf.maximum(squared[:, None] + squared[None, :] - 2.0 * gram, epsilon))
    return distances * (1.0 - tf.eye(tf.shape(e)[0]))


def distance_potentials(embeddings):
    """ψ_D for every pair: distances over their mean off the diagonal."""
    distances = pairwise_distances(embeddings)
    n = tf.cast(tf.shape(distances)[0], tf.float32)
    mean = tf.reduce_sum(distances) / tf.maximum(n * (n - 1.0), 1.0)
    return distances / tf.maximum(mean, 1e-12)


def angle_potentials(embeddings):
    """ψ_A for every triple: `[i, j, k]` = cosine of the angle at i between j and k
    (0 where j = i or k = i)."""
    e = centred(embeddings)
    gram = tf.matmul(e, e, transpose_b=True)
    diagonal = tf.linalg.diag_part(gram)
    # ⟨t_j − t_i, t_k − t_i⟩ = G_jk − G_ij − G_ik + G_ii
    dots = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + diagonal[:, None, None]
    distances = pairwise_distances(e)
    off_diagonal = 1.0 - tf.eye(tf.shape(e)[0])
    inverse = off_diagonal / (distances + (1.0 - off_diagonal))  # 1/‖t_j − t_i‖, 0 for j = i
    return dots * inverse[:, :, None] * inverse[:, None, :]


def rkd_losses(teacher_embeddings, student_embeddings):
    """`(distance_loss, angle_loss)`: L_D and L_A above (unweighted)."""
    distance = tf.reduce_mean(huber(distance_potentials(student_embeddings)
                                    - tf.stop_gradient(distance_potentials(teacher_embeddings))))
    angle = tf.reduce_mean(huber(angle_potentials(student_embeddings)
                                 - tf.stop_gradient(angle_potentials(teacher_embeddings))))
    return distance, angle


def _label_free_term(options, teacher_embeddings, student_embeddings):
    distance, angle = rkd_losses(teacher_embeddings, student_embeddings)
    return options.distance_weight * distance + options.angle_weight * angle


@dataclasses.dataclass(frozen=True)
class RKDOptions:
    distance_weight: float = dataclasses.field(default=25.0, metadata={"help": "lambda_D, distance-wise loss weight"})
    angle_weight: float = dataclasses.field(default=50.0, metadata={"help": "lambda_A, angle-wise loss weight"})



@register
class RKD(Distiller):
    """Logged terms: `ce`, `distance` and `angle` (each already weighted)."""

    name = "rkd"
    summary = "RKD, relational KD (Park et al. 2019): CE + distance- and angle-wise relations of embeddings"
    Options = RKDOptions
    term_names = ("ce", "distance", "angle")
    teacher_outputs = ("embedding",)
    student_outputs = ("logits", "embedding")
    label_free_term = LabelFreeTerm(_label_free_term, ("distance_weight", "angle_weight"))
    single_replica = ("its terms relate every pair and triple of the batch, and each replica would see only its "
                      "share (measured: weights 0.35 apart after 2 epochs on 2 replicas)")

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        distance, angle = rkd_losses(self.targets(batch)["embedding"], outputs["embedding"])
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "distance": self.options.distance_weight * distance,
                "angle": self.options.angle_weight * angle}, outputs["logits"]
