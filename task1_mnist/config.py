"""Task 1 configuration (course defaults)."""

import dataclasses
from typing import Optional

from common import config as cfg
from common.distribute import STRATEGIES
from common import losses

EXPERIMENTS = (
    "teacher", "kd", "scratch", "grid", "flops", "entropy", "skd", "takd", "eskd", "lime", "occlusion",
)


@dataclasses.dataclass(frozen=True)
class Task1Config(cfg.BaseConfig):
    """Settings of a Task 1 invocation; validated on construction.

    `alpha` weights the hard-label cross-entropy, `1 - alpha` the distillation term.
    Every experiment is repeated for each seed in `seeds`.
    """

    data_dir: Optional[str] = None
    out: str = "results/task1"
    epochs: int = 12
    batch_size: int = 256
    learning_rate: float = 1e-3
    seeds: tuple = (0,)
    temperature: float = 4.0
    alpha: float = 0.5
    temperatures: tuple = (1.0, 2.0, 4.0, 16.0, 32.0, 64.0)
    alphas: tuple = (0.2, 0.5, 0.8)
    subclasses: int = 4
    aux_weight: float = 1.0
    aux_temperature: float = 1.0
    teacher_epochs: tuple = (2, 4)
    explain_images: int = 50
    lime_samples: int = 1000
    occlusion_patch: int = 4
    occlusion_stride: int = 2
    top_k: int = 5
    distribute: str = "none"
    only: tuple = EXPERIMENTS
    limit: Optional[int] = None
    quiet: bool = False

    def __post_init__(self):
        cfg.positive_int("epochs", self.epochs, "--epochs")
        cfg.positive_int("batch_size", self.batch_size, "--batch-size")
        cfg.positive_float("learning_rate", self.learning_rate, "--learning-rate")
        cfg.validate_shared(self, EXPERIMENTS, STRATEGIES, image_size=28)
        cfg.positive_int("subclasses", self.subclasses, "--subclasses")
        if not self.aux_weight >= 0:
            raise cfg.ConfigError(f"--aux-weight must be >= 0, got {self.aux_weight!r}")
        if not self.alphas:
            raise cfg.ConfigError("--alphas must list at least one value")
        try:
            losses.validate_temperature(self.aux_temperature)
            for a in self.alphas:
                losses.validate_alpha(a)
        except ValueError as err:
            raise cfg.ConfigError(str(err)) from None
        if "eskd" in self.only:
            bad = [e for e in self.teacher_epochs if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= self.epochs]
            if bad or not self.teacher_epochs:
                raise cfg.ConfigError(
                    f"--teacher-epochs must list epochs between 1 and --epochs {self.epochs}, got {self.teacher_epochs!r}"
                )
