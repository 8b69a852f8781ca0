"""The results store: one folder per run under a root, written atomically.

Layout: `ROOT/<run>/metrics.json` (the record; written last, so its presence
means the run finished), `ROOT/<run>/model.weights.h5`, and `ROOT/summary.csv`
with one row per finished run. Re-running skips a finished run whose identity
(the settings that define it) matches, and refuses to mix runs whose identity
differs.

Every file read back is checked first (`record_problem`, `weights_problem`,
`npz_problem`, ...): a run folder holding a damaged one (truncated, empty,
garbage) is set aside as `ROOT/<run>.damaged-<UTC time>/`, kept for inspection,
with one line saying what was found, and the run is trained again; no other file
is touched.
"""

import datetime
import json
import re
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

from kdtoolkit.errors import UserError
from kdtoolkit.files import (identity_hash, jsonable, notice, npz_problem, read_json, state_check, weights_problem,
                             write_csv_atomic, write_json_atomic)

SUMMARY_COLUMNS = (
    "run",
    "experiment",
    "seed",
    "epochs",
    "temperature",
    "alpha",
    "val_accuracy",
    "test_accuracy",
    "val_auc",
    "test_auc",
    "params",
    "flops",
    "wall_seconds",
)


class ResultsConflict(UserError):
    """A finished run on disk was made with different settings."""


DAMAGED = ".damaged-"  # a set-aside run folder: `<run>.damaged-<UTC time>`


def is_set_aside(folder):
    """Whether `folder` is a run folder set aside as damaged (never read as a run)."""
    return DAMAGED in Path(folder).name


def record_problem(path, name=None):
    """Why `metrics.json` at `path` is not a run's record (of run `name`), or None;
    None for a missing file (an unfinished run)."""
    return read_record(path, name)[1] if Path(path).exists() else None


def read_record(path, name=None):
    """`(record, None)` of the `metrics.json` at `path` (of run `name`), or `(None, problem)`."""
    record, problem = read_json(path)
    if problem:
        return None, problem
    if not isinstance(record, dict) or not isinstance(record.get("identity"), dict) or "run" not in record:
        return None, f"{path} is not a run record (no run name or identity)"
    if name is not None and record["run"] != name:
        return None, f"{path} is the record of run {record['run']!r}, not of {name!r}"
    return record, None


def test_outputs_check(arrays):
    """`npz_problem`'s check of `test_outputs.npz`: `(n, classes)` float logits and `(n,)` labels."""
    logits, labels = arrays.get("logits"), arrays.get("labels")
    if logits is None or labels is None:
        return "lacks its logits or labels"
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels) or logits.dtype.kind != "f":
        return f"holds logits {logits.shape} {logits.dtype} and labels {labels.shape}: not (n, classes) and (n,)"
    return None


class ResultsStore:
    """Finished runs under `root`, addressed by run name."""

    def __init__(self, root):
        self.root = Path(root)
        self.damaged = {}  # `{path: problem}` of damaged records `records` left out
        self._sound = set()  # files found sound: (path, size, mtime), checked once per process
        self.read_only = False  # a folder of finished runs that cannot be written: only read (`prepare`)

    def prepare(self):
        """Creates `root` if needed and checks that files can be written there, so a
        bad `--out` fails at once with one line, before any work. Returns False when
        `root` cannot be written but holds finished runs: the store is then only read
        (`read_only`), and the first run that is not finished there stops the command
        at its first write, in one line."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} is a file, not a folder; choose a folder for the results")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as err:
            if self.root.is_dir() and self.records():
                return False
            raise UserError(f"--out {self.root}: cannot write results there ({err.strerror or err}); "
                            "choose a folder you can write to") from None
        return True

    def progress(self):
        """A number naming how far this store is: its finished runs and the epoch each
        unfinished run has saved. Workers of one cluster must agree on it to resume in
        step (`kdtoolkit.distribute.workers_agree`)."""
        state = [path.parent.name for path in sorted(self.root.glob("*/metrics.json")) if not is_set_aside(path.parent)]
        for path in sorted(self.root.glob("*/resume/state.npz")):
            history = None
            if npz_problem(path, state_check) is None:
                with np.load(path, allow_pickle=False) as saved:
                    history = len(json.loads(str(saved["history"])))
            state.append(f"{path.parent.parent.name}:{history}")
        return int(identity_hash(state), 16)

    def run_dir(self, name):
        return self.root / name

    def weights_path(self, name):
        return self.run_dir(name) / "model.weights.h5"

    def resume_dir(self, name, identity):
        """`<run>/resume/`, where an unfinished run keeps its last finished epoch
        (see `kdtoolkit.training.EpochCheckpoint`). Saved epochs of other settings
        are discarded, so a resumed run always continues its own settings; a
        damaged `identity.json` or `state.npz` sets the run folder aside
        (`set_aside`), so the run starts over."""
        folder = self.run_dir(name) / "resume"
        marker = folder / "identity.json"
        if self._resume_problem(name):
            self.set_aside(name, lambda: self._resume_problem(name))
        if folder.exists() and (not marker.exists() or read_json(marker)[0] != jsonable(identity)):
            shutil.rmtree(folder)
        if not marker.exists():
            write_json_atomic(marker, identity)
        return folder

    def _resume_problem(self, name):
        folder = self.run_dir(name) / "resume"
        marker = folder / "identity.json"
        problem = read_json(marker)[1] if marker.exists() else None
        return problem or self._checked_once(folder / "state.npz", lambda path: npz_problem(path, state_check))

    def _checked_once(self, path, check):
        """`check(path)`, run once per process for an unchanged file (its size and time)."""
        try:
            stat = Path(path).stat()
        except FileNotFoundError:
            return check(path)
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in self._sound:
            return None
        problem = check(path)
        if problem is None:
            self._sound.add(key)
        return problem

    def run_problem(self, name):
        """Why the files of finished run `name` cannot be used (its record, weights or
        test outputs damaged), or None. Missing weights are not judged here: the
        caller that needs them says so (`Recipes.train`)."""
        folder = self.run_dir(name)
        weights = self.weights_path(name)
        return (self._checked_once(folder / "metrics.json", lambda path: record_problem(path, name))
                or (self._checked_once(weights, weights_problem) if weights.exists() else None)
                or self._checked_once(folder / "test_outputs.npz", lambda path: npz_problem(path, test_outputs_check)))

    def set_aside(self, name, problem_now):
        """Moves the folder of run `name` to `<run>.damaged-<UTC time>/` (kept for
        inspection) and says so in one line, when `problem_now()` (checked again
        under a lock, as another process may have set it aside and trained it
        again meanwhile) still finds a damaged file. Returns whether it moved it."""
        from kdtoolkit.runner import locks

        folder = self.run_dir(name)
        with locks.hold(self.root, f"{name}.set-aside"):
            problem = problem_now() if folder.exists() else None
            if problem is None:
                return False
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            target, n = folder.with_name(f"{name}{DAMAGED}{stamp}"), 1
            while target.exists():
                n += 1
                target = folder.with_name(f"{name}{DAMAGED}{stamp}-{n}")
            folder.rename(target)
        notice(f"{problem}; set the run aside as {target} (kept for inspection) and training {name} again")
        return True

    def load(self, name):
        """The record of a finished run, or None (also when its `metrics.json` is
        damaged: the run is then set aside, to be trained again)."""
        path = self.run_dir(name) / "metrics.json"
        if not path.exists():
            return None
        record, problem = read_record(path, name)
        if problem is None:
            return record
        self.set_aside(name, lambda: record_problem(path, name))
        return None

    def finished(self, name, identity):
        """The finished record of `name` if its identity matches `identity`, else None.

        A finished run whose record, weights or test outputs are damaged (or whose
        weights are missing) is set aside (`set_aside`) and None returned, so it is
        trained again. Raises `ResultsConflict` when a finished run of that name has
        another identity.
        """
        record = self.load(name)
        if record is None:
            return None
        stored = record.get("identity")
        wanted = jsonable(identity)
        if stored != wanted:
            diff = ", ".join(
                f"{k}: {wanted.get(k)!r} now vs {stored.get(k)!r} saved"
                for k in sorted(set(wanted) | set(stored or {}))
                if wanted.get(k) != (stored or {}).get(k)
            )
            raise ResultsConflict(
                f"{self.run_dir(name)} holds a finished run with other settings ({diff}); "
                f"use another --out or delete that folder"
            )
        if self.run_problem(name) is not None:
            self.set_aside(name, lambda: self.run_problem(name))
            return None
        return record

    def save(self, name, record):
        """Writes the finished record, drops the run's resume state and refreshes
        `summary.csv`, so the summary is current even if the invocation dies later."""
        write_json_atomic(self.run_dir(name) / "metrics.json", record)
        shutil.rmtree(self.run_dir(name) / "resume", ignore_errors=True)
        self.write_summary()

    def records(self):
        """All finished records under root, sorted by run name. A damaged
        `metrics.json` is left out (and left where it is: readers such as the report
        must not move files) and named in `damaged`, `{path: problem}`; set-aside
        folders are never read."""
        found = []
        for path in sorted(self.root.glob("*/metrics.json")):
            if is_set_aside(path.parent):
                continue
            record, problem = read_record(path, path.parent.name)
            if problem:
                self.damaged[str(path)] = problem
                continue
            found.append(record)
        return found

    def write_summary(self):
        """Rewrites `root/summary.csv` from every finished run; returns its path."""
        rows = []
        for record in self.records():
            row = dict(record.get("identity", {}))
            row.update({k: v for k, v in record.items() if not isinstance(v, (dict, list))})
            rows.append(row)
        path = self.root / "summary.csv"
        write_csv_atomic(path, rows, SUMMARY_COLUMNS)
        return path

    def write_seed_summary(self, metrics=("test_accuracy", "test_auc")):
        """Writes `root/summary_by_experiment.csv`: runs that differ only in their seed
        (names ending in `-s<seed>`) grouped, with mean and sample std of each metric."""
        groups = {}
        for record in self.records():
            groups.setdefault(seed_group(record["run"]), []).append(record)
        rows = []
        for group, records in sorted(groups.items()):
            row = {
                "group": group,
                "experiment": records[0].get("experiment"),
                "n_seeds": len(records),
                "seeds": " ".join(str(r.get("seed")) for r in records),
                "params": records[0].get("params"),
                "flops": records[0].get("flops"),
            }
            for metric in metrics:
                values = [r[metric] for r in records if r.get(metric) is not None]
                if values:
                    row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
            rows.append(row)
        columns = ["group", "experiment", "n_seeds", "seeds"]
        for metric in metrics:
            columns += [f"{metric}_mean", f"{metric}_std"]
        path = self.root / "summary_by_experiment.csv"
        write_csv_atomic(path, rows, columns + ["params", "flops"])
        return path


def seed_group(run_name):
    """`"kd-T4-a0.5-s2"` -> `"kd-T4-a0.5"`: the run name without its seed."""
    return re.sub(r"-s\d+$", "", run_name)


def mean_std(values):
    """`(mean, sample standard deviation)`; the std of a single value is 0."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
