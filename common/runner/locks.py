"""Locks that let several processes share one results folder.

A run is trained by one process at a time: `hold` takes an exclusive `flock` on
`<out>/.locks/<name>.lock`. The kernel drops a process's locks when it exits or
is killed, so a crashed job never leaves a run locked; the file only names the
last holder. `claim` is the non-blocking form, for handing out whole seeds to
whichever process asks first.
"""

import contextlib
import fcntl
import os
import socket
from pathlib import Path


def lock_path(root, name):
    return Path(root) / ".locks" / f"{name}.lock"


def _open(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+", encoding="utf-8")


def _mark(handle):
    """Writes the holder into the lock file; a failed write (a full disk) names the file."""
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
    except OSError as err:
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror, str(handle.name)) from None


def _holder(handle):
    handle.seek(0)
    return handle.read().strip() or "another process"


@contextlib.contextmanager
def hold(root, name, log=None):
    """Holds the lock of run `name` under `root` for the `with` block; when another
    process holds it, says so through `log` and waits until it is released."""
    handle = claim(root, name)
    if handle is None:
        handle = _open(lock_path(root, name))
        if log is not None:
            log(f"[{name}] being trained by {_holder(handle)}; waiting for it")
        fcntl.flock(handle, fcntl.LOCK_EX)
        _mark(handle)
    try:
        yield
    finally:
        release(handle)


def claim(root, name):
    """The lock of `name` taken without waiting: an open handle (release with
    `release`), or None when another process holds it."""
    handle = _open(lock_path(root, name))
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    _mark(handle)
    return handle


def release(handle):
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
