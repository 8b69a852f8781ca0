"""Robustness to noisy training data: KD against training from scratch when a share
of the training labels is wrong (`LABELS`, the `noise` study) or the training
images carry pixel noise (`IMAGES`, the `corruption` study). Thapa 2022 (New
Mexico Tech) found KD's largest gain under the heaviest corruption.

For each level of a corruption (a share of wrong labels; a pixel-noise standard
deviation), the seed's training set is corrupted once, drawn from the seed and
the level. A teacher learns from it. A KD student (the config's T and alpha)
learns from that teacher's outputs on the same corrupted set, and a scratch
student from the corrupted set alone. The validation and test sets stay clean.
Level 0 is the course's teacher, KD and scratch. The table holds the three test
accuracies per level and KD's gain over scratch.

The corrupted set replaces the training arrays of a twin of the task (same data
identity, results and compiled steps; the level is in each run's identity), so
the teacher's cached outputs are those on the corrupted images. This needs a
task that keeps its training set in memory as `arrays` (Task 1).
"""

import dataclasses
from typing import Callable

import numpy as np

from kdtoolkit import methods
from kdtoolkit.runner.run_spec import run_tag
from kdtoolkit.runner.studies import save_table


def noisy_labels(labels, rate, num_classes, seed):
    """`labels` with `round(rate · n)` of them, chosen at random, replaced by a random
    other class (the draw depends on `seed` and `rate` only)."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng([seed, int(round(rate * 1e6))])
    flipped = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=len(flipped))) % num_classes
    return noisy.astype(labels.dtype)


def noisy_images(images, std, seed):
    """uint8 `images` plus Gaussian noise of standard deviation `std` in units of the
    full pixel range (`std` = 1: 255 levels), rounded and clipped to [0, 255]; the
    draw depends on `seed` and `std` only."""
    rng = np.random.default_rng([seed, int(round(std * 1e6)), 1])
    noise = rng.standard_normal(images.shape, dtype=np.float32) * np.float32(255 * std)
    return np.clip(np.rint(images + noise), 0, 255).astype(images.dtype)


@dataclasses.dataclass(frozen=True)
class Corruption:
    """One way of corrupting the training set: `name` keys the table
    (`<name>-s<seed>.csv`) and the level in each run's identity; runs are named
    `teacher-<tag><level>`, `<tag><level>-kd-...`, `<tag><level>-scratch` and their
    experiments `<experiment>-teacher|kd|scratch`; `arrays(task, level)` gives the
    replaced training arrays; `describe(level)` reads a level for the log."""

    name: str
    tag: str
    experiment: str
    arrays: Callable
    describe: Callable


LABELS = Corruption("label_noise", "noise", "noisy",
                    lambda task, rate: {"y_train": noisy_labels(task.train_labels(), rate, task.num_classes,
                                                                task.seed)},
                    lambda rate: f"labels {rate:.0%} wrong")
IMAGES = Corruption("image_noise", "pixnoise", "pixnoise",
                    lambda task, std: {"x_train": noisy_images(task.arrays["x_train"], std, task.seed)},
                    lambda std: f"pixel noise std {std:g}")


def corrupted_twin(task, arrays):
    """A twin of `task` (same seed, data identity and results) whose training arrays
    are replaced by `arrays` (`{"x_train" | "y_train": array}`)."""
    twin = task.for_seed(task.seed)
    twin.arrays = {**twin.arrays, **arrays}
    return twin


def run(task, corruption, levels, build_teacher, build_student):
    """The study of `corruption` on `task` (a `kdtoolkit.runner.recipes.Recipes`) for each of
    `levels`; writes `<corruption.name>-s<seed>.csv` and `.json`; returns the rows."""
    settings = task.method_settings(methods.Distillation)
    rows = []
    for level in levels:
        if level == 0:
            teacher = task.store.load(task.teacher_model()[0])
            kd, scratch = task.kd(), task.scratch()
        else:
            twin = corrupted_twin(task, corruption.arrays(task, level))
            tag, key, kind = f"{corruption.tag}{level:g}", {corruption.name: level}, corruption.experiment
            teacher, teacher_model = twin.train_model(twin.spec(f"teacher-{tag}", f"{kind}-teacher", **key),
                                                      build_teacher, methods.CrossEntropy, twin.train_data,
                                                      **twin.teacher_fit_options())
            factory = twin.factory(methods.Distillation, settings)
            kd, _ = twin.distil(twin.spec(f"{tag}-kd-{run_tag(settings)}", f"{kind}-kd", **key, **settings),
                                build_student, lambda: (teacher["run"], teacher_model), factory)
            scratch, _ = twin.train_model(twin.spec(f"{tag}-scratch", f"{kind}-scratch", **key),
                                          build_student, methods.CrossEntropy, twin.train_data)
        rows.append({corruption.name: level, "teacher_test_accuracy": teacher["test_accuracy"],
                     "kd_test_accuracy": kd["test_accuracy"], "scratch_test_accuracy": scratch["test_accuracy"],
                     "kd_gain": kd["test_accuracy"] - scratch["test_accuracy"],
                     "runs": " ".join(r["run"] for r in (teacher, kd, scratch))})
        task.log(f"[{corruption.tag}] {corruption.describe(level)}: teacher {teacher['test_accuracy']:.4f}, "
                 f"KD {kd['test_accuracy']:.4f}, scratch {scratch['test_accuracy']:.4f}")
    save_table(task, corruption.name, rows)
    return rows
