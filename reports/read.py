"""Defensive reading of saved results: a damaged file (a truncated or garbage
`metrics.json`, `test_outputs.npz`, table, ...) is skipped and noted in `DAMAGED`,
which the report names; a reader never moves or repairs anything."""

import csv

import numpy as np

from kdtoolkit.files import npz_problem, read_json
from kdtoolkit.runner.results import ResultsStore, test_outputs_check


DAMAGED = {}  # `{path: problem}` of the damaged files skipped while building the current report


def damaged(path, problem):
    """Notes that damaged file `path` was skipped (`problem` says how it is damaged)."""
    DAMAGED[str(path)] = problem


def json_file(path):
    """The value of JSON file `path`, or None (noted in `DAMAGED`) when it is damaged."""
    value, problem = read_json(path)
    if problem:
        damaged(path, problem)
    return value


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def finished_records(root):
    """The sound run records under `root`; damaged ones are noted (`DAMAGED`), never moved."""
    store = ResultsStore(root)
    records = store.records()
    for path, problem in store.damaged.items():
        damaged(path, problem)
    return records


def outputs_of(root, run):
    """`(logits, labels)` a run saved on the test set (`test_outputs.npz`), or None."""
    path = root / run / "test_outputs.npz"
    if not path.exists():
        return None
    problem = npz_problem(path, test_outputs_check)
    if problem:
        damaged(path, problem)
        return None
    with np.load(path) as saved:
        return saved["logits"], saved["labels"]
