"""Held-out metrics of trained models, the records' final metrics, and sweeps' choices.

A task gives `split_metrics(split, logits, labels, summary) -> {metric: value}`
(keys prefixed by the split: `test_accuracy`, `val_auc`, ...) and its held-out
sets `{split: dataset of {"x", "y"} batches}`; everything here is built on those.
"""

import numpy as np

from kdtoolkit import training
from kdtoolkit.metrics import expected_calibration_error, top1_agreement
from kdtoolkit.files import notice, npz_problem, write_arrays_atomic, write_csv_atomic, write_json_atomic
from kdtoolkit.runner.results import test_outputs_check


def held_out(predictor, eval_sets):
    """`{split: (logits, labels)}` of a compiled `x -> class logits` on each held-out split."""
    return {split: training.predict(predictor, data) for split, data in eval_sets.items()}


def epoch_metrics(predictor, eval_sets, split_metrics):
    """Per-epoch held-out metrics (`val_accuracy`, `test_accuracy`, ...) of a predictor;
    of each model, under its prefix (`0/test_accuracy`), when it returns a dict of
    `{prefix: logits}` (`kdtoolkit.speed.fused`)."""
    metrics = {}
    for split, (outputs, labels) in held_out(predictor, eval_sets).items():
        for prefix, logits in (outputs.items() if isinstance(outputs, dict) else [("", outputs)]):
            metrics.update({prefix + k: v for k, v in split_metrics(split, logits, labels, False).items()})
    return metrics


def final_metrics(run_dir, outputs, split_metrics, teacher_dir=None):
    """A run's recorded metrics from `outputs`, its `{split: (logits, labels)}`: each
    split's `split_metrics` with the summary, and its expected calibration error
    (`val_ece`, `test_ece`). The test logits and labels are saved as
    `<run_dir>/test_outputs.npz`, so reports compute fidelity and reliability
    diagrams without running any model again. `teacher_dir`: the folder of the
    run it was distilled from; when that run saved its test outputs,
    `test_fidelity` is the fraction of test images where the two predict the same
    class (and `distilled_from` names it)."""
    metrics = {}
    for split, (logits, labels) in outputs.items():
        metrics.update(split_metrics(split, logits, labels, True))
        metrics[f"{split}_ece"] = expected_calibration_error(logits, labels)
        if split == "test":
            write_arrays_atomic(run_dir / "test_outputs.npz",
                                {"logits": logits.astype(np.float32), "labels": labels.astype(np.int32)})
            source = teacher_dir / "test_outputs.npz" if teacher_dir is not None else None
            problem = npz_problem(source, test_outputs_check) if source is not None else None
            if problem:
                notice(f"{problem}; test_fidelity of {run_dir.name} not recorded")
            elif source is not None and source.exists():
                with np.load(source) as saved:
                    metrics["test_fidelity"] = top1_agreement(logits, saved["logits"])
                metrics["distilled_from"] = teacher_dir.name
    return metrics


def selection_metric(splits, metric):
    """`val_<metric>` when a validation split is held out, else `test_<metric>`: the
    number that chooses settings (T, alpha); the test set only reports."""
    return f"val_{metric}" if "val" in splits else f"test_{metric}"


def save_sweep(root, name, seed, rows, metric, keys, splits, log):
    """Writes sweep `name`'s rows (one per setting, each with its `run` and held-out
    metrics) of `seed` to `<root>/<name>-s<seed>.csv` and `.json` with the best row,
    chosen on `selection_metric` of the held-out `splits`; logs the choice. `keys`: the swept settings, first columns of the CSV.
    Returns `{"cells", "best", "chosen_by"}`."""
    chosen_by = selection_metric(splits, metric)
    best = max(rows, key=lambda row: row[chosen_by])
    measured = [k for k in rows[0] if k not in (*keys, "run")]
    stem = root / f"{name}-s{seed}"
    write_csv_atomic(stem.with_suffix(".csv"), rows, (*keys, *measured, "run"))
    result = {"cells": rows, "best": best, "chosen_by": chosen_by}
    write_json_atomic(stem.with_suffix(".json"), result)
    setting = " ".join(f"{k}={best[k]:g}" for k in keys)
    log(f"[{name}] best by {chosen_by}: {setting}, {chosen_by} {best[chosen_by]:.4f}, "
        f"test_{metric} {best[f'test_{metric}']:.4f}")
    return result
