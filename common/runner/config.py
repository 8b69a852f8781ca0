"""Typed, validated run configuration shared by the task CLIs."""

import dataclasses
import json
import math
from typing import ClassVar, Optional

from kdtoolkit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Base for task configs: validation helpers, dict form and pretty printing."""

    def as_dict(self):
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def describe(self):
        """Multi-line `name = value` listing, printed at the start of every run."""
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(
            f"  {f.name:<{width}} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)
        )


@dataclasses.dataclass(frozen=True)
class SharedConfig(BaseConfig):
    """The settings both tasks take (a task redeclares a field to change its default).

    `alpha` weights the hard-label cross-entropy, `1 - alpha` the distillation term.
    `chain_method`: the registered method the teacher-assistant chain (and Task 1's
    early-stopped teachers) distil with. `method_options`: `{method: {option:
    value}}` from the `--<method>-<option>` flags (unset options keep the method's
    defaults). Every experiment is repeated for each seed in `seeds`. `validation` training
    examples (a count, or a fraction below 1) are held out, stratified by class, to
    choose T and alpha; the test set only reports.
    """

    experiments: ClassVar[tuple] = ()  # the task's experiment names, for `only`

    data_dir: Optional[str] = None
    out: str = "results"
    seeds: tuple = (0,)
    temperature: float = 4.0
    alpha: float = 0.5
    temperatures: tuple = (1.0, 2.0, 4.0, 16.0, 32.0, 64.0)
    explain_images: int = 4
    lime_samples: int = 1000
    occlusion_patch: int = 4
    occlusion_stride: int = 2
    top_k: int = 5
    validation: float = 0
    chain_method: str = "kd"
    ensemble_seeds: tuple = (0, 1, 2)
    per_class: tuple = (10, 60, 500)
    method_options: dict = dataclasses.field(default_factory=dict)
    distribute: str = "none"
    deterministic: bool = False
    tf32: bool = True
    precision: str = "auto"
    jit: str = "auto"
    steps_per_call: int = 1
    share_steps: bool = True
    only: tuple = ()
    limit: Optional[int] = None
    quiet: bool = False

    def input_size(self):
        """Side of the (square) input images in pixels."""
        raise NotImplementedError

    def __post_init__(self):
        from kdtoolkit.distribute import STRATEGIES

        validate_shared(self, self.experiments, STRATEGIES, self.input_size())


def positive_int(name, value, option=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option or name} must be an integer >= 1, got {value!r}")
    return value


def positive_float(name, value, option=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{option or name} must be a number > 0, got {value!r}")
    return float(value)


def choices(name, values, allowed, option=None):
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise ConfigError(
            f"{option or name}: unknown or empty selection {unknown or values!r}; "
            f"choose from {', '.join(allowed)}"
        )
    return tuple(values)


def seed_list(values, flag="--seeds", minimum=1):
    """`values` as a tuple of distinct seeds >= 0, at least `minimum` of them; a
    `ConfigError` naming `flag` otherwise."""
    if len(values) < minimum or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values):
        raise ConfigError(f"{flag} must list {'' if minimum == 1 else f'{minimum} or more '}integers >= 0, "
                          f"got {values!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} lists a seed twice: {values!r}")
    return tuple(values)


def check_precision_range(temperatures=(), alphas=()):
    """Refuses (`ConfigError`, one line) a temperature or hard-label weight at which
    a loss term underflows in the loss's precision (`losses.temperature_problem`,
    `losses.weight_problem`: bounds derived from float32's range, not picked).
    `temperatures`, `alphas`: `{flag: values}`; values that are not numbers are left
    to the other checks."""
    from kdtoolkit import losses

    problems = [losses.temperature_problem(float(v), flag) for flag, values in dict(temperatures).items()
                for v in values if _real(v) and v > 0]
    problems += [losses.weight_problem(float(v), flag) for flag, values in dict(alphas).items()
                 for v in values if _real(v) and 0 <= v <= 1]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(problems[0])


def _real(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def validate_shared(config, experiments, strategies, image_size):
    """Checks the settings both task configs share (seeds, KD, explanations, ...)."""
    seed_list(config.seeds)
    v = config.validation
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v >= 1 and v != int(v)):
        raise ConfigError(f"--validation must be a count of training examples (0 for none) or a fraction "
                          f"between 0 and 1, got {v!r}")
    if config.limit is not None:
        positive_int("limit", config.limit, "--limit")
    for name in ("explain_images", "lime_samples", "occlusion_patch", "occlusion_stride", "top_k"):
        positive_int(name, getattr(config, name), "--" + name.replace("_", "-"))
    if config.occlusion_patch > image_size:
        raise ConfigError(f"--occlusion-patch {config.occlusion_patch} is larger than the {image_size}-pixel images")
    if not config.temperatures:
        raise ConfigError("--temperatures must list at least one value")
    from kdtoolkit import losses, methods

    shared = {"temperature": config.temperature, "alpha": config.alpha}
    try:
        for t in config.temperatures:
            losses.validate_temperature(t)
        check_precision_range(temperatures={"--temperature": [config.temperature], "--temperatures": config.temperatures},
                              alphas={"--alpha": [config.alpha]})
        for name in methods.REGISTRY:  # every method's options as its runs will take them
            methods.make_options(name, dict(config.method_options).get(name, {}), shared)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    unknown = sorted(set(dict(config.method_options)) - set(methods.REGISTRY))
    if unknown:
        raise ConfigError(f"no registered method {', '.join(unknown)}; choose from {', '.join(methods.REGISTRY)}")
    choices("only", config.only, experiments, "--only")
    choices("chain_method", (config.chain_method,), tuple(methods.REGISTRY), "--chain-method")
    seed_list(config.ensemble_seeds, "--ensemble-seeds", minimum=2)
    if not config.per_class or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in config.per_class):
        raise ConfigError(f"--per-class must list counts >= 1, got {config.per_class!r}")
    choices("distribute", (config.distribute,), strategies, "--distribute")
    from kdtoolkit import device

    choices("precision", (config.precision,), device.PRECISION_CHOICES, "--precision")
    choices("jit", (config.jit,), device.JIT, "--jit")
    if config.deterministic and config.jit == "on":
        raise ConfigError("--deterministic cannot go with --jit on: XLA has no deterministic GPU MaxPool gradient; "
                          "use --jit auto (off under --deterministic) or --jit off")
    positive_int("steps_per_call", config.steps_per_call, "--steps-per-call")
