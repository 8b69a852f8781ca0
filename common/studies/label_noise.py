"""Robustness to label noise: KD against training from scratch when a share of the
training labels is wrong (Thapa 2022 (New Mexico Tech): the largest KD gain came
under the heaviest corruption).

For each rate r of `--label-noise`, a fraction r of the training labels is
replaced by a uniformly drawn other class (symmetric noise, drawn once per seed
and rate); a teacher learns from those labels, a KD student (the config's T and
alpha) learns from that teacher and the same noisy labels, and a scratch student
from the noisy labels alone. The test labels stay clean. The table holds the
three test accuracies per rate; rate 0 is the course's teacher, KD and scratch.
"""

import numpy as np

from common import methods
from common.results import write_csv_atomic, write_json_atomic
from common.run_spec import run_tag


def noisy_labels(labels, rate, num_classes, seed):
    """`labels` with `round(rate · n)` of them, chosen at random, replaced by a random
    other class (the draw depends on `seed` and `rate` only)."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng([seed, int(round(rate * 1e6))])
    flipped = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=len(flipped))) % num_classes
    return noisy.astype(labels.dtype)


def run(task, rates, build_teacher, build_student):
    """The study on `task` (a `common.recipes.Recipes`) for each rate of `rates`;
    writes `label_noise-s<seed>.csv` and `.json`; returns the rows."""
    settings = task.method_settings(methods.Distillation)
    rows = []
    for rate in rates:
        if rate == 0:
            teacher = task.store.load(task.teacher_model()[0])
            kd, scratch = task.kd(), task.scratch()
        else:
            noisy = noisy_labels(task.train_labels(), rate, task.num_classes, task.seed)
            relabel = lambda arrays, noisy=noisy: {**arrays, "y": noisy}  # noqa: E731
            tag = f"noise{rate:g}"
            teacher, teacher_model = task.train_model(
                task.spec(f"teacher-{tag}", "noisy-teacher", label_noise=rate), build_teacher, methods.CrossEntropy,
                lambda: relabel(task.train_data()))
            factory = task.factory(methods.Distillation, settings)
            transfer = task.distil_data(lambda: (teacher["run"], teacher_model), [factory])
            kd, _ = task.train_model(task.spec(f"{tag}-kd-{run_tag(settings)}", "noisy-kd", label_noise=rate,
                                               **settings), build_student, factory, lambda: relabel(transfer()))
            scratch, _ = task.train_model(task.spec(f"{tag}-scratch", "noisy-scratch", label_noise=rate),
                                          build_student, methods.CrossEntropy, lambda: relabel(task.train_data()))
        rows.append({"label_noise": rate, "teacher_test_accuracy": teacher["test_accuracy"],
                     "kd_test_accuracy": kd["test_accuracy"], "scratch_test_accuracy": scratch["test_accuracy"],
                     "kd_gain": kd["test_accuracy"] - scratch["test_accuracy"],
                     "runs": " ".join(r["run"] for r in (teacher, kd, scratch))})
        task.log(f"[noise] labels {rate:.0%} wrong: teacher {teacher['test_accuracy']:.4f}, "
                 f"KD {kd['test_accuracy']:.4f}, scratch {scratch['test_accuracy']:.4f}")
    stem = task.store.root / f"label_noise-s{task.seed}"
    write_csv_atomic(stem.with_suffix(".csv"), rows, tuple(rows[0]))
    write_json_atomic(stem.with_suffix(".json"), {"rows": rows})
    return rows
