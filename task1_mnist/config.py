"""Task 1 configuration (course defaults)."""

import dataclasses

from kdtoolkit.runner import config as cfg
from kdtoolkit import losses, methods

COURSE = (
    "teacher", "kd", "scratch", "grid", "flops", "entropy", *methods.OTHER_METHODS, "skd", "takd", "eskd", "export",
    "lime", "occlusion",
)
# research studies (`kdtoolkit.runner.studies`): run when named in --only
STUDIES = ("missing", "smoothed", "efficiency", "ensemble", "capacity", "attributions", "noise", "corruption",
           "dynamics")
EXPERIMENTS = (*COURSE, *STUDIES)
TEACHER_SIZES = ("small", "course", "large")  # the teacher presets of `models.TEACHER_PRESETS`


FUSE_GRID = ("auto", "on", "stacked", "off")


@dataclasses.dataclass(frozen=True)
class Task1Config(cfg.SharedConfig):
    """Settings of a Task 1 invocation (shared ones in `SharedConfig`); validated on construction.

    `fuse_grid`: whether the grid's students train together in one compiled step
    (`Task1.fuses_grid`): `on`, `stacked` (their weights stacked: `kdtoolkit.speed.fused`),
    `off`, or `auto` (see there).
    """

    experiments = EXPERIMENTS

    out: str = "results/task1"
    validation: float = 5000 / 60000  # 5,000 of MNIST's 60,000; a share, so --limit runs hold out as many in proportion
    explain_images: int = 50
    only: tuple = COURSE
    epochs: int = 12
    batch_size: int = 256
    learning_rate: float = 1e-3
    alphas: tuple = (0.2, 0.5, 0.8)
    subclasses: int = 4
    aux_weight: float = 1.0
    aux_temperature: float = 1.0
    teacher_epochs: tuple = (2, 4)
    fuse_grid: str = "auto"
    missing_class: int = 3
    missing_teachers: tuple = TEACHER_SIZES
    attribution_images: int = 1000
    label_noise: tuple = (0.0, 0.2, 0.4, 0.6)
    image_noise: tuple = (0.0, 0.5, 1.0)

    def input_size(self):
        return 28

    def __post_init__(self):
        cfg.positive_int("epochs", self.epochs, "--epochs")
        cfg.positive_int("batch_size", self.batch_size, "--batch-size")
        cfg.positive_float("learning_rate", self.learning_rate, "--learning-rate")
        super().__post_init__()
        cfg.positive_int("subclasses", self.subclasses, "--subclasses")
        if not self.label_noise or any(isinstance(r, bool) or not 0 <= r < 0.9 for r in self.label_noise):
            raise cfg.ConfigError(f"--label-noise must list shares in [0, 0.9), got {self.label_noise!r}")
        if not self.image_noise or any(isinstance(s, bool) or not 0 <= s <= 10 for s in self.image_noise):
            raise cfg.ConfigError(f"--image-noise must list standard deviations in [0, 10] (1 = the full pixel "
                                  f"range), got {self.image_noise!r}")
        cfg.positive_int("attribution_images", self.attribution_images, "--attribution-images")
        if isinstance(self.missing_class, bool) or self.missing_class not in range(10):
            raise cfg.ConfigError(f"--missing-class must be a digit 0-9, got {self.missing_class!r}")
        cfg.choices("missing_teachers", self.missing_teachers, TEACHER_SIZES, "--missing-teachers")
        cfg.choices("fuse_grid", (self.fuse_grid,), FUSE_GRID, "--fuse-grid")
        if self.fuse_grid in ("on", "stacked") and self.precision == "mixed_float16":
            raise cfg.ConfigError(f"--fuse-grid {self.fuse_grid} cannot train under --precision mixed_float16: the "
                                  "cells would share one loss scale; use --fuse-grid off or another precision")
        if not self.aux_weight >= 0:
            raise cfg.ConfigError(f"--aux-weight must be >= 0, got {self.aux_weight!r}")
        if not self.alphas:
            raise cfg.ConfigError("--alphas must list at least one value")
        try:
            losses.validate_temperature(self.aux_temperature)
            for a in self.alphas:
                losses.validate_alpha(a)
            cfg.check_precision_range(temperatures={"--aux-temperature": [self.aux_temperature]},
                                      alphas={"--alphas": self.alphas})
        except ValueError as err:
            raise cfg.ConfigError(str(err)) from None
        if "eskd" in self.only:
            bad = [e for e in self.teacher_epochs if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= self.epochs]
            if bad or not self.teacher_epochs:
                raise cfg.ConfigError(
                    f"--teacher-epochs must list epochs between 1 and --epochs {self.epochs}, got {self.teacher_epochs!r}"
                )
