"""Epoch-level resume state, keyed by names that do not depend on the process.

Keras names variables from process-global counters (`teacher/conv2d_3/kernel`,
`seed_generator_7/...`), so the same model built after other models gets other
paths. `variable_keys` names each variable by where it sits in the model's layer
tree instead (`0.Conv2D/kernel`, `5.Dropout/seed_generator_state`), and each
optimizer slot by the variable it belongs to (`optimizer/0.Conv2D/kernel/momentum`).
"""

import concurrent.futures
import json
from pathlib import Path

import numpy as np

from kdtoolkit.files import ensure_space, npz_problem, state_check, write_arrays_atomic


def _sublayers(layer):
    # Keras 3 has no public list of a plain layer's direct sublayers (a wrapper's
    # `base`, say); `_flatten_layers` is what `Model.layers` itself is built on.
    return list(layer._flatten_layers(include_self=False, recursive=False))


def variable_keys(model):
    """`{id(variable): key}` for every variable of `model` (weights and RNG states).

    A key joins, from the root, each layer's index among its parent's sublayers and
    its class name, then the variable's own short name: stable across processes
    for the same architecture, different when the architecture differs.
    """
    keys = {}

    def visit(layer, prefix):
        for index, child in enumerate(_sublayers(layer)):
            visit(child, f"{prefix}{index}.{type(child).__name__}/")
        taken = set(keys.values())
        for variable in layer.variables:
            if id(variable) in keys:
                continue  # named inside a sublayer
            key, n = f"{prefix}{variable.name}", 1
            while key in taken:
                n += 1
                key = f"{prefix}{variable.name}#{n}"
            keys[id(variable)] = key
            taken.add(key)

    visit(model, "")
    return keys


def optimizer_keys(optimizer, model_keys, variables):
    """`{id(optimizer variable): key}`: a slot of trainable `variables[i]` is
    `optimizer/<its model key>/<slot>` (Keras names slots `<opt>/<var path>_<slot>`),
    other state (`iteration`, `learning_rate`) `optimizer/<name>`. A wrapped optimizer
    (Keras' `LossScaleOptimizer`) keeps its own state under `optimizer/inner/`."""
    keys = {}
    # The wrapped optimizer first: the wrapper's `variables` include the wrapped one's.
    for prefix, current in (("optimizer/inner", getattr(optimizer, "inner_optimizer", None)), ("optimizer", optimizer)):
        if current is None:
            continue
        slots = {f"{current.name}/{v.path.replace('/', '_')}_": model_keys[id(v)] for v in variables}
        for variable in current.variables:
            if id(variable) in keys:
                continue
            key = f"{prefix}/{variable.name}"
            for start, model_key in slots.items():
                if variable.path.startswith(start):
                    key = f"optimizer/{model_key}/{variable.path[len(start):]}"
                    break
            keys[id(variable)] = key
    return keys


_WRITER = []


def _writer():
    """The one background thread that writes resume states, started when first needed."""
    if not _WRITER:
        _WRITER.append(concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint"))
    return _WRITER[0]


class EpochCheckpoint:
    """The state after the last finished epoch, in one atomically written file
    `directory/state.npz`: every model variable (weights and the random-generator
    states of layers such as dropout), every variable of `extra_layers` (a
    method's regressor, heads or memory bank), every optimizer variable, the history so
    far and the seconds spent, each variable under its `variable_keys` name.

    `save` writes in the background (training does not wait for the disk); `wait`
    waits for it.

    A saved state whose names or shapes differ from the model's (another
    architecture) is never loaded, not even in part: `load` says so and returns
    nothing, and training starts over.
    """

    def __init__(self, directory, model, optimizer, trainable_variables, extra_layers=()):
        self.path = Path(directory) / "state.npz"
        self._pending = None
        model_keys = variable_keys(model)
        for index, layer in enumerate(extra_layers):  # a method's own variables (`Method.extra_layers`)
            prefix = f"extra/{index}.{type(layer).__name__}/"
            model_keys.update({key: prefix + name for key, name in variable_keys(layer).items()})
        self.variables = {model_keys[id(v)]: v for v in model.variables}
        self.variables.update({model_keys[id(v)]: v for layer in extra_layers for v in layer.variables})
        opt_keys = optimizer_keys(optimizer, model_keys, trainable_variables)
        self.variables.update({opt_keys[id(v)]: v for v in optimizer.variables})
        count = len({id(v) for v in [*model.variables, *optimizer.variables]}
                    | {id(v) for layer in extra_layers for v in layer.variables})
        if len(self.variables) != count:  # two variables under one key: one would not be saved
            raise ValueError(f"resume state keys collide: {count} variables, {len(self.variables)} keys")

    def save(self, history):
        """Copies the state to host memory now and writes it in a background thread, so
        training goes on while the file is written; a write waits for the previous
        one, and `wait` for the last (`kdtoolkit.training.fit` calls it before it returns
        or raises, so an interrupted run keeps every epoch it reported)."""
        arrays = {f"var:{key}": np.array(v) for key, v in self.variables.items()}  # copies: training goes on
        arrays["history"] = np.array(json.dumps(history))
        self.wait()
        ensure_space(self.path, sum(a.nbytes for a in arrays.values()))  # a full disk: one line, now
        self._pending = _writer().submit(write_arrays_atomic, self.path, arrays)

    def wait(self):
        """Blocks until the last `save` is on disk; raises its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def load(self, log=None):
        """Restores model and (built) optimizer; returns the saved history, or [] if none
        (or if the saved state belongs to another architecture)."""
        if not self.path.exists():
            return []
        problem = npz_problem(self.path, state_check)  # `ResultsStore.resume_dir` sets such a run aside first
        if problem:
            if log is not None:
                log(f"ignoring damaged saved epoch state: {problem}; training from epoch 1")
            return []
        with np.load(self.path) as saved:
            stored = {name[4:]: saved[name] for name in saved.files if name.startswith("var:")}
            mismatch = sorted(set(stored) ^ set(self.variables)) or [
                key for key, v in self.variables.items() if tuple(stored[key].shape) != tuple(v.shape)]
            if mismatch:
                if log is not None:
                    log(f"ignoring saved epoch state {self.path}: it does not fit this model "
                        f"(first difference: {mismatch[0]}); training from epoch 1")
                return []
            for key, variable in self.variables.items():
                variable.assign(stored[key])
            return json.loads(str(saved["history"]))
