"""Data efficiency: student accuracy against the size of the transfer set.

Vats 2021 (Indiana, Fig. 5.5): with a small MNIST teacher, a student distilled on
60 examples per class chosen by the teacher's soft-target entropy passed 95%
test accuracy (about 500 per class with a large teacher); Hinton et al. 2015
(speech): soft targets on 3% of the data came close to hard targets on all of it.

For each count N in `--per-class`, three students: KD (the config's T and alpha)
on N random examples of each class, KD on the N of each class whose softened
teacher output (at T) has the highest entropy, and a scratch student on the same
random examples. A class with fewer than N examples gives all it has. Each
transfer set is repeated (in a fresh shuffle each epoch) up to the size of the
full training set, so every run takes the course's number of steps: a small set
is not also a short schedule. The random choice is the seed's. The subset
reaches training through `task.training_subset` (Task 1 indexes its arrays;
Task 2 streams the chosen images by index), and an entropy is the mean over a
teacher's views where it has several (Task 2).
"""

import functools

import numpy as np

from kdtoolkit import methods
from kdtoolkit.runner.run_spec import run_tag
from kdtoolkit.runner.studies import save_table

SELECTIONS = ("random", "entropy")


def soft_target_entropies(logits, temperature):
    """`(n,)` entropy (nats) of softmax(logits / T) of each example of `(n, C)` logits;
    of `(n, views, C)` logits (Task 2's dihedral views), its mean over the views."""
    scaled = np.asarray(logits, np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    log_p = scaled - np.log(np.exp(scaled).sum(axis=-1, keepdims=True))
    entropy = -(np.exp(log_p) * log_p).sum(axis=-1)
    return entropy.reshape(len(entropy), -1).mean(axis=1)


def per_class_subset(labels, per_class, order):
    """Indices of the first `per_class` examples of each class in `order` (a
    permutation of the example indices), in index order."""
    labels = np.asarray(labels).reshape(-1)
    order = np.asarray(order)
    chosen = [order[labels[order] == c][:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def repeated(indices, size):
    """`indices` tiled (whole copies, then a head) to `max(size, len(indices))` entries."""
    copies = -(-size // len(indices))
    return np.tile(indices, copies)[:max(size, len(indices))]


def run(task, counts, build_student):
    """The study on `task` (a `kdtoolkit.runner.recipes.Recipes`) for each per-class count of
    `counts`; writes `data_efficiency-s<seed>.csv` and `.json` (each run's test
    metric: Task 1's accuracy, Task 2's AUC); returns the rows."""
    labels = task.train_labels()
    settings = task.method_settings(methods.Distillation)
    factory = task.factory(methods.Distillation, settings)
    transfer = task.distil_data(task.teacher_model, [factory])
    random_order = np.random.default_rng(task.seed).permutation(len(labels))
    metric = f"test_{task.primary_metric}"

    @functools.cache  # once per study: every entropy-chosen set of each count reads it
    def entropy_order():
        entropy = soft_target_entropies(task.logits_of(*task.teacher_model()), settings["temperature"])
        return np.argsort(-entropy, kind="stable")

    def subset(arrays, n, selection):
        order = random_order if selection == "random" else entropy_order()
        return task.training_subset(arrays, repeated(per_class_subset(labels, n, order), len(labels)))

    rows = []
    for n in counts:
        kd_runs = [(selection, f"efficiency-n{n}-{selection}-{run_tag(settings)}", "efficiency-kd", factory,
                    lambda n=n, s=selection: subset(transfer(), n, s)) for selection in SELECTIONS]
        scratch_run = ("random", f"efficiency-n{n}-random-scratch", "efficiency-scratch", methods.CrossEntropy,
                       lambda n=n: subset(task.train_data(), n, "random"))
        for selection, stem, experiment, make_method, data in (*kd_runs, scratch_run):
            extra = settings if experiment == "efficiency-kd" else {}
            record, _ = task.train_model(task.spec(stem, experiment, per_class=n, selection=selection, **extra),
                                         build_student, make_method, data, **task.student_fit_options())
            rows.append({"per_class": n, "selection": selection, "method": experiment.split("-")[1],
                         "examples": int(len(per_class_subset(labels, n, random_order))),
                         metric: record[metric], "run": record["run"]})
            task.log(f"[efficiency] {n} per class, {selection}, {rows[-1]['method']}: "
                     f"{metric} {record[metric]:.4f}")
    save_table(task, "data_efficiency", rows, ("per_class", "selection", "method", "examples", metric, "run"),
               temperature=settings["temperature"], metric=metric)
    return rows
