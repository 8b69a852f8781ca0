"""Training objectives, one file per distillation method, and their registry.

A method is a `Distiller` subclass in `common/methods/<name>.py` holding its pure
loss functions, its named loss terms, its `Options` (hyperparameters, which
become CLI flags `--<name>-<field>`), the model outputs it reads and any extra
trainable variables, decorated with `@register`. Importing this package imports
every module of this folder (those whose name starts with `_` excepted), so the
file alone makes the method an experiment of both tasks (`--only <name>`): the
student distilled with it from the seed's teacher, resumable and recorded like
every run. `REGISTRY` is in alphabetical order of the methods' names.
"""

import dataclasses
import importlib
import pkgutil

from kdtoolkit.methods import base
from kdtoolkit.methods.base import (SHARED_OPTIONS, Context, CrossEntropy, Distiller, LabelFreeTerm, Method,
                                    SharedStep, argument_name, check_options, option_flag, register, run_settings)
from kdtoolkit.methods.kd import Distillation
from kdtoolkit.methods.subclass import KnownSubclassTeacher, SubclassDistillation, SubclassTeacher

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
REGISTRY = base.REGISTRY  # one dict, in name order: a method registered later is found too
OTHER_METHODS = tuple(name for name in REGISTRY if name != "kd")  # experiments beside the course's `kd`

__all__ = ["REGISTRY", "SHARED_OPTIONS", "Context", "CrossEntropy", "Distiller", "LabelFreeTerm", "Method",
           "SharedStep", "Distillation", "KnownSubclassTeacher", "SubclassDistillation", "SubclassTeacher",
           "argument_name", "get", "option_flags", "make_options", "options_dict", "register", "run_settings"]


def get(name):
    """The registered method class called `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def option_flags():
    """`[(method, field, flag, default, help)]` for every registered method's own options
    (the shared `temperature` and `alpha` have the task's `--temperature` / `--alpha`)."""
    flags = []
    for name, cls in REGISTRY.items():
        for field in dataclasses.fields(cls.Options):
            if field.name not in SHARED_OPTIONS:
                flags.append((name, field.name, option_flag(name, field.name), field.default,
                              field.metadata.get("help", "")))
    return flags


def options_dict(options):
    """`{field: value}` of an `Options` dataclass (JSON-ready: what a config saves)."""
    return dataclasses.asdict(options)


def make_options(method, values, shared=None, naming=option_flag):
    """`Options(**values)` of `method` (a registered name or a `Distiller` class), checked
    (`check_options`), with each of `shared` (e.g. `{"temperature": 4, "alpha": 0.5}`)
    that the method has and `values` does not give; an int given for a float option
    becomes a float. Raises `ValueError` for bad values or unknown fields."""
    cls = get(method) if isinstance(method, str) else method
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{cls.name} has no option {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(fields)) or 'none'}")
    given = {**{k: v for k, v in (shared or {}).items() if k in fields}, **values}
    given = {k: float(v) if isinstance(fields[k].default, float) and type(v) is int else v for k, v in given.items()}
    options = cls.Options(**given)
    check_options(options, cls.name, naming)
    return options
