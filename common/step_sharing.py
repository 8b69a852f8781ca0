"""Which training objectives the speed machinery may share a compiled step between,
and how: the only place that knows it, so a method itself is just its name,
options, the outputs it reads, its extra layers and its loss terms.

Runs of one registered class here, of equal `signature` and model structure,
share one compiled step and predictor (`common.workspaces`); the class's
`runtime` floats are read as variables there, so one step serves every value
(KD's T and alpha: a T-curve's students). A `stackable` class's loss terms
broadcast over fused members (`common.fused.loss_groups`): given a model that
returns `(members, batch, classes)` logits and each `runtime` setting as a
`(members,)` tensor, every term comes back `(members,)`.

Classes are matched exactly, not by inheritance: a subclass may change the loss
and shares nothing until it is registered here too.
"""

import copy
import dataclasses

import tensorflow as tf

from common.methods.base import CrossEntropy
from common.methods.kd import Distillation
from common.methods.subclass import KnownSubclassTeacher, SubclassDistillation, SubclassTeacher


@dataclasses.dataclass(frozen=True)
class Sharing:
    """`signature(method)`: what the loss graph depends on beyond the model, the class
    and `runtime`, as a hashable value; `runtime`: float attributes read as
    variables; `stackable`: its terms broadcast over fused members."""

    signature: object
    runtime: tuple = ()
    stackable: bool = False


SHARING = {
    CrossEntropy: Sharing(lambda m: (), stackable=True),
    # A teacher that runs per step (no cached targets) is part of the step.
    Distillation: Sharing(lambda m: (id(m.teacher),), runtime=("temperature", "alpha"), stackable=True),
    KnownSubclassTeacher: Sharing(lambda m: (m.num_classes,)),
    SubclassTeacher: Sharing(lambda m: (m.num_classes, m.aux_weight, m.aux_temperature)),
    SubclassDistillation: Sharing(lambda m: (m.num_classes, id(m.teacher)), runtime=("temperature", "alpha")),
}


def signature(method):
    """`method`'s signature (`Sharing.signature`), or None: its step is not shared."""
    sharing = SHARING.get(type(method))
    return None if sharing is None else sharing.signature(method)


def runtime_settings(method):
    """The float attributes of `method` that a shared step reads as variables."""
    sharing = SHARING.get(type(method))
    return () if sharing is None else sharing.runtime


def stackable(method):
    """Whether `method`'s loss terms broadcast over fused members (see the module)."""
    sharing = SHARING.get(type(method))
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
