"""What every training objective shares: the trained model, its variables, its
class-logit prediction, and (for distillation) the frozen teacher's outputs.

A batch is a dict of tensors: `"x"` model inputs, `"y"` `(batch,)` integer labels,
`"index"` `(batch,)` example ids (from 0 to the training set size), and for a
distillation method `"teacher_<target>"` for each of its `teacher_targets`:
a frozen teacher's outputs for exactly these inputs, computed once per example
(and view) before training, so the teacher never runs per step.
"""

import dataclasses
import math

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.errors import ConfigError


REGISTRY = {}  # name -> method class, in name order, filled by `register` (`kdtoolkit.methods.REGISTRY`)


def register(cls):
    """Class decorator of a method file: adds the `Distiller` subclass `cls` to the
    registry under `cls.name`, kept in name order (a file in `common/methods/` is
    imported with the package, and its method is an experiment of both tasks,
    `--only <name>`; a class registered from elsewhere is found by `Distiller` and
    `methods.get` once its module is imported)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name: set `name = \"...\"` to register it")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"two methods are named {cls.name!r} ({REGISTRY[cls.name].__module__} and "
                         f"{cls.__module__}); rename one")
    REGISTRY[cls.name] = cls
    for name in sorted(REGISTRY):
        REGISTRY[name] = REGISTRY.pop(name)
    return cls


@dataclasses.dataclass(frozen=True)
class SharedStep:
    """How runs of one method class may share a compiled step (`kdtoolkit.speed.step_sharing`).

    `signature(method)`: what the loss graph depends on beyond the model, the class
    and `runtime`, as a hashable value (runs of equal signature and model structure
    share one step); `runtime`: float options read as variables there, so one step
    serves every value (KD's T and alpha); `stackable`: the loss terms broadcast
    over fused members (`kdtoolkit.speed.fused`).
    """

    signature: object
    runtime: tuple = ()
    stackable: bool = False


@dataclasses.dataclass(frozen=True)
class LabelFreeTerm:
    """A method's distillation term without labels or trained layers, as a
    `keras.distillation` loss (`kdtoolkit.method_loss.MethodLoss`):
    `function(options, teacher_output, student_output) -> scalar`, and the option
    names it uses."""

    function: object
    options: tuple


class Method:
    """Base class: the trained model and the loss terms of one batch.

    `term_names` are the loss terms `loss_terms` returns (their sum is minimised;
    each is logged). `extra_layers` are layers the method trains or updates beside
    the model (a regressor, projection heads, a memory bank): their variables are
    trained with the model's and saved in every epoch checkpoint, but are not part
    of the model that is kept. `shared_step` (a `SharedStep`, or None: every run
    compiles its own) is read from the class itself, not inherited: a subclass that
    changes the loss shares nothing until it declares its own.
    """

    term_names = ()
    extra_layers = ()
    shared_step = None

    def __init__(self, model):
        self.model = model

    @property
    def trainable_variables(self):
        extra = [v for layer in self.extra_layers for v in layer.trainable_variables]
        return self.model.trainable_variables + extra

    def forward(self, x, training=False):
        """`(outputs, class_logits)`: the model's raw outputs (what is distilled) and
        the `(batch, classes)` logits used for labels, accuracy and prediction."""
        outputs = self.model(x, training=training)
        if isinstance(outputs, dict):  # a model returning its features beside its logits
            outputs = outputs["logits"]
        return outputs, outputs

    def class_logits(self, x, training=False):
        return self.forward(x, training=training)[1]

    def loss_terms(self, batch, training=True):
        """Returns `({term_name: scalar}, class_logits)`; the loss is the terms' sum."""
        raise NotImplementedError

    def epoch_line(self, record, epochs):
        """The progress line of one epoch's record (`kdtoolkit.training.format_epoch`)."""
        from kdtoolkit.training import format_epoch

        return format_epoch(record, epochs, self.term_names)

    def begin_epoch(self, epoch, epochs):
        """Called by `kdtoolkit.training.fit` before each epoch (1-based) of `epochs`,
        resumed ones included: a method with a schedule (DKD's warm-up) sets its
        variables here. Nothing by default."""


class CrossEntropy(Method):
    """Supervised training on hard labels: a teacher, or a student from scratch."""

    term_names = ("ce",)
    shared_step = SharedStep(lambda method: (), stackable=True)

    def loss_terms(self, batch, training=True):
        _, logits = self.forward(batch["x"], training=training)
        return {"ce": losses.teacher_loss(batch["y"], logits)}, logits


SHARED_OPTIONS = ("temperature", "alpha")  # options set by `--temperature` / `--alpha` in every method that has them


def option_flag(method, field):
    """The command-line flag of option `field` of `method`: `--temperature` and `--alpha`
    for the shared ones, else `--<method>-<field>`."""
    return f"--{field}" if field in SHARED_OPTIONS else f"--{method}-{field.replace('_', '-')}"


def argument_name(method, field):
    """The Python keyword argument of option `field` (`Distiller(..., temperature=2)`)."""
    return field


def refuse_replicas(cls, name, replicas, fix):
    """A one-line `ConfigError` when method class `cls` declares `single_replica` and
    would be split over `replicas` > 1; `fix`: how to run it instead."""
    if cls.single_replica and replicas > 1:
        raise ConfigError(f"{name} cannot be split across replicas: {cls.single_replica}; {fix}")


def check_options(options, method, naming=option_flag):
    """Validates a method's `Options` from each field's metadata: a finite number >=
    `minimum` (default 0; > it with `exclusive`) and <= `maximum` (if given), an
    integer >= `minimum` (default 1) when the default is an int, True or False when it
    is a bool. Raises `ValueError`
    naming the option as `naming(method, field)` says (the CLI flag by default,
    `argument_name` for Python)."""
    for field in dataclasses.fields(options):
        value, flag = getattr(options, field.name), naming(method, field.name)
        if isinstance(field.default, bool):  # a switch (`standardize`): True or False, nothing else
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
            continue
        integer = isinstance(field.default, int)
        minimum = field.metadata.get("minimum", 1 if integer else 0)
        maximum = field.metadata.get("maximum", math.inf)
        exclusive = field.metadata.get("exclusive", False)
        number = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
                  and math.isfinite(value))
        if not number or not (value > minimum if exclusive else value >= minimum) or value > maximum:
            kind = "an integer" if integer else "a number"
            bound = f" and <= {maximum:g}" if maximum < math.inf else ""
            raise ValueError(f"{flag} must be {kind} {'>' if exclusive else '>='} {minimum:g}{bound}, got {value!r}")
        precision = field.metadata.get("precision_check")  # a term that would underflow in the loss's precision
        problem = precision(value, flag) if precision is not None else None
        if problem:
            raise ValueError(problem)


def temperature_field(default=4.0):
    """The `temperature` option of a logit method (T > 0, set by `--temperature`)."""
    return dataclasses.field(default=default, metadata={"help": "temperature T of the softened logits",
                                                        "exclusive": True,
                                                        "precision_check": losses.temperature_problem})


def alpha_field(default=0.5):
    """The `alpha` option of a method with a hard-label term (0 <= α <= 1, set by `--alpha`)."""
    return dataclasses.field(default=default, metadata={
        "help": "weight of the hard-label loss; 1 - alpha weights distillation", "maximum": 1.0,
        "precision_check": losses.weight_problem})


def standardize_field(weights="with the reference's weights (see docs/methods.md)"):
    """The `standardize` switch of a logit method (`--<method>-standardize`), off by
    default: logit standardization (Sun et al., CVPR 2024; `losses.standardize_logits`)
    of the teacher's and the student's logits before the temperature, which stays
    `--temperature` (the reference's base temperature is 2: `--temperature 2`);
    `weights`: what the method's weights become, for the flag's help."""
    return dataclasses.field(default=False, metadata={
        "help": "logit standardization (Sun et al. 2024): z-score each example's teacher and student logits "
                f"before --temperature (the reference's base temperature: 2), {weights}"})


def run_settings(options):
    """`{field: value}` of `options` that defines a run (its name and identity): every
    field, less a switch (a bool option) at its default, so that adding a switch to a
    method leaves every existing run's name and identity as they were."""
    return {field.name: getattr(options, field.name) for field in dataclasses.fields(options)
            if not (isinstance(field.default, bool) and getattr(options, field.name) == field.default)}


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without hyperparameters of its own."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method may need to know about its task and data.

    `num_classes`: classes of the labels; `num_examples`: training set size (for
    memory banks indexed by `"index"`); `labels`: the `(num_examples,)` integer
    class labels of the training set by `"index"` (CRD's negatives come from
    other classes); `features`: `x -> {output name: tensor}` of the student (see `Distiller`).
    """

    num_classes: int
    num_examples: int = 0
    labels: object = None
    features: object = None


class Distiller(Method):
    """A student that learns from a frozen teacher: the base of every registered method.

    Subclasses set:
      name: the registry name, also the experiment name (`--only <name>`).
      summary: one line for `--help` and the README.
      Options: a frozen dataclass of the method's hyperparameters (CLI flags
        `--<name>-<field>`; `temperature` and `alpha`, where a method has them, are
        set by `--temperature` / `--alpha`), checked by `check_options` from each
        field's metadata; part of its run identity.
      teacher_outputs / student_outputs: names of model outputs it reads, from
        `"logits"`, `"embedding"` (the penultimate vector, `(batch, D)`),
        `"spatial"` (the last feature map, `(batch, H, W, C)`) and `"hint"`
        (FitNets' hint / guided layer, a map or a vector); a task model
        exposes them through its feature model.

    and implement `loss_terms`. `teacher_targets` turns the teacher's outputs into
    what is cached per example (default: those outputs themselves). Two optional
    capabilities: `prediction_head` (the trained student predicts through a layer of
    the method's: CID) and `teacher_objective` (the method trains its own teacher
    first, with `teacher_objective(teacher, *task.student_branches(teacher), options)`,
    and distils from it: SFTN).
    """

    name = None
    summary = ""
    Options = NoOptions
    teacher_outputs = ("logits",)
    student_outputs = ("logits",)
    teacher_objective = None  # a method that trains its own teacher (SFTN): that teacher's Method class
    teacher_settings = ()  # the options that shape that teacher (its run's identity)
    per_example = False  # keeps state per training example (by "index": CRD's memory bank), built for one set
    single_replica = ""  # why the method cannot be split across replicas of a tf.distribute strategy ("": it can)
    label_free_term = None  # a `LabelFreeTerm`: the method as a keras.distillation loss; not inherited

    def __init__(self, student, options=None, context=None, teacher=None, **values):
        """`values`: options given by name (`temperature=2`), over `options`' (default: the defaults)."""
        super().__init__(student)
        self.options = dataclasses.replace(options if options is not None else self.Options(), **values)
        if values:
            check_options(self.options, self.name or type(self).__name__)
        self.context = context
        self.teacher = teacher  # only used when batches carry no cached targets (tests, benchmarks)
        self.student_features = context.features if context is not None else None

    @classmethod
    def teacher_targets(cls, outputs):
        """`{target: (batch, ...)}` cached per example from the teacher's `{output: tensor}`;
        batches carry each as `"teacher_<target>"`."""
        return {name: outputs[name] for name in cls.teacher_outputs}

    @classmethod
    def target_names(cls):
        """The keys of `teacher_targets`, without running a teacher."""
        return tuple(cls.teacher_outputs)

    def targets(self, batch):
        """The teacher's cached targets for this batch (gradients stopped)."""
        names = self.target_names()
        if all(f"teacher_{n}" in batch for n in names):
            return {n: tf.stop_gradient(batch[f"teacher_{n}"]) for n in names}
        if self.teacher is None:
            raise ValueError(f"{type(self).__name__} needs batches with "
                             f"{', '.join('teacher_' + n for n in names)} or a teacher model")
        outputs = self.teacher(batch["x"], training=False)
        outputs = outputs if isinstance(outputs, dict) else {"logits": outputs}
        return {n: tf.stop_gradient(v) for n, v in self.teacher_targets(outputs).items()}

    def student(self, x, training):
        """`{output: tensor}` of the student: `"logits"` always, features when it reads any."""
        if set(self.student_outputs) <= {"logits"}:
            return {"logits": self.forward(x, training=training)[0]}
        if self.student_features is None:
            raise ValueError(f"{type(self).__name__} reads the student's {', '.join(self.student_outputs)}: "
                             "pass Context(features=...)")
        return self.student_features(x, training=training)

    def build_extras(self, teacher_shapes):
        """Creates the method's `extra_layers` once the shapes of the teacher's targets,
        `{target: (batch, ...)}`, are known (before training); none by default."""

    def student_shapes(self):
        """`{output: shape}` of the student's feature model, batch dimension None."""
        return {name: tuple(tensor.shape) for name, tensor in self.student_features.output.items()}

    @classmethod
    def prediction_head(cls, options, num_classes):
        """A layer `[embedding, logits] -> class logits` that becomes part of the trained
        student (`kdtoolkit.deployed.with_head`), or None: the student predicts with its
        own logits (every method but CID)."""
        return None

    @classmethod
    def create(cls, student, options, context):
        """The method for a run of the registry: `student` trained with `options`."""
        return cls(student, options, context)
