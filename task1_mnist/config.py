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
    explain_images: int = 10
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
        cfg.seed_list(self.seeds)
        if self.limit is not None:
            cfg.positive_int("limit", self.limit, "--limit")
        cfg.positive_int("subclasses", self.subclasses, "--subclasses")
        cfg.positive_int("explain_images", self.explain_images, "--explain-images")
        cfg.positive_int("lime_samples", self.lime_samples, "--lime-samples")
        cfg.positive_int("occlusion_stride", self.occlusion_stride, "--occlusion-stride")
        cfg.positive_int("top_k", self.top_k, "--top-k")
        if not (isinstance(self.occlusion_patch, int) and 1 <= self.occlusion_patch <= 28):
            raise cfg.ConfigError(f"--occlusion-patch must be an integer in 1..28, got {self.occlusion_patch!r}")
        if not self.aux_weight >= 0:
            raise cfg.ConfigError(f"--aux-weight must be >= 0, got {self.aux_weight!r}")
        for name, values in (("temperatures", self.temperatures), ("alphas", self.alphas)):
            if not values:
                raise cfg.ConfigError(f"--{name} must list at least one value")
        try:
            for t in (self.temperature, self.aux_temperature, *self.temperatures):
                losses.validate_temperature(t)
            for a in (self.alpha, *self.alphas):
                losses.validate_alpha(a)
        except ValueError as err:
            raise cfg.ConfigError(str(err)) from None
        cfg.choices("only", self.only, EXPERIMENTS, "--only")
        cfg.choices("distribute", (self.distribute,), STRATEGIES, "--distribute")
        if "eskd" in self.only:
            bad = [e for e in self.teacher_epochs if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= self.epochs]
            if bad or not self.teacher_epochs:
                raise cfg.ConfigError(
                    f"--teacher-epochs must list epochs between 1 and --epochs {self.epochs}, got {self.teacher_epochs!r}"
                )
