"""The library entry point: distil any Keras teacher into any Keras student with
any registered method, through `compile` / `fit` / `evaluate` / `predict`.

    distiller = Distiller(teacher, student, method="dkd", temperature=4)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    distiller.fit(x_train, y_train, epochs=12, batch_size=256, callbacks=[...])
    distiller.student  # the trained student

`Distiller` is a `keras.Model`: it saves and loads (`save`, `keras.models.load_model`,
`ModelCheckpoint`), resumes (`BackupAndRestore`, bit for bit), and trains under a
`tf.distribute` strategy. `fit` takes what Keras' `fit` takes for data (see
`kdtoolkit.fit_data`): arrays with class indices or one-hot labels, a
`tf.data.Dataset` of `(x, y)` batches, a `keras.utils.PyDataset`,
`validation_split`. Before training the frozen teacher runs once per training
example and what the method reads of it (logits, an embedding, attention maps) is
cached: beside arrays in memory, or with a streamed dataset in a snapshot on disk;
the teacher never runs per step. With `cache_teacher=False` it runs on every batch
instead (a dataset's augmentations are then fresh each epoch).

Each training step is one `tf.GradientTape` step over the method's loss terms
(`Method.loss_terms`), the same terms the course tasks minimise; `fit`'s logs
hold each term, the loss and the compiled metrics on the student's logits.
Feature layers are resolved and checked by `kdtoolkit.features` (the penultimate
`"embedding"`, the last `"spatial"` map with height and width above 1); name
others with `teacher_features` / `student_features`.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from kdtoolkit import classifier_head, deployed, feature_rules, features, fit_data, methods, model_graph, training
from kdtoolkit.methods.base import refuse_replicas
from kdtoolkit.errors import ConfigError
from kdtoolkit.method_loss import MethodLoss  # noqa: F401  (re-exported: the library's two entry points)

PACKAGE = "kd_toolkit"  # the package name of the toolkit's Keras serializables


def method_options(method, options):
    """The `Options` of registered `method` from keyword arguments; a bad or unknown
    one is a `ConfigError` naming the Python argument and what the method takes."""
    try:
        return methods.make_options(method, options, naming=methods.argument_name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_model(model, role):
    if not isinstance(model, keras.Model):
        raise ConfigError(f"the {role} must be a keras.Model, got {type(model).__name__}")


def read_features(cls, teacher, student, teacher_features, student_features):
    """`(teacher_outputs, teacher_reads, student_outputs, student_reads)`: the feature
    models (`kdtoolkit.features.feature_model`) of what method class `cls` reads of
    each model, `x -> {name: tensor}`, and which layer each name reads; the student's
    are None and `{}` where `cls` reads only its logits (a student ending in a softmax
    is refused all the same). A teacher's softmax output read as logits is said in
    one warning line, at the line that builds the `Distiller`."""
    hint_from = feature_rules.hint_source(teacher, student, teacher_features, student_features) \
        if "hint" in (*cls.teacher_outputs, *cls.student_outputs) else None
    teacher_outputs, teacher_reads = features.feature_model(
        teacher, ("logits", *cls.teacher_outputs), teacher_features, hint_from, role="teacher")
    note = classifier_head.logits_tensor(teacher)[1] if model_graph.graph_inputs(teacher) else None
    if note:  # a softmax output, read through its logits: say how
        warnings.warn(note, stacklevel=3)
    student_outputs, student_reads = None, {}
    if set(cls.student_outputs) - {"logits"}:
        student_outputs, student_reads = features.feature_model(
            student, ("logits", *cls.student_outputs), student_features, hint_from, role="student")
    elif model_graph.graph_inputs(student) is not None:
        classifier_head.logits_tensor(student, "student")  # refuses a student that ends in a softmax
    return teacher_outputs, teacher_reads, student_outputs, student_reads


def probe_input(teacher, sample):
    """One example of `teacher`'s input (zeros), for shapes: from its `Input`, or
    `sample` (the first training example) for a model without a graph."""
    inputs = model_graph.graph_inputs(teacher)
    if inputs is None:
        if sample is None:
            raise ConfigError(f"{teacher.name} has no Input: fit the distiller on data first")
        return sample
    return tf.nest.map_structure(lambda t: tf.zeros((1, *t.shape[1:]), t.dtype),
                                 inputs if len(inputs) > 1 else inputs[0])


def across_workers(strategy, logs):
    """`logs` as `(1,)` tensors under `MultiWorkerMirroredStrategy`, whose reduction in
    Keras 3.15's `fit` averages along axis 0 and fails on scalars; as they are elsewhere."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


@keras.saving.register_keras_serializable(package=PACKAGE)
class Distiller(keras.Model):
    """A student that learns from a frozen teacher by registered `method`.

    Args:
      teacher, student: Keras models returning `(batch, classes)` logits:
        functional, Sequential or subclassed. A teacher ending in a softmax is
        read through its logits (`kdtoolkit.classifier_head.logits_tensor`, said
        in one line); a student must return logits.
      method: a registered method's name (`kdtoolkit.methods.REGISTRY`: "kd", "dkd",
        "fitnets", "at", "rkd", "crd", ...).
      teacher_features, student_features: `{output name: layer name or index}`
        for the feature layers the method reads, or (any model) a callable
        `fn(x, training=False) -> {"logits": ..., "embedding": ...}`; defaults:
        `kdtoolkit.features`.
      cache_teacher: compute the teacher's targets once per example before
        training (default) or run the teacher on every batch.
      seed: the seed of the per-epoch example order (default: drawn from NumPy's
        global generator, so `keras.utils.set_random_seed` fixes it).
      cache_dir: where a streamed dataset's teacher cache is written (default: the
        system's temporary folder).
      **options: the method's options (`temperature`, `alpha` for KD; e.g.
        `nckd_weight` for DKD), checked.

    Call it (or `predict`) for the student's logits; `evaluate` scores the student.
    `student` is the trained student; for a method with a prediction head (CID) it is
    the given student with that head (`kdtoolkit.deployed.with_head`), which predicts
    through it; `export_student()` gives it as plain Keras layers.
    """

    def __init__(self, teacher, student, method="kd", *, teacher_features=None, student_features=None,
                 cache_teacher=True, seed=None, cache_dir=None, name=None, **options):
        super().__init__(name=name or f"{method}_distiller")
        check_model(teacher, "teacher")
        check_model(student, "student")
        self.cls = methods.get(method)
        if self.cls.teacher_objective is not None:
            raise ConfigError(f"{method} trains its own teacher before distilling: train `teacher` with "
                              f"kdtoolkit.training.fit({self.cls.teacher_objective.__name__}(teacher, cuts, branches, "
                              "options), ...) (docs/methods.md), then pass it here with method='kd'")
        self.options = method_options(method, options)
        self.method_name, self.named = method, {"teacher": teacher_features, "student": student_features}
        self.cache_teacher, self.cache_dir = bool(cache_teacher), cache_dir
        self.seed = int(np.random.randint(2**31 - 1)) if seed is None else int(seed)
        self.teacher, self.given_student = teacher, student
        self.teacher.trainable = False
        self.teacher_outputs, self.teacher_reads, self.student_outputs, self.student_reads = read_features(
            self.cls, teacher, student, teacher_features, student_features)
        self.student = student
        self._num_classes = int(teacher.outputs[0].shape[-1]) if model_graph.graph_inputs(teacher) else None
        head = self.cls.prediction_head(self.options, self._num_classes or 0)
        if head is not None:  # CID: the trained student predicts through the method's head
            if model_graph.graph_inputs(student) is None or self._num_classes is None:
                raise ConfigError(f"{method} builds a prediction head onto the student: give functional or "
                                  "Sequential teacher and student models (with an Input)")
            self.student = deployed.with_head(student, head, lambda _: self.student_outputs)
        self.method, self.labels, self.sample = None, None, None
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")  # the data order's epoch
        self.term_trackers = []
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def num_classes(self):
        """Classes of the teacher's logits (a subclassed teacher's from its first call)."""
        if self._num_classes is None:
            raise ConfigError(f"{self.teacher.name} has no known output yet: fit it or call it on a batch first")
        return self._num_classes

    def find_classes(self, x):
        """Classes of the teacher's logits, from one example of `x` when the teacher has no graph."""
        if self._num_classes is None:
            sample = tf.nest.map_structure(lambda a: a[:1], x)
            self._num_classes = int(self.teacher_outputs(sample, training=False)["logits"].shape[-1])
            self.sample = sample
        return self.num_classes

    # -- the Keras model protocol ---------------------------------------------------------------

    def call(self, x, training=False):
        """The student's `(batch, classes)` logits (of a dict-returning student, its `"logits"`)."""
        outputs = self.student(x, training=training)
        return outputs["logits"] if isinstance(outputs, dict) else outputs

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Keras' `compile`, without `loss`: the method's terms are the loss."""
        if loss is not None:
            raise ConfigError(f"Distiller.compile takes no loss: the {self.method_name} method's terms are the "
                              "loss (choose them with the method and its options); drop loss=")
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Compiles a loaded distiller as it was compiled (Keras skips this for a custom `compile`)."""
        config = keras.saving.deserialize_keras_object({k: v for k, v in config.items() if k != "loss"})
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        named = {role: value for role, value in self.named.items() if value is not None}
        if any(callable(value) for value in named.values()):
            raise NotImplementedError("a Distiller given feature callables cannot be serialized; name feature layers "
                                      "instead, or save the student alone (distiller.export_student().save(...))")
        return {"name": self.name, "teacher": keras.saving.serialize_keras_object(self.teacher),
                "student": keras.saving.serialize_keras_object(self.given_student), "method": self.method_name,
                "options": methods.options_dict(self.options), "teacher_features": self.named["teacher"],
                "student_features": self.named["student"], "cache_teacher": self.cache_teacher, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        teacher = keras.saving.deserialize_keras_object(config.pop("teacher"))
        student = keras.saving.deserialize_keras_object(config.pop("student"))
        return cls(teacher, student, **config.pop("options"), **config)

    def get_build_config(self):
        """The training labels the method was built for (CRD's memory bank samples by them)."""
        if self.method is not None:
            return {"labels": None if self.labels is None else self.labels.tolist()}

    def build_from_config(self, config):
        if config and "labels" in config:
            self.build_method(config["labels"])

    def build(self, input_shape=None):
        """Nothing to create: the student builds on its first call, the method in `fit`."""
        self.built = True

    # -- the method and its data ------------------------------------------------------------------

    def teacher_targets(self, x, training=False):
        """`{target: tensor}` the method caches of the frozen teacher for inputs `x`."""
        return self.cls.teacher_targets(self.teacher_outputs(x, training=training))

    def build_method(self, labels):
        """Creates the method for a training set of `labels` `(n,)`: its extra layers
        (FitNets' regressor, CRD's memory banks) are built for it, once. `fit` on
        other labels is refused for a method that keeps state per example (CRD:
        `per_example`)."""
        labels = None if labels is None else np.asarray(labels, np.int32).reshape(-1)
        if self.method is not None:
            if self.cls.per_example and labels is not None and not np.array_equal(labels, self.labels):
                raise ConfigError(f"this {self.method_name} distiller keeps state per training example, built for "
                                  f"another training set of {len(self.labels)} examples; make a new Distiller "
                                  "for new data")
            return
        context = methods.Context(num_classes=self.num_classes, num_examples=0 if labels is None else len(labels),
                                  labels=labels, features=self.student_outputs)
        method = self.cls.create(self.student, self.options, context)
        if not self.cache_teacher:
            method.teacher = self.teacher_outputs  # batches then carry no targets: it runs per step
        probe = self.teacher_targets(probe_input(self.teacher, self.sample))
        if isinstance(self.student_outputs, features.CallFeatures):  # shapes known only from a call
            self.student_outputs.output = self.student_outputs(probe_input(self.teacher, self.sample))
        try:
            method.build_extras({name: (None, *value.shape[1:]) for name, value in probe.items()})
        except ValueError as err:
            if labels is not None:
                raise
            raise ConfigError(f"{self.method_name} needs the training labels before training ({err}); give arrays, "
                              "or keep cache_teacher=True so a dataset is read once first") from None
        locked = self._tracker.locked  # a predict() before fit builds (and locks) the model: state may still come
        self._tracker.unlock()
        try:
            self.method, self.labels = method, labels
            self.extras = list(method.extra_layers)  # tracked: saved with the distiller, built by the optimizer
            self.term_trackers = [keras.metrics.Mean(name=name) for name in method.term_names]
        finally:
            if locked:
                self._tracker.lock()
        self.built = True

    def array_targets(self, x):
        """The teacher's targets for arrays `x` (`fit_data.array_targets`), as `fit` caches them."""
        return fit_data.array_targets(self.teacher_targets, x)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, callbacks=None, validation_split=0.0,
            validation_data=None, shuffle=True, class_weight=None, sample_weight=None, **kwargs):
        """Keras `fit` over `(x, y)` (see the module docstring), each example carrying its
        cached teacher targets; other arguments (`callbacks`, `verbose`,
        `initial_epoch`, ...) as Keras takes them. `sample_weight` and `class_weight`
        are refused: the methods' terms are batch means, some relating examples to
        each other (RKD, CRD)."""
        x, y, validation_data = fit_data.fit_inputs(x, y, validation_split, validation_data, sample_weight,
                                                    class_weight, self.find_classes)
        strategy = self.distribute_strategy
        refuse_replicas(self.cls, self.method_name, strategy.num_replicas_in_sync,
                        f"train it outside the {type(strategy).__name__} scope (one device)")
        targets_fn = self.teacher_targets if self.cache_teacher and self.cls.target_names() else None
        data, labels = fit_data.training_batches(x, y, batch_size, shuffle, self.num_classes, targets_fn, self.epoch,
                                                 self.seed, self.cache_dir)
        with strategy.scope():  # the method's and optimizer's variables, where the model's live
            self.build_method(labels)
            self.build_state(data)
        schedule = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs=None: self.begin_epoch(epoch, epochs))
        return super().fit(data, epochs=epochs, callbacks=[schedule, *(callbacks or [])],
                           validation_data=validation_data, shuffle=False, **kwargs)

    def begin_epoch(self, epoch, epochs):
        """Before each (0-based) `epoch`: the data order's epoch, the random streams
        (dropout's, CRD's negatives') and the method's schedule, each a function of
        the seed and the epoch alone, so a resumed run draws what an uninterrupted one does."""
        self.epoch.assign(epoch)
        for i, state in enumerate(v for v in self.variables if v.path.endswith("seed_generator_state")):
            key = (self.seed * 1_000_003 + epoch * 7_919 + i) % (2**31 - 1)
            state.assign(tf.cast([key, 0], state.dtype))
        self.method.begin_epoch(epoch + 1, epochs)

    def build_state(self, data):
        """Creates the optimizer's and the compiled metrics' variables before Keras'
        `fit` does (under a strategy it would trace the student on the whole batch dict)."""
        batch = next(iter(data.take(1)))
        self._symbolic_build(data_batch=(batch["x"], batch["y"]))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' build of an unbuilt model under a strategy, skipped once `build_state`
        has built everything: it would reduce a distributed batch of the method's dict,
        which `MultiWorkerMirroredStrategy` cannot."""
        if self.method is None or not self.optimizer.built:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    @property
    def metrics(self):
        """Each loss term, the loss, then the compiled metrics (not Keras' own loss tracker)."""
        return [*self.term_trackers, self.loss_tracker, *(m for m in super().metrics if m.name != "loss")]

    def train_step(self, batch):
        """The toolkit's training step (`kdtoolkit.training.descend`), under Keras' `fit`."""
        terms, loss, logits, _ = training.descend(self.method, self.optimizer, batch, self.method.trainable_variables)
        for tracker, value in zip(self.term_trackers, terms.values()):
            tracker.update_state(value)
        self.loss_tracker.update_state(loss)
        return across_workers(self.distribute_strategy, self.compute_metrics(batch["x"], batch["y"], logits))

    def test_step(self, data):
        """The student alone: its cross-entropy (`loss`) and the compiled metrics."""
        x, y = data[0], data[1]
        if y.shape.rank == 2 and y.shape[-1] > 1:
            y = tf.argmax(y, axis=-1)
        logits = self(x, training=False)
        self.loss_tracker.update_state(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        terms = {tracker.name for tracker in self.term_trackers}
        return across_workers(self.distribute_strategy,
                              {k: v for k, v in self.compute_metrics(x, y, logits).items() if k not in terms})

    def export_student(self):
        """The trained student as a model of Keras' built-in layers (CID's head
        included), which loads without the toolkit."""
        return deployed.plain_keras(self.student)

