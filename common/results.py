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

import csv
import datetime
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from kdtoolkit.errors import UserError

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


DAMAGED = ".damaged-"  # a set-aside run folder: `<run>.damaged-<UTC time>`


def is_set_aside(folder):
    """Whether `folder` is a run folder set aside as damaged (never read as a run)."""
    return DAMAGED in Path(folder).name


def notice(message):
    """One line on stderr, shown also under `--quiet`: something on disk was not as
    written and what was done about it."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _why(err):
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_json(path):
    """`(value, None)` of JSON file `path`, or `(None, problem)` when it is empty or
    not JSON (truncated, garbage); a missing file raises `FileNotFoundError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, f"{path} is not text"
    if not text.strip():
        return None, f"{path} is empty"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"{path} is not valid JSON (truncated or garbage: {err.msg} at line {err.lineno})"


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


def weights_problem(path):
    """Why the Keras weights file `path` cannot be loaded (missing, empty, not HDF5,
    truncated: every array is read), or None."""
    import h5py

    path = Path(path)
    if not path.exists():
        return f"{path} is missing"
    if path.stat().st_size == 0:
        return f"{path} is empty"
    arrays = []
    try:
        with h5py.File(path, "r") as handle:
            handle.visititems(lambda _name, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    except Exception as err:  # h5py raises OSError, KeyError, RuntimeError... for a damaged file
        return f"{path} is not a readable weights file ({_why(err)})"
    if not arrays:
        return f"{path} holds no weights"
    return None


def npz_problem(path, check=None):
    """Why `.npz` file `path` cannot be read in full (empty, not a zip, truncated, a
    bad checksum: every array is read), or what `check(arrays)` (a dict) says about
    its contents; None when it is fine or missing."""
    path = Path(path)
    if not path.exists():
        return None
    if path.stat().st_size == 0:
        return f"{path} is empty"
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        return f"{path} is not a readable .npz file (truncated or garbage: {_why(err)})"
    problem = check(arrays) if check is not None else None
    return f"{path} {problem}" if problem else None


def test_outputs_check(arrays):
    """`npz_problem`'s check of `test_outputs.npz`: `(n, classes)` float logits and `(n,)` labels."""
    logits, labels = arrays.get("logits"), arrays.get("labels")
    if logits is None or labels is None:
        return "lacks its logits or labels"
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels) or logits.dtype.kind != "f":
        return f"holds logits {logits.shape} {logits.dtype} and labels {labels.shape}: not (n, classes) and (n,)"
    return None


def state_check(arrays):
    """`npz_problem`'s check of a resume `state.npz`: variables and a JSON history list."""
    if not any(key.startswith("var:") for key in arrays) or "history" not in arrays:
        return "lacks its variables or history"
    try:
        history = json.loads(str(arrays["history"]))
    except json.JSONDecodeError:
        return "holds a history that is not JSON"
    return None if isinstance(history, list) else "holds a history that is not a list"


def append_line(path, text):
    """Appends one line to `path` (`timings.jsonl`); a torn last line left by a killed
    writer is ended first, so the new line stands alone and readers skip only the
    torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        torn = False
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
        handle.write((("\n" if torn else "") + text.rstrip("\n") + "\n").encode())


def read_jsonl(path):
    """`(entries, problems)` of a JSON-lines file: the lines that are JSON objects,
    and a line per other one (a torn or garbage line), never an exception."""
    entries, problems = [], []
    try:
        lines = Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as err:
        return [], [f"{path}: {_why(err)}"]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            problems.append(f"{path} line {number} is not a JSON object (torn or garbage)")
    return entries, problems


def save_weights(model, path):
    """`model.save_weights(path)` after checking that the weights fit on its disk,
    written to a temporary name beside `path` and moved into place (`os.replace`):
    `path` is the old file or the complete new one, and two writers never open one
    HDF5 file (h5py's file lock refused the second: `BlockingIOError`)."""
    path = Path(path)
    ensure_space(path, 4 * sum(int(np.prod(v.shape)) for v in model.weights) + 2**20)  # float32 and h5 headers
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.weights.h5")  # Keras' suffix
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in FULL or "No space left" in str(err):
            raise disk_full(path) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
        self.damaged = {}  # `{path: problem}` of damaged records `records` left out
        self._sound = set()  # files found sound: (path, size, mtime), checked once per process

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
        (see `kdtoolkit.training.EpochCheckpoint`). Saved epochs of other settings
        are discarded, so a resumed run always continues its own settings; a
        damaged `identity.json` or `state.npz` sets the run folder aside
        (`set_aside`), so the run starts over."""
        folder = self.run_dir(name) / "resume"
        marker = folder / "identity.json"
        if self._resume_problem(name):
            self.set_aside(name, lambda: self._resume_problem(name))
        if folder.exists() and (not marker.exists() or read_json(marker)[0] != _jsonable(identity)):
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
        from kdtoolkit import locks

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
