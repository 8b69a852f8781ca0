"""Comprehensive KD with causal intervention, CID (Deng & Zhang, NeurIPS 2021).

With f_s, f_t the student's and teacher's penultimate features (`"embedding"`,
`(batch, d_s)` and `(batch, d_t)`), z_s, z_t their logits, y the labels, T the
temperature and W a trained linear regressor d_s -> d_t:

    L_kd     = T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))                       (batch mean)
    L_sample = mean over i of ‖W f_s,i − f_t,i‖² / ‖f_t,i‖²                 normalised MSE
    L_class  = mean over the classes k with ≥ 2 examples in the batch of
               ‖G_t^k − G_s^k‖²_F / n_k²,   G^k = F̂_k F̂_kᵀ                  F̂_k: that class's
                                                                            L2-normalised rows
    L_ce     = CE(y, g([f_s ; softmax(z_s/T)ᵀ · D]))                        (after the first epochs)
    L        = a · (L_kd + L_ce) + b · L_sample + c · L_class

The intervention: D `(K, d_s)` is a dictionary of class prototypes, row k the
mean of the student's features (gradients stopped) over one epoch's training
examples of class k, each weighted by the teacher's softened probability of its
label, softmax(z_t/T)_y. It is first accumulated in epoch `init_epochs`; from
the next epoch on, each epoch uses the dictionary of the one before
(D ← u · D + (1 − u) · D_new, u = `--cid-dictionary-momentum`) and trains the
new head g (Dense 2·d_s -> K) by L_ce. The gradient of L_ce reaches f_s, not
z_s (the softmax over z_s is detached). The student's own logits get no
cross-entropy, only L_kd. The trained student predicts through g with the
saved dictionary; before g trains it predicts with z_s.

Reference: the authors' code, Xiang-Deng-DL/CID: `helper/loops.py`
(`train_distill`, `train_distill_context`, `validate_st`),
`distiller_zoo/mse_norm.py` (L_sample), `distiller_zoo/COS.py` (L_class),
`distiller_zoo/kl_div.py` (L_kd), `models/util.py` (`Reg`: W and g are plain
linear layers) and `train_student.py` / `train_scripts.sh` for the constants:
a = 1, T = 4, u = 0 and 20 initial epochs of 240. b and c are set per pair
there; the defaults here are its ResNet50 -> MobileNetV2 pair (b = 33,
c = 0.1), Task 2's pair. The reference has no pair of a CNN teacher and an MLP
student, so Task 1 uses the same values (stated choice). `init_epochs` is 1:
20 of 240 is one twelfth, one of the course's 12 epochs.

Deviations and choices: the dictionary's weighted running mean is accumulated
as two sums (Σ w f and Σ w per class), which is the same mean in any order;
a class absent from an epoch has a zero row, as in the reference. The reference
optimises with SGD and weight decay; the course's Adam schedule is kept.

Deployment: `prediction_head` makes g and D part of the trained student, an
`Intervention` layer on the student's `(embedding, logits)`: the run's saved
weights, its evaluation, its FLOPs and its TFLite files all include them.
`Intervention.active` (0 before g trains, 1 after) is saved with them, so a
student trained for no more than `init_epochs` epochs predicts with z_s.
`kdtoolkit.deployed.plain_keras` gives the same predictions from Keras'
built-in layers alone (`Intervention.builtin_outputs`), a `.keras` file that
loads without this toolkit.
"""

import dataclasses

import keras
import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, register, temperature_field


def normalised_mse(regressed, teacher_features):
    """Batch mean of ‖W f_s − f_t‖² / ‖f_t‖² over `(batch, d_t)` rows (reference `NORM_MSE`)."""
    regressed, teacher_features = tf.cast(regressed, tf.float32), tf.cast(teacher_features, tf.float32)
    squared = tf.reduce_sum(tf.square(regressed - teacher_features), axis=-1)
    return tf.reduce_mean(squared / tf.reduce_sum(tf.square(teacher_features), axis=-1))


def class_similarity_loss(student_features, teacher_features, labels):
    """Mean over the classes with at least two examples in the batch of the squared
    Frobenius distance between their within-class Gram matrices of L2-normalised
    features, divided by the class's count squared (reference `Cosine` on each
    class's rows); 0 when no class has two examples."""
    s = tf.math.l2_normalize(tf.cast(student_features, tf.float32), axis=-1)
    t = tf.math.l2_normalize(tf.cast(teacher_features, tf.float32), axis=-1)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    same = tf.cast(tf.equal(labels[:, None], labels[None, :]), tf.float32)  # (batch, batch)
    count = tf.reduce_sum(same, axis=1)  # each example's class count in the batch
    weight = same * tf.cast(count >= 2, tf.float32)[:, None] / tf.square(count)[:, None]
    gram_difference = tf.matmul(t, t, transpose_b=True) - tf.matmul(s, s, transpose_b=True)
    total = tf.reduce_sum(weight * tf.square(gram_difference))
    classes = tf.reduce_sum(tf.cast(count >= 2, tf.float32) / count)  # each such class once
    return tf.math.divide_no_nan(total, classes)


def class_sums(features, weights, labels, num_classes):
    """`(Σ_i w_i f_i per class (K, d), Σ_i w_i per class (K,))` of a batch."""
    one_hot = tf.one_hot(tf.reshape(tf.cast(labels, tf.int32), [-1]), num_classes) * tf.cast(weights, tf.float32)[:, None]
    return tf.matmul(one_hot, tf.cast(features, tf.float32), transpose_a=True), tf.reduce_sum(one_hot, axis=0)


@keras.saving.register_keras_serializable(package="kd_toolkit")
class Intervention(keras.layers.Layer):
    """CID's deployed prediction: `[embedding (batch, d), logits (batch, K)] ->
    (batch, K)` class logits, g([f; softmax(z/T)ᵀ · D]) when `active`, else z.
    Holds g (a Dense layer), the dictionary D `(K, d)` and `active`."""

    def __init__(self, num_classes, temperature, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.temperature = int(num_classes), float(temperature)
        self.head = keras.layers.Dense(self.num_classes, name="g", dtype="float32")

    def build(self, input_shape):
        dim = int(input_shape[0][-1])
        self.head.build((None, 2 * dim))
        self.dictionary = self.add_weight(shape=(self.num_classes, dim), initializer="zeros", trainable=False,
                                          name="dictionary")
        self.active = self.add_weight(shape=(), initializer="zeros", trainable=False, name="active")

    def intervened(self, embedding, logits):
        """g([f; softmax(stop_gradient(z)/T)ᵀ · D]): `(batch, K)`."""
        probabilities = tf.nn.softmax(tf.stop_gradient(tf.cast(logits, tf.float32)) / self.temperature)
        context = tf.matmul(probabilities, tf.cast(self.dictionary, tf.float32))
        return self.head(tf.concat([tf.cast(embedding, tf.float32), context], axis=-1))

    def call(self, inputs):
        embedding, logits = inputs
        return tf.where(self.active > 0, self.intervened(embedding, logits), tf.cast(logits, tf.float32))

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "temperature": self.temperature}

    def builtin_outputs(self, embedding, logits):
        """This layer's current prediction on symbolic `embedding (batch, d)` and `logits
        (batch, K)` in Keras' built-in layers only, float32 (`kdtoolkit.deployed.plain_keras`):
        when `active`, Rescaling(1/T) -> Softmax -> Dense(d, no bias; kernel D (K, d)) the
        context (batch, d), Concatenate([embedding, context]) (batch, 2d) -> Dense(K; g's
        kernel (2d, K) and bias); else the logits. Weights are copied: later training of
        this layer does not change them."""
        if float(keras.ops.convert_to_numpy(self.active)) <= 0:
            if logits.dtype == "float32":
                return logits
            return keras.layers.Identity(dtype="float32", name=f"{self.name}_logits")(logits)
        layers = keras.layers
        dim = int(self.dictionary.shape[-1])
        scaled = layers.Rescaling(1.0 / self.temperature, dtype="float32", name=f"{self.name}_scale")(logits)
        probabilities = layers.Softmax(dtype="float32", name=f"{self.name}_probabilities")(scaled)
        context_layer = layers.Dense(dim, use_bias=False, dtype="float32", name=f"{self.name}_context")
        context = context_layer(probabilities)
        joined = layers.Concatenate(dtype="float32", name=f"{self.name}_concat")([embedding, context])
        head = layers.Dense(self.num_classes, dtype="float32", name=f"{self.name}_g")
        outputs = head(joined)
        context_layer.set_weights([keras.ops.convert_to_numpy(self.dictionary)])
        head.set_weights([keras.ops.convert_to_numpy(w) for w in (self.head.kernel, self.head.bias)])
        return outputs


class Dictionary(keras.layers.Layer):
    """The training side of the intervention: one epoch's per-class sums of weighted
    features and of weights, whether this epoch accumulates, and the last epoch
    whose sums were folded into D (so a resumed epoch folds once)."""

    def __init__(self, num_classes, dim, **kwargs):
        super().__init__(**kwargs)
        self.sums = self.add_weight(shape=(num_classes, dim), initializer="zeros", trainable=False, name="sums")
        self.weights_sum = self.add_weight(shape=(num_classes,), initializer="zeros", trainable=False,
                                           name="weights_sum")
        self.accumulating = self.add_weight(shape=(), initializer="zeros", trainable=False, name="accumulating")
        self.folded = self.add_weight(shape=(), initializer="zeros", trainable=False, name="folded")
        self.built = True

    def accumulate(self, features, weights, labels):
        sums, total = class_sums(tf.stop_gradient(features), tf.stop_gradient(weights), labels, self.sums.shape[0])
        self.sums.assign_add(self.accumulating * sums)
        self.weights_sum.assign_add(self.accumulating * total)

    def means(self):
        """`(K, d)`: the weighted mean feature of each class (0 for an absent class)."""
        return tf.math.divide_no_nan(self.sums, self.weights_sum[:, None])

    def reset(self):
        self.sums.assign(tf.zeros_like(self.sums))
        self.weights_sum.assign(tf.zeros_like(self.weights_sum))


@dataclasses.dataclass(frozen=True)
class CIDOptions:
    temperature: float = temperature_field()
    kd_weight: float = dataclasses.field(default=1.0, metadata={"help": "a, weight of the KL and the head's CE"})
    sample_weight: float = dataclasses.field(default=33.0, metadata={
        "help": "b, weight of the normalised feature MSE"})
    class_weight: float = dataclasses.field(default=0.1, metadata={
        "help": "c, weight of the within-class similarity term"})
    init_epochs: int = dataclasses.field(default=1, metadata={
        "help": "epochs before the intervention head trains (its dictionary is built in the last of them)"})
    dictionary_momentum: float = dataclasses.field(default=0.0, metadata={
        "help": "u: the dictionary is u * old + (1 - u) * the last epoch's", "maximum": 1.0})


@register
class CID(Distiller):
    """Logged terms: `kd`, `ce` (the head's, 0 before it trains), `sample` and `class`, each weighted."""

    name = "cid"
    summary = ("CID (Deng & Zhang 2021): KD + normalised feature MSE + within-class similarity, and a "
               "class-dictionary intervention head the student predicts through")
    Options = CIDOptions
    term_names = ("kd", "ce", "sample", "class")
    teacher_outputs = ("logits", "embedding")
    student_outputs = ("logits", "embedding")
    single_replica = "its class dictionary's sums are not synchronised across replicas"

    @classmethod
    def prediction_head(cls, options, num_classes):
        return Intervention(num_classes, options.temperature, name="cid_intervention")

    def __init__(self, student, options=None, context=None, teacher=None, **values):
        super().__init__(student, options, context, teacher, **values)
        # A student without the head (Task 2's feature-extraction phase) predicts with its logits.
        self.intervention = next((layer for layer in student.layers if isinstance(layer, Intervention)), None)
        self.regressor = self.dictionary = None
        self.extra_layers = ()

    def build_extras(self, teacher_shapes):
        if self.intervention is None:
            return
        dim = self.student_shapes()["embedding"][-1]
        self.regressor = keras.layers.Dense(teacher_shapes["embedding"][-1], name="cid_regressor", dtype="float32")
        self.regressor.build((None, dim))
        self.dictionary = Dictionary(self.intervention.num_classes, dim, name="cid_dictionary", dtype="float32")
        self.extra_layers = (self.regressor, self.dictionary)

    def begin_epoch(self, epoch, epochs):
        """Accumulates from epoch `init_epochs` on; from the next, folds the last epoch's
        means into D (once per epoch) and trains g."""
        o = self.options
        if self.intervention is None:
            return
        self.dictionary.accumulating.assign(1.0 if epoch >= o.init_epochs else 0.0)
        if epoch > o.init_epochs and int(self.dictionary.folded.numpy()) < epoch:
            keep = 0.0 if epoch == o.init_epochs + 1 else o.dictionary_momentum
            self.intervention.dictionary.assign(keep * self.intervention.dictionary + (1.0 - keep)
                                                * self.dictionary.means())
            self.dictionary.reset()
            self.dictionary.folded.assign(float(epoch))
            self.intervention.active.assign(1.0)

    def loss_terms(self, batch, training=True):
        if self.intervention is None:
            raise ValueError("cid trains a student that predicts through its Intervention layer: build it with "
                             "kdtoolkit.deployed.with_head(student, CID.prediction_head(...), feature_model)")
        o = self.options
        outputs, targets = self.student(batch["x"], training), self.targets(batch)
        logits, features = tf.cast(outputs["logits"], tf.float32), tf.cast(outputs["embedding"], tf.float32)
        teacher_probabilities = tf.nn.softmax(tf.cast(targets["logits"], tf.float32) / o.temperature)
        labels = tf.reshape(tf.cast(batch["y"], tf.int32), [-1])
        self.dictionary.accumulate(features, tf.gather(teacher_probabilities, labels, batch_dims=1), labels)
        head_logits = self.intervention.intervened(features, logits)
        active = self.intervention.active
        terms = {
            "kd": o.kd_weight * losses.distillation_loss(targets["logits"], logits, o.temperature),
            "ce": o.kd_weight * active * losses.teacher_loss(labels, head_logits),
            "sample": o.sample_weight * normalised_mse(self.regressor(features), targets["embedding"]),
            "class": o.class_weight * class_similarity_loss(features, targets["embedding"], labels),
        }
        return terms, tf.where(active > 0, head_logits, logits)
