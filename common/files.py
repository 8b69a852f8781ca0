"""Files written atomically and read back checked: the library's and the runner's only
way to write a file. A writer leaves its target absent, the old file or the complete
new one; a full disk raises `DiskFull` (one line naming the file, leaving it as it
was); a reader of a file that may be damaged returns `(value, problem)` or a
problem line, never a traceback.
"""

import csv
import errno
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from kdtoolkit.errors import UserError

_UMASK = os.umask(0o022)  # reading the umask means setting it: read once, put back
os.umask(_UMASK)


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
    text = json.dumps(jsonable(identity), sort_keys=True, separators=(",", ":"))
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
    write_text_atomic(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


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


def jsonable(obj):
    """Converts numpy scalars/arrays, tuples and paths into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
