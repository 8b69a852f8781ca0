"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

Student and teacher embeddings (`"embedding"`) are projected by trained linear
heads to d = `--crd-dim` units and L2-normalised: v_S = g_S(s), v_T = g_T(t). Two
memory banks keep one vector per training example, M_S (student side) and M_T
(teacher side). For anchor i (label y_i) with K negatives j drawn from the
training examples of *other* classes, and τ = `--crd-tau`:

    h(v, m) = exp(⟨v, m⟩ / τ) / Z          Z: N · mean of exp(⟨v, m⟩/τ) over the K + 1 columns
                                            (positive and negatives) of the first batch, then fixed
    P(D=1 | h) = h / (h + K/N)              the data-vs-noise posterior of NCE
    L_NCE(v, M) = −log P(D=1 | h(v, M_i)) − Σ_j log(1 − P(D=1 | h(v, M_j)))
    L = CE(y, softmax(z_s)) + β · mean over i of [L_NCE(v_S, M_T) + L_NCE(v_T, M_S)]

After each step the banks move towards the batch: M_i ← normalise(μ M_i + (1 − μ) v_i),
μ = 0.5. The banks start as two independent uniform draws in ±1/√(d/3).

Reference: RepDistiller (HobbitLong/RepDistiller) `crd/memory.py`
(`ContrastMemory`), `crd/criterion.py` (`ContrastLoss`, `Embed`) and
`dataset/cifar100.py` (`CIFAR100InstanceSample`, mode "exact": the positive is
the anchor itself, the K negatives are drawn from the other classes' examples,
without replacement unless K exceeds their number); its defaults β = 0.8
(`-b 0.8`), τ = 0.07, μ = 0.5, d = 128. K = `--crd-negatives`: 16,384 there (CIFAR-100's
50,000 images), 4,096 here by default (stated deviation: the course's 12-epoch runs on a
CPU; a smaller K gives a noisier estimate of the same contrastive objective).

Sampling (`ContrastMemory.negatives_in_pool`): each anchor gets exactly K negatives of
other classes, never itself, distinct unless its class leaves fewer than K
others (then drawn with replacement, as the reference does). Each step draws one
pool of min(N, K + largest class) examples in random order (without
replacement), which always holds at least K of any class's others; an anchor
takes K of them that follow one another in that order (cyclically) from a random
start. Every anchor's K-set is thus a uniform draw from its other-class
examples, as in the reference; the anchors of a batch share the pool (their
sets overlap more than independent draws would), and the scores are one
`(batch, pool)` matrix product instead of a `(batch, K, d)` gather per bank.

Heads, banks, the constants Z and the negatives' random state are the method's
extra variables: trained or updated with the student and saved in epoch
checkpoints. The banks are not synchronised across replicas, so CRD needs
`--distribute none`.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, register


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
    """Projection heads g_S, g_T, memory banks M_S, M_T `(N, d)`, constants Z_S, Z_T,
    and the negatives' sampler over the training labels `labels` `(N,)`."""

    def __init__(self, labels, dim, temperature, negatives, momentum=0.5, seed=0, **kwargs):
        super().__init__(**kwargs)
        labels = np.asarray(labels).reshape(-1).astype(np.int32)
        self.num_examples, self.dim = len(labels), int(dim)
        self.temperature, self.negatives, self.momentum = float(temperature), int(negatives), float(momentum)
        self.seed = int(seed)
        classes = int(labels.max()) + 1
        counts = np.bincount(labels, minlength=classes)
        if np.any(self.num_examples - counts[np.unique(labels)] < 1):
            raise ValueError("crd needs training examples of at least two classes")
        self.pool_size = int(min(self.num_examples, self.negatives + counts.max()))
        # Classes whose other-class examples number fewer than K are sampled with replacement.
        self.replace = self.num_examples - counts < self.negatives
        self.labels = tf.constant(labels)
        order = np.argsort(labels, kind="stable").astype(np.int32)
        self.sorted_index, self.sorted_labels = tf.constant(order), tf.constant(labels[order])
        self.class_counts = tf.constant(counts.astype(np.int32))
        self.class_starts = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32))
        self.replace_by_class = tf.constant(self.replace)
        self.student_head = keras.layers.Dense(self.dim, name="student_head", dtype="float32")
        self.teacher_head = keras.layers.Dense(self.dim, name="teacher_head", dtype="float32")
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build_for(self, student_dim, teacher_dim):
        self.student_head.build((None, student_dim))
        self.teacher_head.build((None, teacher_dim))
        bound = 1.0 / math.sqrt(self.dim / 3.0)  # the reference's uniform initialisation, one draw per bank
        self.student_memory = self.add_weight(
            shape=(self.num_examples, self.dim), trainable=False, name="student_memory",
            initializer=keras.initializers.RandomUniform(-bound, bound, seed=2 * self.seed))
        self.teacher_memory = self.add_weight(
            shape=(self.num_examples, self.dim), trainable=False, name="teacher_memory",
            initializer=keras.initializers.RandomUniform(-bound, bound, seed=2 * self.seed + 1))
        self.z = self.add_weight(shape=(2,), initializer=keras.initializers.Constant(-1.0), trainable=False, name="z")
        self.built = True

    def negatives_in_pool(self, anchor_labels):
        """`(pool (P,), positions (batch, K))`: a pool of example indices and, for each
        anchor, the positions in it of its K negatives (see the module docstring)."""
        batch, k = tf.shape(anchor_labels)[0], self.negatives
        if self.pool_size == self.num_examples:  # every example, sorted by class
            pool, pool_labels = self.sorted_index, self.sorted_labels
        else:
            pool = keras.random.shuffle(tf.range(self.num_examples), seed=self.seed_generator)[: self.pool_size]
            pool_labels = tf.gather(self.labels, pool)
        positions = None
        if not self.replace.all():  # distinct: K cyclically consecutive other-class entries of the pool
            classes = tf.range(tf.shape(self.class_counts)[0])
            other = tf.cast(pool_labels[None, :] != classes[:, None], tf.int32)  # (classes, P)
            in_order = tf.argsort(1 - other, axis=1, stable=True)  # each class's other-class positions first
            available = tf.gather(tf.reduce_sum(other, axis=1), anchor_labels)[:, None]  # >= K (the pool's size)
            start = tf.cast(keras.random.uniform((batch, 1), seed=self.seed_generator)
                            * tf.cast(available, tf.float32), tf.int32)
            ranks = (start + tf.range(k)[None, :]) % available
            positions = tf.gather(tf.gather(in_order, anchor_labels), ranks, batch_dims=1)
        if self.replace.any():  # with replacement, uniform over the other classes (pool = all, by class)
            count = tf.gather(self.class_counts, anchor_labels)[:, None]
            start = tf.gather(self.class_starts, anchor_labels)[:, None]
            draws = keras.random.uniform((batch, k), seed=self.seed_generator)
            offset = tf.minimum(tf.cast(draws * tf.cast(self.num_examples - count, tf.float32), tf.int32),
                                self.num_examples - count - 1)
            with_replacement = offset + tf.where(offset >= start, count, 0)
            replace = tf.gather(self.replace_by_class, anchor_labels)[:, None]
            positions = with_replacement if positions is None else tf.where(replace, with_replacement, positions)
        return pool, positions

    def negative_indices(self, index):
        """`(batch, K)` example indices of the negatives of the anchors `index` (one draw)."""
        pool, positions = self.negatives_in_pool(tf.gather(self.labels, index))
        return tf.gather(pool, positions)

    def scores(self, v, memory, index, pool, positions, z_slot):
        """`(positive (batch,), negatives (batch, K))` scores h of `v` against `memory`."""
        positive = tf.exp(tf.reduce_sum(v * tf.gather(memory, index), axis=-1) / self.temperature)
        pooled = tf.matmul(v, tf.gather(memory, pool), transpose_b=True) / self.temperature
        negatives = tf.exp(tf.gather(pooled, positions, batch_dims=1))
        z = self.z[z_slot]
        first = tf.reduce_mean(tf.concat([positive[:, None], negatives], axis=1)) * self.num_examples
        z = tf.where(z < 0, tf.stop_gradient(first), z)
        self.z.assign(tf.tensor_scatter_nd_update(self.z, [[z_slot]], [z]))
        return positive / z, negatives / z

    def update(self, memory, index, v):
        mixed = self.momentum * tf.gather(memory, index) + (1.0 - self.momentum) * tf.stop_gradient(v)
        memory.value.scatter_update(tf.IndexedSlices(tf.math.l2_normalize(mixed, axis=-1), index))

    def loss(self, student_embedding, teacher_embedding, index):
        v_s = tf.math.l2_normalize(self.student_head(tf.cast(student_embedding, tf.float32)), axis=-1)
        v_t = tf.math.l2_normalize(self.teacher_head(tf.cast(teacher_embedding, tf.float32)), axis=-1)
        index = tf.cast(index, tf.int32)
        pool, positions = self.negatives_in_pool(tf.gather(self.labels, index))
        student_loss = nce_loss(*self.scores(v_s, self.teacher_memory, index, pool, positions, 0), self.num_examples)
        teacher_loss = nce_loss(*self.scores(v_t, self.student_memory, index, pool, positions, 1), self.num_examples)
        self.update(self.student_memory, index, v_s)
        self.update(self.teacher_memory, index, v_t)
        return student_loss + teacher_loss


@dataclasses.dataclass(frozen=True)
class CRDOptions:
    weight: float = dataclasses.field(default=0.8, metadata={"help": "beta, weight of the contrastive loss"})
    tau: float = dataclasses.field(default=0.07, metadata={"help": "temperature tau of the contrastive scores",
                                                           "exclusive": True})
    dim: int = dataclasses.field(default=128, metadata={"help": "units of the projection heads"})
    negatives: int = dataclasses.field(default=4096, metadata={"help": "K, negatives per anchor"})


@register
class CRD(Distiller):
    """Logged terms: `ce` and `crd` (already multiplied by β)."""

    name = "crd"
    summary = "CRD, contrastive representation distillation (Tian et al. 2020): CE + beta NCE with memory banks"
    Options = CRDOptions
    term_names = ("ce", "crd")
    teacher_outputs = ("embedding",)
    student_outputs = ("logits", "embedding")
    single_replica = "its memory banks are not synchronised across replicas"
    per_example = True

    def __init__(self, student, options=None, context=None, teacher=None):
        super().__init__(student, options, context, teacher)
        self.memory = None
        self.extra_layers = ()

    def build_extras(self, teacher_shapes):
        o = self.options
        if self.context is None or self.context.labels is None:
            raise ValueError("crd draws its negatives from other classes: pass Context(labels=<training labels>)")
        self.memory = ContrastMemory(self.context.labels, o.dim, o.tau, o.negatives, name="crd", dtype="float32")
        self.memory.build_for(self.student_shapes()["embedding"][-1], teacher_shapes["embedding"][-1])
        self.extra_layers = (self.memory,)

    def loss_terms(self, batch, training=True):
        outputs = self.student(batch["x"], training)
        crd = self.memory.loss(outputs["embedding"], self.targets(batch)["embedding"], batch["index"])
        return {"ce": losses.teacher_loss(batch["y"], outputs["logits"]),
                "crd": self.options.weight * crd}, outputs["logits"]
