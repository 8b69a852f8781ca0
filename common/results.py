"""The results store: one folder per run under a root, written atomically.

Layout: `ROOT/<run>/metrics.json` (the record; written last, so its presence
means the run finished), `ROOT/<run>/model.weights.h5`, and `ROOT/summary.csv`
with one row per finished run. Re-running skips a finished run whose identity
(the settings that define it) matches, and refuses to mix runs whose identity
differs.
"""

import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

from common.errors import UserError

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


_UMASK = os.umask(0o022)  # reading the umask means setting it: read once, put back
os.umask(_UMASK)


class ResultsConflict(UserError):
    """A finished run on disk was made with different settings."""


class DiskFull(UserError):
    """A results file cannot be written: no space (or quota) left where it goes."""


FULL = (errno.ENOSPC, errno.EDQUOT)
MARGIN = 16 * 2**20  # bytes kept free beyond a file's own size


def disk_full(path, needed=None):
    """The one-line `DiskFull` for a file `path` that does not fit (`needed` bytes, if known)."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    need = f"; it needs {(needed + MARGIN) / 2**20:.1f} MiB" if needed is not None else ""
    return DiskFull(f"cannot write {path}: {free / 2**20:.1f} MiB free on its disk{need}. Free some space (or use "
                    "another --out) and run the same command: finished runs and epochs are kept and it resumes")


def ensure_space(path, needed):
    """Raises `DiskFull` before writing `needed` bytes to `path` if its disk has less
    than that (plus `MARGIN`) free, so a large file is never left half written."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(folder).free < needed + MARGIN:
        raise disk_full(path, needed)


def write_atomic(path, write, mode="w"):
    """Calls `write(handle)` on a temporary file beside `path`, then renames it to
    `path` (`os.replace`), so `path` is either absent, the old file or complete.
    A full disk raises `DiskFull` (one line) and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise (disk_full(path) if err.errno in FULL else err) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in FULL:
            raise disk_full(path) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model, path):
    """`model.save_weights(path)` after checking that the weights fit on its disk."""
    ensure_space(path, 4 * sum(int(np.prod(v.shape)) for v in model.weights) + 2**20)  # float32 and h5 headers
    try:
        model.save_weights(path)
    except OSError as err:
        if err.errno in FULL or "No space left" in str(err):
            raise disk_full(path) from None
        raise


def identity_hash(identity):
    """12 hex digits naming a run's identity (its settings, as canonical JSON)."""
    text = json.dumps(_jsonable(identity), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_text_atomic(path, text):
    write_atomic(path, lambda handle: handle.write(text))


def write_array_atomic(path, array):
    """One numpy array as `.npy`."""
    write_atomic(path, lambda handle: np.save(handle, array), mode="wb")


def write_arrays_atomic(path, arrays, compressed=False):
    """A dict of numpy arrays as `.npz` (its space checked first: `ensure_space`)."""
    ensure_space(path, sum(np.asarray(a).nbytes for a in arrays.values()))
    save = np.savez_compressed if compressed else np.savez
    write_atomic(path, lambda handle: save(handle, **arrays), mode="wb")


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path, rows, columns):
    """Writes a list of dicts as CSV with the given column order (missing -> empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    write_text_atomic(path, buffer.getvalue())


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _jsonable(obj):
    """Converts numpy scalars/arrays, tuples and paths into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class ResultsStore:
    """Finished runs under `root`, addressed by run name."""

    def __init__(self, root):
        self.root = Path(root)

    def prepare(self):
        """Creates `root` if needed and checks that files can be written there, so a
        bad `--out` fails at once with one line, before any work."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} is a file, not a folder; choose a folder for the results")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as err:
            raise UserError(f"--out {self.root}: cannot write results there ({err.strerror or err}); "
                            "choose a folder you can write to") from None

    def run_dir(self, name):
        return self.root / name

    def weights_path(self, name):
        return self.run_dir(name) / "model.weights.h5"

    def resume_dir(self, name, identity):
        """`<run>/resume/`, where an unfinished run keeps its last finished epoch
        (see `common.training.EpochCheckpoint`). Saved epochs of other settings
        are discarded, so a resumed run always continues its own settings."""
        folder = self.run_dir(name) / "resume"
        marker = folder / "identity.json"
        if folder.exists() and (not marker.exists() or json.loads(marker.read_text()) != _jsonable(identity)):
            shutil.rmtree(folder)
        if not marker.exists():
            write_json_atomic(marker, identity)
        return folder

    def load(self, name):
        """The record of a finished run, or None."""
        path = self.run_dir(name) / "metrics.json"
        if not path.exists():
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def finished(self, name, identity):
        """The finished record of `name` if its identity matches `identity`, else None.

        Raises `ResultsConflict` when a finished run of that name has another identity.
        """
        record = self.load(name)
        if record is None:
            return None
        stored = record.get("identity")
        wanted = _jsonable(identity)
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
        return record

    def save(self, name, record):
        """Writes the finished record, drops the run's resume state and refreshes
        `summary.csv`, so the summary is current even if the invocation dies later."""
        write_json_atomic(self.run_dir(name) / "metrics.json", record)
        shutil.rmtree(self.run_dir(name) / "resume", ignore_errors=True)
        self.write_summary()

    def records(self):
        """All finished records under root, sorted by run name."""
        found = []
        for path in sorted(self.root.glob("*/metrics.json")):
            with open(path, encoding="utf-8") as handle:
                found.append(json.load(handle))
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
