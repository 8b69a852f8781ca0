"""Teacher capacity: how the student's accuracy and the teacher's soft targets change
with the teacher's size (Cho & Hariharan 2019; Vats 2021, ch. 5-6: on MNIST,
teachers of 1,433,610 and 2,560,906 parameters, the bigger distilling worse).

One teacher per preset (the task's `TEACHER_PRESETS`, e.g. Task 1's small =
the assistant's design, course = the course teacher, large = twice its widths),
each trained by cross-entropy on the course's teacher schedule; the course
preset is the seed's own `teacher` run. Task 2's presets are its ImageNet bases:
DenseNet121 (the assistant's architecture) and the course's ResNet50V2. A KD
student (the config's T and alpha) learns from each. The table holds each
teacher's parameters and test metric (`test_accuracy`; Task 2: `test_auc`), the
mean entropy of its softened outputs at T on the training set, and its
student's test metric and agreement with it.
"""

from kdtoolkit import losses, methods
from kdtoolkit.runner.studies import save_table


def preset_teacher(task, preset, build, course="course"):
    """`() -> (run name, model)`: the teacher of `preset` (built by `build`) trained by
    cross-entropy on the task's teacher schedule, or loaded when finished; for the
    `course` preset, the task's own `teacher` run. Other studies (missing-class
    transfer per teacher size) reuse these runs."""
    if preset == course:
        return task.teacher_model

    def trained():
        record, model = task.train_model(task.spec(f"teacher-{preset}", "capacity-teacher", preset=preset), build,
                                         methods.CrossEntropy, task.train_data, **task.teacher_fit_options())
        return record["run"], model
    return trained


def run(task, presets, course="course"):
    """The study on `task` (a `kdtoolkit.runner.recipes.Recipes`) over `presets` (`{name: build}`;
    `course`: the preset that is the task's own teacher). Writes
    `teacher_capacity-s<seed>.csv` and `.json`; returns the rows."""
    temperature = task.method_settings(methods.Distillation)["temperature"]
    metric = f"test_{task.primary_metric}"
    rows = []
    for preset, build in presets.items():
        name, teacher = preset_teacher(task, preset, build, course)()
        record = task.store.load(name)
        if preset == course:
            student = task.kd()
        else:
            (student,) = task.chain([(f"capkd-{preset}", task.student_builder())], parent=lambda: (name, teacher))
        entropy = float(losses.soft_target_entropy(task.logits_of(name, teacher), temperature))
        rows.append({"preset": preset, "teacher_params": record["params"],
                     f"teacher_{metric}": record[metric], "soft_target_entropy_nats": entropy,
                     f"student_{metric}": student[metric],
                     "student_fidelity": student.get("test_fidelity"), "teacher_run": record["run"],
                     "student_run": student["run"]})
        task.log(f"[capacity] {preset} teacher ({record['params']:,} params): {metric} {record[metric]:.4f}, "
                 f"entropy {entropy:.3f} nats at T={temperature:g}; its student {student[metric]:.4f}")
    save_table(task, "teacher_capacity", rows, temperature=temperature, metric=metric)
    return rows
