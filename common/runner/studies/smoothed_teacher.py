"""Distilling from a label-smoothed teacher (Müller, Kornblith & Hinton 2019, §4).

Label smoothing makes a teacher's penultimate clusters tighter and erases how
similar an example is to the other classes, the information distillation
transfers: Müller et al. found that teachers trained with label smoothing are
better alone but distil worse students. This study trains a second teacher of
the same architecture and schedule with the `ls` objective
(`kdtoolkit.methods.ls`, ε = `--ls-epsilon`), distils a student from it by KD at
the config's T and alpha, and puts both teachers and both students side by side
with each teacher's soft-target entropy at T (how much "dark knowledge" its
softened outputs carry); the metric is the task's (`test_accuracy`; Task 2:
`test_auc`).
"""

from kdtoolkit import losses, methods
from kdtoolkit.methods.ls import LabelSmoothing
from kdtoolkit.runner.studies import save_table


def run(task, build_teacher):
    """The study on `task` (a `kdtoolkit.runner.recipes.Recipes`): writes
    `smoothed_teacher-s<seed>.csv` and `.json`; returns the rows."""
    options = methods.make_options("ls", dict(task.config.method_options).get("ls", {}))
    tag = f"e{options.epsilon:g}"
    smoothed, smoothed_model = task.train_model(
        task.spec(f"teacher-ls-{tag}", "ls-teacher", epsilon=options.epsilon), build_teacher,
        lambda model: LabelSmoothing(model, options, task.context(model)), task.train_data,
        **task.teacher_fit_options())
    (student,) = task.chain([(f"lskd-{tag}", task.student_builder())],
                            parent=lambda: (smoothed["run"], smoothed_model))
    plain_name, plain_model = task.teacher_model()
    temperature = task.method_settings(methods.Distillation)["temperature"]
    metric = f"test_{task.primary_metric}"
    rows = []
    for label, record, teacher in (("teacher, hard labels", task.store.load(plain_name), (plain_name, plain_model)),
                                   (f"teacher, label smoothing eps={options.epsilon:g}", smoothed,
                                    (smoothed["run"], smoothed_model))):
        entropy = float(losses.soft_target_entropy(task.logits_of(*teacher), temperature))
        rows.append({"model": label, "run": record["run"], metric: record[metric], "soft_target_entropy_nats": entropy})
    for label, record in (("KD student from the hard-label teacher", task.kd()),
                          ("KD student from the smoothed teacher", student)):
        rows.append({"model": label, "run": record["run"], metric: record[metric], "soft_target_entropy_nats": None})
    save_table(task, "smoothed_teacher", rows, ("model", metric, "soft_target_entropy_nats", "run"),
               epsilon=options.epsilon, temperature=temperature, metric=metric)
    for row in rows:
        entropy = row["soft_target_entropy_nats"]
        task.log(f"[smoothed] {row['model']}: {metric} {row[metric]:.4f}"
                 + (f", soft-target entropy at T={temperature:g} {entropy:.3f} nats" if entropy is not None else ""))
    return rows
