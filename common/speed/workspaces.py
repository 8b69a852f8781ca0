"""Compiled training steps shared by runs of the same structure.

A run's step is traced and compiled once per step function: seconds of tracing on
a CPU, and on an H100 50-95 s of XLA compilation for a Task 2 fine-tuning step
(MobileNetV2, ResNet50V2), against about 1 s per epoch after it. Runs that differ
only in their weights, seed, data order or KD settings (the seeds of an experiment,
the T curve's students, the student from scratch and from random weights, the
teacher-assistant's student) can use one step.

A `Workspace` holds a structural copy of a run's method (its model cloned, the
method rebound to the clone: `kdtoolkit.speed.step_sharing.rebind`) with its own optimizer and compiled
step. A run copies its initial weights, its optimizer's initial state and its
runtime settings (KD's T and alpha) in (`load`), trains there, and copies the
weights back out (`store`); it trains exactly as it would alone (tested).
`Workspaces.predictor` does the same for a run's final evaluation.
"""

import collections
import json

import keras

from kdtoolkit.speed import step_sharing
from kdtoolkit.training import compiled_predictor


def structure(model):
    """A text that equal models share: the model's config, with every layer's name
    (Keras numbers unnamed layers per process, nested bases' included) replaced by
    its place in the layer tree, and every variable's shape, dtype and trainability;
    None when the model cannot describe its config."""
    places = {}
    for index, layer in enumerate(model._flatten_layers(include_self=True, recursive=True)):
        places.setdefault(layer.name, f"<layer {index}>")

    def canonical(value):
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [canonical(v) for v in value]
        return places.get(value, value) if isinstance(value, str) else value

    try:
        config = canonical(model.get_config())
    except NotImplementedError:
        return None
    variables = [(tuple(v.shape), str(v.dtype), bool(v.trainable)) for v in model.variables]
    return json.dumps([type(model).__name__, config, variables], sort_keys=True, default=str)


def optimizer_structure(optimizer):
    """The optimizer's class and config, less its names (Keras numbers them per process)
    and learning rates (variables that `Workspace.load` copies), a wrapped optimizer's
    (loss scaling) included."""
    def strip(config):
        if isinstance(config, dict):
            return {k: strip(v) for k, v in config.items() if k not in ("name", "learning_rate")}
        return config

    return json.dumps([type(optimizer).__name__, strip(optimizer.get_config())], sort_keys=True, default=str)


def copy_variables(sources, targets):
    """Assigns each of `sources` to the target at its position (shapes must match)."""
    sources, targets = list(sources), list(targets)
    if len(sources) != len(targets):
        raise ValueError(f"cannot copy {len(sources)} variables into {len(targets)}")
    for source, target in zip(sources, targets):
        target.assign(source)


class Workspace:
    """A method's structural copy, its optimizer and its compiled step (see the module)."""

    def __init__(self, method, optimizer, make_step, strategy):
        with strategy.scope():
            self.method = step_sharing.rebind(method, keras.models.clone_model(method.model, recursive=True))
            self.optimizer = type(optimizer).from_config(optimizer.get_config())
        self.strategy = strategy
        self.step, self.means = make_step(self.method, self.optimizer)
        self._predictor = None

    @property
    def predictor(self):
        """The compiled `x -> class logits` of the workspace's method (traced once)."""
        if self._predictor is None:
            self._predictor = compiled_predictor(self.method.class_logits)
        return self._predictor

    def load(self, method, optimizer):
        """Makes the workspace `method` trained by `optimizer`: copies the model's
        variables, the method's runtime settings and the optimizer's state (its initial
        state when it is new; the learning rate included)."""
        copy_variables(method.model.variables, self.method.model.variables)
        for name in step_sharing.runtime_settings(method):
            getattr(self.method, name).assign(getattr(method, name))
        if not optimizer.built:
            with self.strategy.scope():
                optimizer.build(method.trainable_variables)
        copy_variables(optimizer.variables, self.optimizer.variables)

    def store(self, method, optimizer=None):
        """Copies the trained weights (and, with `optimizer`, its state) back to the run's."""
        copy_variables(self.method.model.variables, method.model.variables)
        if optimizer is not None:
            copy_variables(self.optimizer.variables, optimizer.variables)


class Workspaces:
    """The workspaces and predictors of a process, by structure; the `capacity` most
    recently used are kept (each holds a model, a workspace also its optimizer state)."""

    def __init__(self, capacity=16):
        self.capacity = capacity
        self._spaces = collections.OrderedDict()

    def __len__(self):
        return len(self._spaces)

    def predictor(self, method, strategy):
        """A compiled `x -> class logits` of `method` at its model's current weights:
        the predictor of a structural copy (a workspace's of that structure, or one of
        its own; traced once), into which the weights are copied now, or a new one
        when `method` cannot share one. Use it before the next call: that call, or
        the next run trained in that workspace, may copy other weights in."""
        kind = _kind(method, strategy)
        if kind is None:
            return compiled_predictor(method.class_logits)
        space = next((space for key, space in reversed(self._spaces.items())
                      if isinstance(space, Workspace) and key[0] == kind), None)
        if space is not None:
            twin, predictor = space.method, space.predictor
        else:
            def make():
                with strategy.scope():
                    twin = step_sharing.rebind(method, keras.models.clone_model(method.model, recursive=True))
                return twin, compiled_predictor(twin.class_logits)

            twin, predictor = self._remember(("predictor", kind), make)
        copy_variables(method.model.variables, twin.model.variables)
        for name in step_sharing.runtime_settings(method):
            getattr(twin, name).assign(getattr(method, name))
        return predictor

    def get(self, method, optimizer, make_step, strategy, step_key):
        """The workspace for `method` and `optimizer`, made on first use with
        `make_step(method, optimizer) -> (step, means)`; None when `method` cannot
        share one (`kdtoolkit.speed.step_sharing.signature` is None, or its model cannot
        describe itself).
        `step_key`: whatever else the step depends on (data spec, XLA, ...)."""
        kind = _kind(method, strategy)
        if kind is None:
            return None
        return self._remember((kind, optimizer_structure(optimizer), step_key),
                              lambda: Workspace(method, optimizer, make_step, strategy))

    def _remember(self, key, make):
        """The entry under `key`, made by `make()` on first use; the most recently
        used `capacity` entries are kept."""
        if key not in self._spaces:
            self._spaces[key] = make()
            while len(self._spaces) > self.capacity:
                self._spaces.popitem(last=False)
        self._spaces.move_to_end(key)
        return self._spaces[key]


def _kind(method, strategy):
    """What runs must share to share a step or a predictor: the method's class and
    signature, its model's structure and the strategy; None when `method` cannot share."""
    signature = step_sharing.signature(method)
    model = structure(method.model) if signature is not None else None
    return None if model is None else (type(method), signature, model, id(strategy))
