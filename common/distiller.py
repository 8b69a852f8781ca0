"""The library entry point: distil any Keras teacher into any Keras student with
any registered method, through `compile` / `fit` / `evaluate` / `predict`.

    distiller = Distiller(teacher, student, method="dkd", temperature=4)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    distiller.fit(x_train, y_train, epochs=12, batch_size=256, callbacks=[...])
    distiller.student  # the trained student

`fit` takes what Keras' `fit` takes for data: NumPy arrays (or tensors) with
integer labels, or a `tf.data.Dataset` of `(x, y)` batches. Before training it
reads the data once and runs the frozen teacher once per example (one pass: a
dataset's augmentation is drawn once), caching what the method reads of it
(logits, an embedding, attention maps); every epoch then reshuffles those
examples with their cached targets, and the teacher never runs per step. With
`cache_teacher=False` the teacher runs on every batch instead (for data that
does not fit in memory, or fresh augmentations each epoch).

Each training step is one `tf.GradientTape` step over the method's loss terms
(`Method.loss_terms`), the same terms the course tasks minimise; `fit`'s logs
hold each term, the loss and the compiled metrics on the student's logits.
Feature methods find their layers by name on functional and Sequential models
(`teacher_features` / `student_features`: `{"embedding": "dense_1"}`); by default
`"embedding"` is the input of the model's last layer (the penultimate
activations), `"spatial"` the output of its last layer with a 4-D output, and
`"hint"` (FitNets) the spatial map where both models have one, else the
embedding.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from common import deployed, losses, methods, training
from common.data import untuned
from common.errors import ConfigError
from common.methods import at as at_method
from common.methods import rkd as rkd_method

def layer_output(model, layer):
    """The symbolic output of `layer` (a name or an index) of a built functional or
    Sequential `model`; raises `ConfigError` naming the layers when there is none."""
    try:
        return (model.get_layer(layer) if isinstance(layer, str) else model.layers[layer]).output
    except (ValueError, IndexError):
        names = ", ".join(l.name for l in model.layers)
        raise ConfigError(f"{model.name} has no layer {layer!r}; its layers are {names}") from None


def default_features(model):
    """`{"embedding", "spatial" (if any)}` symbolic tensors of `model` (see the module docstring)."""
    found = {"embedding": model.layers[-1].input}
    maps = [l for l in model.layers if len(l.output.shape) == 4]
    if maps:
        found["spatial"] = maps[-1].output
    return found


def feature_model(model, wanted, named=None, hint_from=None):
    """`x -> {name: tensor}` for each of `wanted` (`"logits"`, `"embedding"`,
    `"spatial"`, `"hint"`) sharing `model`'s layers; `named` overrides the default
    layer of a name; `hint_from`: which of `"spatial"` / `"embedding"` is the hint."""
    named = dict(named or {})
    if not model.built or not model.inputs:
        raise ConfigError(f"{model.name} is not a built functional or Sequential model: give it an Input first")
    defaults = default_features(model)
    outputs = {}
    for name in wanted:
        key = hint_from if name == "hint" and "hint" not in named else name
        if name == "logits":
            outputs[name] = model.outputs[0]
        elif name in named:
            outputs[name] = layer_output(model, named[name])
        elif key in named:
            outputs[name] = layer_output(model, named[key])
        elif key in defaults:
            outputs[name] = defaults[key]
        else:
            raise ConfigError(f"{model.name} has no 4-D feature map for {name!r}: name a layer, e.g. "
                              f"features={{'{name}': '<layer name>'}}")
    return keras.Model(model.inputs, outputs, name=f"{model.name}_features")


def method_options(method, options):
    """The `Options` of registered `method` from `Distiller`'s keyword arguments; a bad
    or unknown one is a `ConfigError` naming what the method takes."""
    try:
        return methods.make_options(method, options)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def as_arrays(x, y):
    """`(x, y)` as NumPy arrays from arrays, tensors or a dataset of `(x, y)` batches
    (read once, in its order)."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ConfigError("give the labels inside the dataset, as (x, y) batches, not as y")
        xs, ys = [], []
        for element in x:
            if not isinstance(element, (tuple, list)) or len(element) != 2:
                raise ConfigError("a dataset for Distiller.fit must yield (x, y) batches")
            xs.append(np.asarray(element[0]))
            ys.append(np.asarray(element[1]))
        return np.concatenate(xs), np.concatenate(ys)
    if y is None:
        raise ConfigError("Distiller.fit needs labels: fit(x, y) or a dataset of (x, y) batches")
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} examples and y {len(y)}; give one label per example")
    return x, y


class Distiller(keras.Model):
    """A student that learns from a frozen teacher by registered `method`.

    Args:
      teacher, student: Keras models returning `(batch, classes)` logits (built
        functional or Sequential models when the method reads features).
      method: a registered method's name (`common.methods.REGISTRY`: "kd", "dkd",
        "fitnets", "at", "rkd", "crd", ...).
      teacher_features, student_features: `{output name: layer name or index}`
        for the feature layers the method reads (defaults: module docstring).
      cache_teacher: compute the teacher's targets once per example before
        training (default) or run the teacher on every batch.
      **options: the method's options (`temperature`, `alpha` for KD; e.g.
        `nckd_weight` for DKD), checked like the command line's flags.

    Call it (or `predict`) for the student's logits; `evaluate` scores the student.
    `student` is the trained student; for a method with a prediction head (CID) it is
    the given student with that head (`common.deployed.with_head`), which predicts
    through it.
    """

    def __init__(self, teacher, student, method="kd", *, teacher_features=None, student_features=None,
                 cache_teacher=True, **options):
        super().__init__(name=f"{method}_distiller")
        self.cls = methods.get(method)
        if self.cls.teacher_objective is not None:
            raise ConfigError(f"{method} trains its own teacher before distilling: train `teacher` with "
                              f"common.training.fit({self.cls.teacher_objective.__name__}(teacher, cuts, branches, "
                              "options), ...) (docs/methods.md), then pass it here with method='kd'")
        self.options = method_options(method, options)
        self.teacher, self.student = teacher, student
        self.teacher.trainable = False
        self.cache_teacher = bool(cache_teacher)
        reads = set(self.cls.teacher_outputs) | set(self.cls.student_outputs)
        hint_from = None
        if "hint" in reads:
            both_maps = all("spatial" in default_features(m) or "spatial" in (named or {})
                            for m, named in ((teacher, teacher_features), (student, student_features)))
            hint_from = "spatial" if both_maps else "embedding"
        self.teacher_outputs = feature_model(teacher, ("logits", *self.cls.teacher_outputs), teacher_features,
                                             hint_from)
        self.student_outputs = None
        if set(self.cls.student_outputs) - {"logits"}:
            self.student_outputs = feature_model(student, ("logits", *self.cls.student_outputs), student_features,
                                                 hint_from)
        head = self.cls.prediction_head(self.options, int(teacher.outputs[0].shape[-1]))
        if head is not None:  # CID: the trained student predicts through the method's head
            self.student = deployed.with_head(student, head, lambda _: self.student_outputs)
        self.method = None
        self.term_trackers = []
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, x, training=False):
        return self.student(x, training=training)

    def teacher_targets(self, x, training=False):
        """`{target: tensor}` the method caches of the frozen teacher for inputs `x`."""
        return self.cls.teacher_targets(self.teacher_outputs(x, training=training))

    def build_method(self, labels):
        """Creates the method for a training set of `labels` (once: its extra layers,
        e.g. FitNets' regressor or CRD's memory banks, are built for it)."""
        if self.method is not None:
            return
        num_classes = int(self.teacher.outputs[0].shape[-1])
        context = methods.Context(num_classes=num_classes, num_examples=len(labels),
                                  labels=np.asarray(labels).reshape(-1).astype(np.int32),
                                  features=self.student_outputs)
        self.method = self.cls.create(self.student, self.options, context)
        if not self.cache_teacher:
            self.method.teacher = self.teacher_outputs  # batches then carry no targets: it runs per step
        probe = self.teacher_targets(tf.zeros((1, *self.teacher.inputs[0].shape[1:])))
        self.method.build_extras({name: (None, *value.shape[1:]) for name, value in probe.items()})
        self.extras = list(self.method.extra_layers)  # tracked: saved with the distiller, built by the optimizer
        self.term_trackers = [keras.metrics.Mean(name=name) for name in self.method.term_names]

    def training_data(self, x, y, batch_size, shuffle=True, seed=None):
        """A dataset of `{"x", "y", "index", "teacher_<target>"}` batches over the examples,
        the teacher's targets computed once (with `cache_teacher`)."""
        arrays = {"x": x, "y": y.reshape(-1).astype(np.int32), "index": np.arange(len(y), dtype=np.int32)}
        if self.cache_teacher and self.cls.target_names():
            predict = tf.function(lambda batch: self.teacher_targets(batch, training=False))
            parts = [predict(tf.constant(x[i:i + 1024])) for i in range(0, len(x), 1024)]
            for name in parts[0]:
                arrays[f"teacher_{name}"] = np.concatenate([p[name].numpy() for p in parts]).astype(np.float32)
        dataset = tf.data.Dataset.from_tensor_slices(arrays)
        if shuffle:
            dataset = dataset.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        return untuned(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))

    def fit(self, x=None, y=None, batch_size=None, epochs=1, shuffle=True, sample_weight=None, **kwargs):
        """Keras `fit` over the examples of `(x, y)` (arrays or a dataset of `(x, y)`
        batches), each carrying its cached teacher targets; other arguments
        (`validation_data`, `callbacks`, `verbose`, ...) as Keras takes them."""
        if sample_weight is not None:
            raise ConfigError("Distiller.fit takes no sample_weight yet; weight the data by repeating examples")
        x, y = as_arrays(x, y)
        self.build_method(y)
        data = self.training_data(x, y, batch_size or 32, shuffle=shuffle)
        schedule = keras.callbacks.LambdaCallback(  # a method's per-epoch schedule (DKD's warm-up)
            on_epoch_begin=lambda epoch, logs=None: self.method.begin_epoch(epoch + 1, epochs))
        callbacks = [schedule, *(kwargs.pop("callbacks", None) or [])]
        return super().fit(data, epochs=epochs, callbacks=callbacks, shuffle=False, **kwargs)  # shuffled above

    @property
    def metrics(self):
        """Each loss term, the loss, then the compiled metrics (not Keras' own loss tracker)."""
        return [*self.term_trackers, self.loss_tracker, *(m for m in super().metrics if m.name != "loss")]

    def train_step(self, batch):
        """The toolkit's training step (`common.training.descend`), under Keras' `fit`."""
        terms, loss, logits, _ = training.descend(self.method, self.optimizer, batch, self.method.trainable_variables)
        for tracker, value in zip(self.term_trackers, terms.values()):
            tracker.update_state(value)
        self.loss_tracker.update_state(loss)
        return self.compute_metrics(batch["x"], batch["y"], logits)

    def test_step(self, data):
        """The student alone: its cross-entropy (`loss`) and the compiled metrics."""
        x, y = data[0], data[1]
        logits = self.student(x, training=False)
        self.loss_tracker.update_state(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        terms = {tracker.name for tracker in self.term_trackers}
        return {k: v for k, v in self.compute_metrics(x, y, logits).items() if k not in terms}


class MethodLoss(keras.distillation.DistillationLoss):
    """A registered method's distillation term as a `keras.distillation` loss, for
    users of Keras' own `Distiller` (`distillation_losses=[MethodLoss("rkd")]`).

    Keras passes a distillation loss the teacher's and student's outputs (the
    final logits, or the layers named by `teacher_layer_name` /
    `student_layer_name`) and no labels, so only methods whose term needs neither
    labels nor trained layers of their own fit: `kd` (its T² KL term, without the
    (1 − α): Keras weighs the student's and the distillation losses itself), `at`
    (feature maps) and `rkd` (embeddings). Options as `Distiller` takes them.
    """

    TERMS = {
        "kd": lambda o, t, s: losses.distillation_loss(t, s, o["temperature"]),
        "at": lambda o, t, s: o["weight"] * at_method.feature_map_loss(t, s),
        "rkd": lambda o, t, s: sum(w * part for w, part in zip(
            (o["distance_weight"], o["angle_weight"]), rkd_method.rkd_losses(t, s))),
    }

    def __init__(self, method="kd", teacher_layer_name=None, student_layer_name=None, **options):
        if method not in self.TERMS:
            raise ConfigError(f"{method!r} needs labels or trained layers that keras.distillation does not give a "
                              f"loss; use common.distiller.Distiller, or one of {', '.join(self.TERMS)}")
        self.method, self.teacher_layer_name, self.student_layer_name = method, teacher_layer_name, student_layer_name
        self.settings = dataclasses.asdict(method_options(method, options))

    def validate_outputs(self, teacher_outputs, student_outputs):
        """Teacher and student may differ in width (RKD) or map size (AT)."""

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return self.TERMS[self.method](self.settings, tf.stop_gradient(teacher_outputs), student_outputs)
