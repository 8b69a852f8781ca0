"""Missing-class transfer (Hinton, Vinyals & Dean 2015, §3).

The teacher learns every class; the student learns from a transfer set without
one class c (MNIST: no 3s). Soft targets still carry c's probability on the
other digits ("this 2 looks a bit like a 3"), so the distilled student can
recognise c without having seen one; a student from scratch on the same transfer
set cannot (it never predicts c). What is left is a bias: the student's output
unit for c is too low, since c is never the label. The paper raises c's bias by
δ = 3.5, "which optimizes overall performance on the test set", and reports 206
test errors (133 of them on the 1,010 test 3s) before, 109 (14 on 3s) after.
Vats 2021 (Tables 5.1/5.2) repeats it per teacher size: a small teacher's
students get 94.25-99.48% of the missing class right, a large one's mostly under
3%. So the study distils one KD student from each teacher it is given (the
teacher-capacity study's presets, whose runs it shares) and one scratch student.

Here δ is chosen on the validation split (which holds every class), not on the
test set, from `SHIFTS` (0 to 20 in steps of 0.1): the one of highest validation
accuracy, the smallest such. Adding δ to the logit of c is the same as adding it
to the bias of c's output unit.
"""

import numpy as np

from kdtoolkit import methods, training
from kdtoolkit.runner.run_spec import run_tag
from kdtoolkit.runner.studies import save_table

SHIFTS = np.round(np.arange(0.0, 20.0 + 1e-9, 0.1), 1)


def shift_class(logits, cls, delta):
    """`logits` (n, C) with `delta` added to column `cls` (class `cls`'s output bias)."""
    shifted = np.array(logits, dtype=np.float64, copy=True)
    shifted[:, cls] += delta
    return shifted


def best_shift(logits, labels, cls, shifts=SHIFTS):
    """`(delta, accuracy)`: the first of `shifts` that maximises the accuracy of
    `shift_class(logits, cls, delta)` on `labels`."""
    labels = np.asarray(labels).reshape(-1)
    accuracies = [float(np.mean(shift_class(logits, cls, d).argmax(-1) == labels)) for d in shifts]
    best = int(np.argmax(accuracies))  # the first maximum: the smallest shift
    return float(shifts[best]), accuracies[best]


def errors(logits, labels, cls):
    """`{"test_errors", "test_accuracy", "class_errors", "class_accuracy", "class_examples"}`
    of `(n, C)` logits: over the whole set and over the examples of class `cls`."""
    labels = np.asarray(labels).reshape(-1)
    wrong = np.asarray(logits).argmax(-1) != labels
    of_class = labels == cls
    return {"test_errors": int(wrong.sum()), "test_accuracy": float(1.0 - wrong.mean()),
            "class_errors": int(wrong[of_class].sum()),
            "class_accuracy": float(1.0 - wrong[of_class].mean()) if of_class.any() else float("nan"),
            "class_examples": int(of_class.sum())}


def examples_without(labels, cls):
    """Indices of the examples whose label is not `cls`, in order."""
    return np.flatnonzero(np.asarray(labels).reshape(-1) != cls)


def run(task, cls, build_student, teachers, course="course"):
    """The study on `task` (a `kdtoolkit.runner.recipes.Recipes`) for class `cls`, per teacher of
    `teachers` (`{preset: () -> (run name, model)}`, each trained on every class;
    `course`: the preset that is the task's own teacher): a KD student of each
    teacher (the config's T, alpha) and one scratch student, all trained without
    the examples of `cls`, each a recorded run. Every teacher and student is scored
    on the whole test set and on `cls`, raw and with `cls`'s bias raised by the
    shift chosen on the validation split (the test set without one). Writes
    `missing-s<seed>.csv` and `.json`; returns the rows."""
    kept = examples_without(task.train_labels(), cls)
    settings = task.method_settings(methods.Distillation)
    factory = task.factory(methods.Distillation, settings)
    models = []  # (teacher preset, label, model)
    for preset, teacher in teachers.items():
        own = {} if preset == course else {"teacher_preset": preset}
        stem = "-".join((f"missing{cls}-kd", *own.values(), run_tag(settings)))
        transfer = task.distil_data(teacher, [factory])
        _, kd = task.train_model(task.spec(stem, "missing-kd", missing_class=cls, **own, **settings), build_student,
                                 factory, lambda transfer=transfer: task.training_subset(transfer(), kept))
        models += [(preset, "teacher (every class)", lambda teacher=teacher: teacher()[1]),
                   (preset, f"KD student, no {cls}s", lambda kd=kd: kd)]
    _, scratch = task.train_model(task.spec(f"missing{cls}-scratch", "missing-scratch", missing_class=cls),
                                  build_student, methods.CrossEntropy,
                                  lambda: task.training_subset(task.train_data(), kept))
    models.append(("", f"scratch student, no {cls}s", lambda: scratch))
    chosen_by = "val" if "val" in task.eval_sets else "test"
    rows = []
    for preset, label, model in models:
        outputs = task.held_out(training.compiled_predictor(model()))
        shift, _ = best_shift(*outputs[chosen_by], cls)
        for bias, delta in (("as trained", 0.0), ("shifted", shift)):
            rows.append({"teacher": preset, "model": label, "bias": bias, "bias_shift": delta,
                         "chosen_by": chosen_by if delta else "",
                         **errors(shift_class(outputs["test"][0], cls, delta), outputs["test"][1], cls)})
    save_table(task, "missing", rows, ("teacher", "model", "bias", "bias_shift", "chosen_by", "test_errors",
                                       "test_accuracy", "class_errors", "class_accuracy", "class_examples"),
               missing_class=cls)
    for row in rows:
        of_teacher = f" ({row['teacher']} teacher)" if row["teacher"] else ""
        task.log(f"[missing] {row['model']}{of_teacher}, bias +{row['bias_shift']:g}: {row['test_errors']} test "
                 f"errors, {row['class_errors']} of the {row['class_examples']} {cls}s")
    return rows
