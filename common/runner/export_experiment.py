"""Deployment of a task's trained models: TensorFlow Lite files, measured.

`export_seed` is the `export` experiment of both tasks (`--only export`).
"""

from kdtoolkit import methods
from kdtoolkit.deploy import export
from kdtoolkit.runner import runs
from kdtoolkit.files import write_csv_atomic, write_json_atomic

LATENCY_COLUMNS = ("latency_ms_median", "latency_ms_q1", "latency_ms_q3")


def export_seed(task):
    """TFLite files of the teacher and of every finished student of one seed (`task`:
    a `kdtoolkit.runner.recipes.Recipes`; KD, scratch and each registered method at the
    configured settings), as float32, dynamic-range int8 and full int8
    (`kdtoolkit.deploy.export`), measured on the whole test set: test metric against the
    Keras model's, size, CPU latency per image (median and quartiles over
    interleaved rounds, `kdtoolkit.deploy.export.time_files`). Writes `export/<run>/<variant>.tflite`
    (+ `.json` with its measurement, reused when the file is unchanged) and
    `export-s<seed>.csv`; returns the rows."""
    images, labels = task.test_arrays()
    representative = task.representative_inputs()
    _, runtime = export.runtime()
    metric = f"test_{task.primary_metric}"
    teacher_name, _ = task.teacher_model()
    task.kd()
    task.scratch()
    candidates = [("teacher", teacher_name), ("scratch", task.final_run_name("scratch"))]
    candidates += [(m, task.final_run_name(task.student_stem(m))) for m in methods.REGISTRY]
    score = lambda logits: task.split_metrics("test", logits, labels, summary=False)[metric]  # noqa: E731
    exported = []
    for label, name in candidates:
        record = task.store.load(name)
        if record is None:
            task.log(f"[export] {label}: no finished run {name} for this seed; skipped")
            continue
        model = task.trained_model(label, name, precision="float32")  # TFLite computes no bfloat16
        measured = export.export_model(task.store.root / "export" / name, model, representative, images, score,
                                       task.progress(f"export {name}"))
        exported += [(label, name, record, variant, found) for variant, found in measured.items()]
    timed = export.time_exported({(name, variant): found for _, name, _, variant, found in exported}, images,
                                 task.progress("export"))
    rows = [{"model": label, "run": name, "variant": variant, "params": record["params"], "flops": record["flops"],
             "size_bytes": found["size_bytes"], **{k: timed[name, variant][k] for k in LATENCY_COLUMNS},
             f"keras_{metric}": record[metric], f"tflite_{metric}": found["score"],
             "drop": record[metric] - found["score"], "runtime": runtime}
            for label, name, record, variant, found in exported]
    columns = ("model", "variant", "params", "flops", "size_bytes", *LATENCY_COLUMNS, f"keras_{metric}",
               f"tflite_{metric}", "drop", "run", "runtime")
    write_csv_atomic(task.store.root / f"export-s{task.seed}.csv", rows, columns)
    write_json_atomic(task.store.root / f"export-s{task.seed}.json",
                      {"rows": rows, "environment": runs.environment(), "threads": 1,
                       "latency_protocol": export.LATENCY_PROTOCOL})
    return rows
