"""Which runs share a compiled step, read from each method class's own
`shared_step` (`kdtoolkit.methods.base.SharedStep`).

Runs of one method class, of equal `signature` and model structure, share one
compiled step and predictor (`kdtoolkit.speed.workspaces`); the class's `runtime`
floats are read as variables there, so one step serves every value (KD's T and
alpha: a T-curve's students). A `stackable` class's loss terms broadcast over
fused members (`kdtoolkit.speed.fused.loss_groups`): given a model that returns
`(members, batch, classes)` logits and each `runtime` setting as a `(members,)`
tensor, every term comes back `(members,)`.

`shared_step` is read from the class itself, not inherited: a subclass may
change the loss and shares nothing until it declares its own.
"""

import copy
import dataclasses

import tensorflow as tf


def _sharing(method):
    return vars(type(method)).get("shared_step")


def signature(method):
    """`method`'s signature (`SharedStep.signature`), or None: its step is not shared."""
    sharing = _sharing(method)
    return None if sharing is None else sharing.signature(method)


def runtime_settings(method):
    """The float attributes of `method` that a shared step reads as variables."""
    sharing = _sharing(method)
    return () if sharing is None else sharing.runtime


def stackable(method):
    """Whether `method`'s loss terms broadcast over fused members (see the module)."""
    sharing = _sharing(method)
    return sharing is not None and sharing.stackable


def loss_key(method):
    """What fused members must share to compute their loss in one call: class,
    signature and options, less the `runtime_settings` (KD cells at other T and
    alpha share one)."""
    options = getattr(method, "options", None)
    fixed = () if options is None else tuple(
        (k, v) for k, v in dataclasses.asdict(options).items() if k not in runtime_settings(method))
    return type(method), signature(method), fixed


def rebind(method, model):
    """`method` on `model` (of the same structure), each of its `runtime_settings` a
    float32 variable that a workspace assigns per run. Only for shareable methods:
    those keep no other reference to their model."""
    twin = copy.copy(method)
    twin.model = model
    for name in runtime_settings(method):
        setattr(twin, name, tf.Variable(float(getattr(method, name)), dtype=tf.float32, trainable=False))
    return twin
