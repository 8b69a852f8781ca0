"""Task 2 configuration (course defaults)."""

import dataclasses
from typing import Optional

from kdtoolkit.runner import config as cfg
from kdtoolkit import methods

COURSE = ("teacher", "kd", "scratch", "tcurve", "pretrained", *methods.OTHER_METHODS, "skd", "takd", "flops",
          "export", "lime", "occlusion")
STUDIES = ("smoothed", "efficiency", "ensemble", "capacity")  # research studies (`kdtoolkit.runner.studies`): run when named in --only
EXPERIMENTS = (*COURSE, *STUDIES)
PHASES = ("feature-extraction", "finetune", "all")
FEATURE_CACHE = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Task2Config(cfg.SharedConfig):
    """Settings of a Task 2 invocation (shared ones in `SharedConfig`); validated on construction.

    `phase`: `feature-extraction` trains heads on frozen bases only; `finetune`
    (= `all`) then fine-tunes everything at learning rate / 10, starting from the
    saved feature-extraction run (trained first when missing).

    `feature_cache`: feature extraction trains the head on the frozen base's
    features, computed once per distinct base (per view with augmentation) and
    shared by every run starting from that base: `on`, `off`, or `auto` = on when
    the views to compute (8 with augmentation, else 1) are at most `fe_epochs`.
    """

    experiments = EXPERIMENTS

    out: str = "results/task2"
    validation: float = 0.15
    lime_samples: int = 500
    occlusion_patch: int = 32
    occlusion_stride: int = 16
    only: tuple = COURSE
    annotations: Optional[str] = None
    phase: str = "finetune"
    weights: str = "imagenet"
    image_size: int = 224
    batch_size: int = 32
    fe_epochs: int = 10
    ft_epochs: int = 25
    teacher_lr: float = 1e-4
    student_lr: float = 1e-3
    augment: bool = True
    feature_cache: str = "auto"
    per_class: tuple = (10, 50, 250)  # MHIST's training set: 1,545 HP and 630 SSA before the validation split

    def input_size(self):
        return self.image_size

    def __post_init__(self):
        for name in ("image_size", "batch_size", "fe_epochs", "ft_epochs"):
            cfg.positive_int(name, getattr(self, name), "--" + name.replace("_", "-"))
        if self.image_size < 32:
            raise cfg.ConfigError(f"--image-size must be >= 32 (keras.applications minimum), got {self.image_size}")
        cfg.positive_float("teacher_lr", self.teacher_lr, "--teacher-lr")
        cfg.positive_float("student_lr", self.student_lr, "--student-lr")
        if self.phase not in PHASES:
            raise cfg.ConfigError(f"--phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        cfg.choices("feature_cache", (self.feature_cache,), FEATURE_CACHE, "--feature-cache")
        super().__post_init__()
