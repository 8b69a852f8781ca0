"""DIST, knowledge distillation from a stronger teacher (Huang, You, Wang, Qian &
Xu, NeurIPS 2022).

KD's exact match of probabilities is replaced by a match of relations, measured
by the Pearson correlation ρ(u, v) = cos(u − ū, v − v̄). With the softened
probabilities Y^s = softmax(z_s / τ) and Y^t = softmax(z_t / τ), both (B, C)
for a batch of B examples and C classes:

    inter = 1 − (1/B) Σ_i ρ(Y^s_i,:, Y^t_i,:)     inter-class relation, per example
    intra = 1 − (1/C) Σ_j ρ(Y^s_:,j, Y^t_:,j)     intra-class relation, per class across the batch
    L     = CE(y, softmax(z_s)) + w · τ² · (β · inter + γ · intra)

The reference is the authors' code: hunto/DIST_KD, whose classification code is
its submodule hunto/image_classification_sota, `lib/models/losses/dist_kd.py`
(`DIST`, `pearson_correlation`: cosine similarity of the centred vectors with
ε = 1e-8 added to the product of the norms, as here), wrapped by
`lib/models/losses/kd_loss.py` (`KDLoss`: `ori_loss * ori_loss_weight +
kd_loss * kd_loss_weight`). Defaults, from the reference's CIFAR-100 recipe
`configs/strategies/distill/dist_cifar.yaml` (`kd: dist_t4`,
`ori_loss_weight: 1`, `kd_loss_weight: 2`): β = 1 (`--dist-beta`), γ = 1
(`--dist-gamma`), τ = 4 (`--temperature`, the shared option, whose task default
is also 4), w = 2 (`--dist-weight`), and the cross-entropy weighted 1 (its
`smoothing: 0.0`). The reference's ImageNet recipes (`resnet_dist.yaml`,
`dist_b2.yaml`, `kd: dist`) use τ = 1 with the same weights: `--temperature 1`.

The intra-class term correlates each class's probabilities across the examples
of the batch, so its value depends on the whole batch: the method runs on one
replica (`single_replica`). A class whose probabilities are equal over the batch
(a batch of one example) has a centred vector of zeros: its correlation is 0
(as in the reference, 0 / ε), with a zero gradient here where the square root
of a zero norm would give NaN.

`--dist-standardize` (off by default): logit standardization (Sun et al., CVPR
2024; `losses.standardize_logits`, from sunshangquan/logit-standardization-KD
`mdistiller/distillers/KD.py` `normalize`) of both logits before τ, with τ the
`--temperature` (the reference's base temperature for KD and DKD is 2). The
reference does not apply it to DIST: this is the same pre-processing, with DIST's
own weights unchanged (no reference weight exists for it).
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, register, standardize_field, temperature_field

EPSILON = 1e-8  # the reference's `eps` of cosine_similarity / pearson_correlation


def _norm(x):
    """Euclidean norm of each row of `x`, with a zero (not NaN) gradient at a zero row."""
    return losses.safe_sqrt(tf.reduce_sum(tf.square(x), axis=1))


def pearson_correlation(a, b, eps=EPSILON):
    """`(n,)` Pearson correlation of each row of `(n, d)` tensors `a` and `b`:
    cos of the row-centred vectors, ε added to the product of their norms."""
    a = a - tf.reduce_mean(a, axis=1, keepdims=True)
    b = b - tf.reduce_mean(b, axis=1, keepdims=True)
    return tf.reduce_sum(a * b, axis=1) / (_norm(a) * _norm(b) + eps)


def dist_relations(student_logits, teacher_logits, temperature):
    """`(inter, intra)`: 1 − the mean correlation of the softened probabilities per
    example (rows) and per class across the batch (columns); no τ², no weights."""
    temperature = losses.validate_temperature(temperature)
    student = tf.nn.softmax(tf.cast(student_logits, tf.float32) / temperature, axis=-1)
    teacher = tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / temperature, axis=-1)
    inter = 1.0 - tf.reduce_mean(pearson_correlation(student, teacher))
    intra = 1.0 - tf.reduce_mean(pearson_correlation(tf.transpose(student), tf.transpose(teacher)))
    return inter, intra


@dataclasses.dataclass(frozen=True)
class DISTOptions:
    temperature: float = temperature_field(4.0)
    beta: float = dataclasses.field(default=1.0, metadata={"help": "beta, weight of the inter-class relation"})
    gamma: float = dataclasses.field(default=1.0, metadata={"help": "gamma, weight of the intra-class relation"})
    weight: float = dataclasses.field(default=2.0, metadata={
        "help": "weight of the whole DIST loss (the reference's kd_loss_weight); CE is weighted 1"})
    standardize: bool = standardize_field("DIST's own weights unchanged (no reference covers DIST)")


@register
class DIST(Distiller):
    """Logged terms: `ce`, `inter` and `intra` (each already multiplied by its
    weight, w and τ²)."""

    name = "dist"
    summary = "DIST (Huang et al. 2022): CE + w T^2 (beta inter-class + gamma intra-class 1 - Pearson of softened logits)"
    Options = DISTOptions
    term_names = ("ce", "inter", "intra")
    single_replica = ("its intra-class term correlates each class's probabilities across the whole batch, and each "
                      "replica would see only its share")

    def loss_terms(self, batch, training=True):
        logits = self.student(batch["x"], training)["logits"]
        options = self.options
        teacher, student = losses.standardized(self.targets(batch)["logits"], logits, options.standardize)
        inter, intra = dist_relations(student, teacher, options.temperature)
        scale = options.weight * options.temperature**2
        return {"ce": losses.teacher_loss(batch["y"], logits),
                "inter": scale * options.beta * inter,
                "intra": scale * options.gamma * intra}, logits
