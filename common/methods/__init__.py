"""Training objectives, one file per distillation method, and their registry.

A method is a `Distiller` subclass in `common/methods/<name>.py` holding its pure
loss functions, its named loss terms, its `Options` (hyperparameters, which
become CLI flags `--<name>-<field>`), the model outputs it reads and any extra
trainable variables, and ends with `METHOD = <its class>`. Adding the file's name
to `MODULES` below makes it an experiment of both tasks (`--only <name>`): the
student distilled with it from the seed's teacher, resumable and recorded like
every run.
"""

import dataclasses
import importlib

from common.methods.base import Context, CrossEntropy, Distiller, Method, check_options
from common.methods.kd import Distillation
from common.methods.subclass import KnownSubclassTeacher, SubclassDistillation, SubclassTeacher

MODULES = ("kd", "dkd", "fitnets", "at", "rkd", "crd")

REGISTRY = {}
for _module in MODULES:
    _cls = importlib.import_module(f"common.methods.{_module}").METHOD
    if _cls.name in REGISTRY:
        raise ValueError(f"two methods are named {_cls.name!r} ({REGISTRY[_cls.name].__module__} and {_module}); "
                         "rename one")
    REGISTRY[_cls.name] = _cls
OTHER_METHODS = tuple(name for name in REGISTRY if name != "kd")  # experiments beside the course's `kd`

__all__ = ["REGISTRY", "Context", "CrossEntropy", "Distiller", "Method", "Distillation", "KnownSubclassTeacher",
           "SubclassDistillation", "SubclassTeacher", "get", "option_flags", "make_options"]


def get(name):
    """The registered method class called `name`."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def option_flags():
    """`[(method, field, flag, default, help)]` for every registered method's options."""
    flags = []
    for name, cls in REGISTRY.items():
        for field in dataclasses.fields(cls.Options):
            flags.append((name, field.name, f"--{name}-{field.name.replace('_', '-')}", field.default,
                          field.metadata.get("help", "")))
    return flags


def make_options(name, values):
    """`REGISTRY[name].Options(**values)`, checked (`check_options`); raises `ValueError`
    for bad values or fields."""
    cls = get(name)
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; it takes {', '.join(sorted(known)) or 'none'}")
    options = cls.Options(**values)
    check_options(options, name)
    return options
