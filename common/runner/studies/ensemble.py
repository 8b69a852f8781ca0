"""An ensemble of teachers distilled into one student (Hinton et al. 2015, §2;
Gardner 2022 (York), Table 4.1: CIFAR-10 ResNet18 members 84.37 ± 0.32%, their
ensemble 87.95%, the student distilled from it 85.32%).

The members are the task's teachers of `--ensemble-seeds` (each trained, or
reused, as that seed's `teacher` run); the ensemble's logits are the mean of
theirs (the geometric mean of their probabilities, up to normalisation); a KD
student (the config's T and alpha, this seed) learns from those logits. The
table holds each member, the ensemble and the student, on the test set, with the
student's fidelity (top-1 agreement) to the ensemble and to each member; the
metric is the task's (`test_accuracy`; Task 2: `test_auc`).
"""

import numpy as np
import tensorflow as tf

from kdtoolkit import training
from kdtoolkit.metrics import top1_agreement
from kdtoolkit.runner.studies import save_table


def mean_logits(members):
    """`x -> the mean of the members' (batch, C) logits` (frozen: inference mode)."""
    def ensemble(x, training=False):
        return tf.add_n([tf.cast(member(x, training=False), tf.float32) for member in members]) / len(members)

    return ensemble


def run(task, seeds):
    """The study on `task` (a `kdtoolkit.runner.recipes.Recipes`) with the teachers of `seeds`;
    writes `ensemble-s<seed>.csv` and `.json`; returns the rows."""
    members = [task.for_seed(seed).teacher_model() for seed in seeds]
    tag = "m" + ".".join(str(seed) for seed in seeds)
    ensemble = mean_logits([model for _, model in members])
    ensemble_name = f"ensemble-{tag}-s{task.seed}"
    (record,) = task.chain([(f"enskd-{tag}", task.student_builder())], parent=lambda: (ensemble_name, ensemble))
    student = task.model_of(record["run"])
    test = {label: task.held_out(training.compiled_predictor(model))["test"]
            for label, model in [*members, (record["run"], student)]}
    labels = test[record["run"]][1]
    # The ensemble's test logits are its members' mean: no second pass through every member.
    test[ensemble_name] = (np.mean([test[name][0] for name, _ in members], axis=0), labels)
    metric = f"test_{task.primary_metric}"
    rows = []
    for label, role in [*((name, "member") for name, _ in members), (ensemble_name, "ensemble"),
                        (record["run"], "student")]:
        logits = test[label][0]
        rows.append({"model": role, "run": label, metric: task.split_metrics("test", logits, labels, False)[metric],
                     "student_fidelity": top1_agreement(test[record["run"]][0], logits) if role != "student"
                     else None})
    single = task.kd()  # this seed's KD student of its own teacher alone: what distilling the ensemble adds
    rows.append({"model": "single-teacher student", "run": single["run"], metric: single[metric],
                 "student_fidelity": None})
    save_table(task, "ensemble", rows, ("model", metric, "student_fidelity", "run"), seeds=list(seeds), metric=metric)
    for row in rows:
        task.log(f"[ensemble] {row['model']} {row['run']}: {metric} {row[metric]:.4f}")
    return rows
