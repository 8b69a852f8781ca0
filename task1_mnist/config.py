"""Task 1 configuration (course defaults)."""

import dataclasses
from typing import Optional

from common import config as cfg
from common import losses

EXPERIMENTS = ("teacher", "kd", "scratch", "grid", "flops")


@dataclasses.dataclass(frozen=True)
class Task1Config(cfg.BaseConfig):
    """Settings of a Task 1 invocation; validated on construction.

    `alpha` weights the hard-label cross-entropy, `1 - alpha` the distillation term.
    """

    data_dir: Optional[str] = None
    out: str = "results/task1"
    epochs: int = 12
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 0.5
    temperatures: tuple = (1.0, 2.0, 4.0, 16.0, 32.0, 64.0)
    alphas: tuple = (0.2, 0.5, 0.8)
    only: tuple = EXPERIMENTS
    limit: Optional[int] = None
    quiet: bool = False

    def __post_init__(self):
        cfg.positive_int("epochs", self.epochs, "--epochs")
        cfg.positive_int("batch_size", self.batch_size, "--batch-size")
        cfg.positive_float("learning_rate", self.learning_rate, "--learning-rate")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise cfg.ConfigError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.limit is not None:
            cfg.positive_int("limit", self.limit, "--limit")
        for name, values in (("temperatures", self.temperatures), ("alphas", self.alphas)):
            if not values:
                raise cfg.ConfigError(f"--{name} must list at least one value")
        try:
            for t in (self.temperature, *self.temperatures):
                losses.validate_temperature(t)
            for a in (self.alpha, *self.alphas):
                losses.validate_alpha(a)
        except ValueError as err:
            raise cfg.ConfigError(str(err)) from None
        cfg.choices("only", self.only, EXPERIMENTS, "--only")
