"""Label smoothing (Szegedy et al. 2016, §7), the teacher-free baseline of
distillation (Müller, Kornblith & Hinton 2019; Yuan et al. 2020).

With K classes, label y and smoothing ε, the target is the one-hot label mixed
with the uniform distribution:

    q_k = (1 − ε) · [k = y] + ε / K
    L   = − Σ_k q_k · log softmax(z_s)_k

ε = `--ls-epsilon` (default 0.1, the paper's value, also Müller et al.'s). The
formula is Keras' `CategoricalCrossentropy(label_smoothing=ε)`
(keras-team/keras `keras/src/losses/losses.py`, `categorical_crossentropy`), on
integer labels. It reads no teacher: its run trains without one, and KD at a
high temperature from an over-confident teacher is close to it (the soft target
is then nearly uniform over the wrong classes).
"""

import dataclasses

import tensorflow as tf

from kdtoolkit.methods.base import Distiller, register


def smoothed_cross_entropy(labels, logits, epsilon):
    """Batch mean of the cross-entropy of `(batch, K)` logits against the smoothed targets."""
    logits = tf.cast(logits, tf.float32)
    classes = tf.shape(logits)[-1]
    target = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), classes)
    target = (1.0 - epsilon) * target + epsilon / tf.cast(classes, tf.float32)
    return tf.reduce_mean(-tf.reduce_sum(target * tf.nn.log_softmax(logits), axis=-1))


@dataclasses.dataclass(frozen=True)
class LSOptions:
    epsilon: float = dataclasses.field(default=0.1, metadata={"help": "label smoothing epsilon", "maximum": 1.0})


@register
class LabelSmoothing(Distiller):
    """Logged term: `ls_ce`, the smoothed cross-entropy (the whole loss)."""

    name = "ls"
    summary = "label smoothing (Szegedy et al. 2016): CE against (1 - eps) one-hot + eps / K, no teacher"
    Options = LSOptions
    term_names = ("ls_ce",)
    teacher_outputs = ()

    def loss_terms(self, batch, training=True):
        logits = self.student(batch["x"], training)["logits"]
        return {"ls_ce": smoothed_cross_entropy(batch["y"], logits, self.options.epsilon)}, logits
