"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

Student and teacher embeddings (`"embedding"`) are projected by trained linear
heads to d = `--crd-dim` units and L2-normalised: v_S = g_S(s), v_T = g_T(t). Two
memory banks keep one unit vector per training example, M_S (student side) and
M_T (teacher side). For example i with K negatives j ≠ i drawn uniformly from the
N training examples, and τ = `--crd-tau`:

    h(v, m) = exp(⟨v, m⟩ / τ) / Z          Z: mean of exp(⟨v, m⟩/τ) · N over the first batch, then fixed
    P(D=1 | h) = h / (h + K/N)              the data-vs-noise posterior of NCE
    L_NCE(v, M) = −log P(D=1 | h(v, M_i)) − Σ_j log(1 − P(D=1 | h(v, M_j)))
    L = CE(y, softmax(z_s)) + β · mean over i of [L_NCE(v_S, M_T) + L_NCE(v_T, M_S)]

After each step the banks move towards the batch: M_i ← normalise(μ M_i + (1 − μ) v_i),
μ = 0.5. β = 0.8, τ = 0.07, d = 128 as in the authors' code; K = `--crd-negatives`
(paper: 16,384 on CIFAR-100's 50,000 images; 4,096 here by default, and at most
N − 1, e.g. on MHIST's 1,850 training images). One set of K
negatives is drawn per batch and shared by its examples (the authors draw them per
example), which turns the K dot products per example into one matrix product.

Heads, banks, the constants Z and the negatives' random state are the method's
extra variables: trained or updated with the student and saved in epoch
checkpoints. The banks are not synchronised across replicas, so CRD needs
`--distribute none`.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from common import losses
from common.methods.base import Distiller


def nce_loss(positive, negatives, num_examples):
    """Mean NCE loss: `positive` `(batch,)` and `negatives` `(batch, K)` are scores h
    (already divided by Z) of the true pair and of K noise pairs; noise has
    probability 1/N per example."""
    k = tf.cast(tf.shape(negatives)[-1], tf.float32)
    noise = k / float(num_examples)
    eps = 1e-7
    log_d1 = tf.math.log(positive / (positive + noise + eps))
    log_d0 = tf.math.log(noise / (negatives + noise + eps))
    return -tf.reduce_mean(log_d1 + tf.reduce_sum(log_d0, axis=-1))


class ContrastMemory(keras.layers.Layer):
    """Projection heads g_S, g_T, memory banks M_S, M_T `(N, d)`, constants Z_S, Z_T."""

    def __init__(self, num_examples, dim, temperature, negatives, momentum=0.5, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.num_examples, self.dim = int(num_examples), int(dim)
        self.temperature, self.negatives, self.momentum = float(temperature), int(negatives), float(momentum)
        self.student_head = keras.layers.Dense(self.dim, name="student_head", dtype="float32")
        self.teacher_head = keras.layers.Dense(self.dim, name="teacher_head", dtype="float32")
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build_for(self, student_dim, teacher_dim):
        self.student_head.build((None, student_dim))
        self.teacher_head.build((None, teacher_dim))
        bound = 1.0 / math.sqrt(self.dim / 3.0)  # the authors' uniform initialisation
        init = keras.initializers.RandomUniform(-bound, bound, seed=0)
        self.student_memory = self.add_weight(shape=(self.num_examples, self.dim), initializer=init,
                                              trainable=False, name="student_memory")
        self.teacher_memory = self.add_weight(shape=(self.num_examples, self.dim), initializer=init,
                                              trainable=False, name="teacher_memory")
        self.z = self.add_weight(shape=(2,), initializer=keras.initializers.Constant(-1.0), trainable=False, name="z")
        self.built = True

    def scores(self, v, memory, index, negative_index, z_slot):
        """`(positive (batch,), negatives (batch, K))` scores h of `v` against `memory`."""
        positive = tf.exp(tf.reduce_sum(v * tf.gather(memory, index), axis=-1) / self.temperature)
        negatives = tf.exp(tf.matmul(v, tf.gather(memory, negative_index), transpose_b=True) / self.temperature)
        z = self.z[z_slot]
        z = tf.where(z < 0, tf.stop_gradient(tf.reduce_mean(negatives)) * self.num_examples, z)
        self.z.assign(tf.tensor_scatter_nd_update(self.z, [[z_slot]], [z]))
        return positive / z, negatives / z

    def update(self, memory, index, v):
        mixed = self.momentum * tf.gather(memory, index) + (1.0 - self.momentum) * tf.stop_gradient(v)
        memory.value.scatter_update(tf.IndexedSlices(tf.math.l2_normalize(mixed, axis=-1), index))

    def loss(self, student_embedding, teacher_embedding, index):
        v_s = tf.math.l2_normalize(self.student_head(tf.cast(student_embedding, tf.float32)), axis=-1)
        v_t = tf.math.l2_normalize(self.teacher_head(tf.cast(teacher_embedding, tf.float32)), axis=-1)
        index = tf.cast(index, tf.int32)
        negative_index = keras.random.randint((self.negatives,), 0, self.num_examples, seed=self.seed_generator)
        student_loss = nce_loss(*self.scores(v_s, self.teacher_memory, index, negative_index, 0), self.num_examples)
        teacher_loss = nce_loss(*self.scores(v_t, self.student_memory, index, negative_index, 1), self.num_examples)
        self.update(self.student_memory, index, v_s)
        self.update(self.teacher_memory, index, v_t)
        return student_loss + teacher_loss


@dataclasses.dataclass(frozen=True)
class CRDOptions:
    weight: float = dataclasses.field(default=0.8, metadata={"help": "beta, weight of the contrastive loss"})
    tau: float = dataclasses.field(default=0.07, metadata={"help": "temperature tau of the contrastive scores",
                                                           "exclusive": True})
    dim: int = dataclasses.field(default=128, metadata={"help": "units of the projection heads"})
    negatives: int = dataclasses.field(default=4096, metadata={"help": "K, negatives per batch"})



class CRD(Distiller):
    """Logged terms: `ce` and `crd` (already multiplied by β)."""

    name = "crd"
    summary = "contrastive representation distillation (Tian et al. 2020): CE + beta NCE with memory banks"
    Options = CRDOptions
    term_names = ("ce", "crd")
    teacher_outputs = ("embedding",)
    student_outputs = ("logits", "embedding")
    single_replica = True

    def __init__(self, student, options=None, context=None, teacher=None):
        super().__init__(student, options, context, teacher)
        self.memory = None
        self.extra_layers = ()

    def build_extras(self, teacher_shapes):
        o = self.options
        negatives = min(o.negatives, self.context.num_examples - 1)  # a small set has fewer others to contrast
        self.memory = ContrastMemory(self.context.num_examples, o.dim, o.tau, negatives, name="crd", dtype="float32")
        self.memory.build_for(self.student_shapes()["embedding"][-1], teacher_shapes["embedding"][-1])
        self.extra_layers = (self.memory,)

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        crd = self.memory.loss(outputs["embedding"], self.targets(batch)["embedding"], batch["index"])
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "crd": self.options.weight * crd}, outputs["logits"]


METHOD = CRD
