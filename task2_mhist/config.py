"""Task 2 configuration (course defaults)."""

import dataclasses
from typing import Optional

from common import config as cfg
from common.distribute import STRATEGIES

EXPERIMENTS = ("teacher", "kd", "scratch", "tcurve", "pretrained", "skd", "takd", "flops", "lime", "occlusion")
PHASES = ("feature-extraction", "finetune", "all")


@dataclasses.dataclass(frozen=True)
class Task2Config(cfg.BaseConfig):
    """Settings of a Task 2 invocation; validated on construction.

    `phase`: `feature-extraction` trains heads on frozen bases only; `finetune`
    (= `all`) then fine-tunes everything at learning rate / 10, starting from the
    saved feature-extraction run (trained first when missing).
    """

    data_dir: Optional[str] = None
    annotations: Optional[str] = None
    out: str = "results/task2"
    phase: str = "finetune"
    weights: str = "imagenet"
    image_size: int = 224
    batch_size: int = 32
    fe_epochs: int = 10
    ft_epochs: int = 25
    teacher_lr: float = 1e-4
    student_lr: float = 1e-3
    augment: bool = True
    seeds: tuple = (0,)
    temperature: float = 4.0
    alpha: float = 0.5
    temperatures: tuple = (1.0, 2.0, 4.0, 16.0, 32.0, 64.0)
    explain_images: int = 4
    lime_samples: int = 500
    occlusion_patch: int = 32
    occlusion_stride: int = 16
    top_k: int = 5
    distribute: str = "none"
    only: tuple = EXPERIMENTS
    limit: Optional[int] = None
    quiet: bool = False

    def __post_init__(self):
        for name in ("image_size", "batch_size", "fe_epochs", "ft_epochs"):
            cfg.positive_int(name, getattr(self, name), "--" + name.replace("_", "-"))
        if self.image_size < 32:
            raise cfg.ConfigError(f"--image-size must be >= 32 (keras.applications minimum), got {self.image_size}")
        cfg.positive_float("teacher_lr", self.teacher_lr, "--teacher-lr")
        cfg.positive_float("student_lr", self.student_lr, "--student-lr")
        if self.phase not in PHASES:
            raise cfg.ConfigError(f"--phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        cfg.validate_shared(self, EXPERIMENTS, STRATEGIES, image_size=self.image_size)
