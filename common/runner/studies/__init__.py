"""Research studies run on top of the course tasks, one module each."""

import keras

from kdtoolkit.files import write_csv_atomic, write_json_atomic


def save_table(task, name, rows, columns=None, **about):
    """Writes study `name`'s table for `task`'s seed: `<name>-s<seed>.csv` (`columns`,
    default the first row's keys) and `.json` (`about`, the dtype policy the study ran
    under, and the rows), both atomically in the task's results folder. Returns the
    JSON's path."""
    stem = task.store.root / f"{name}-s{task.seed}"
    write_csv_atomic(stem.with_suffix(".csv"), rows, tuple(columns or rows[0]))
    path = stem.with_suffix(".json")
    write_json_atomic(path, {**about, "precision": keras.mixed_precision.global_policy().name, "rows": rows})
    return path
