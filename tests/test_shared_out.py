"""A results folder shared by two processes, and a disk that fills up mid-run."""

import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdtoolkit.runner import locks
from task1_mnist import run as cli

ROOT = Path(__file__).resolve().parents[1]


def mnist_file(tmp_path, synthetic_mnist):
    path = tmp_path / "mnist.npz"
    np.savez(path, **{k: v[..., 0] if k.startswith("x") else v for k, v in synthetic_mnist.items()})
    return path


def test_locks_wait_for_the_holder_and_die_with_it(tmp_path):
    held = locks.claim(tmp_path, "run")
    assert held is not None and locks.claim(tmp_path, "run") is None
    assert "pid" in locks.lock_path(tmp_path, "run").read_text()
    locks.release(held)
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                              "from kdtoolkit.runner import locks; h = locks.claim(sys.argv[2], 'run'); print(h is not None, "
                              "flush=True); time.sleep(60)", str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "True"
    assert locks.claim(tmp_path, "run") is None
    child.kill()  # a killed holder leaves no lock behind
    child.wait()
    assert locks.claim(tmp_path, "run") is not None


@pytest.mark.slow
def test_two_processes_on_one_out_train_each_run_once(tmp_path, synthetic_mnist):
    command = [sys.executable, "task1_mnist/run.py", "--data-dir", str(mnist_file(tmp_path, synthetic_mnist)),
               "--out", str(tmp_path / "out"), "--only", "teacher,kd,scratch,dkd", "--seeds", "0,1",
               "--epochs", "2", "--batch-size", "64", "--validation", "64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    jobs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    trained = collections.Counter(re.findall(r"\[([\w.-]+)\] training:", "".join(outputs)))
    runs = {p.parent.name for p in (tmp_path / "out").glob("*/metrics.json")}
    assert len(runs) == 8 and set(trained) == runs and set(trained.values()) == {1}, trained
    assert all("seed 0 (1/2)" in out or "seed 1 (1/2)" in out for out in outputs)
    firsts = {re.search(r"== seed (\d) \(1/2\)", out).group(1) for out in outputs}
    assert firsts == {"0", "1"}  # each process took a seed of its own first


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, synthetic_mnist, monkeypatch, capsys):
    """The disk 'fills up' once the first epoch's state is on disk: the second epoch's
    saves (its kept weights, then its state) fail with one line naming the file and
    the space, and the run resumes."""
    out = tmp_path / "out"
    state = out / "teacher-s0" / "resume" / "state.npz"
    real = shutil.disk_usage
    Usage = collections.namedtuple("Usage", "total used free")

    def usage(path):
        found = real(path)
        return Usage(found.total, found.used, 2**20) if state.exists() else found

    monkeypatch.setattr("kdtoolkit.files.shutil.disk_usage", usage)
    argv = ["--data-dir", str(mnist_file(tmp_path, synthetic_mnist)), "--out", str(out), "--only", "teacher",
            "--epochs", "3", "--batch-size", "64", "--validation", "64", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.match(rf"error: cannot write {out / 'teacher-s0'}/\S+: 1.0 MiB free on its disk; it needs", err), err
    assert "\n" not in err
    assert "resumes" in err
    with np.load(state) as saved:
        assert len(json.loads(str(saved["history"]))) == 1  # epoch 1 kept
    monkeypatch.setattr("kdtoolkit.files.shutil.disk_usage", real)
    assert cli.main(argv[:-1]) == 0
    assert "resuming after epoch 1/3" in capsys.readouterr().out
    assert (out / "teacher-s0" / "metrics.json").exists()


def test_an_unwritable_file_is_one_line(tmp_path, monkeypatch, capsys):
    def refuse(*_args, **_kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x.npz"))

    monkeypatch.setattr(cli.cli, "run_task", refuse)  # task1_mnist.run calls kdtoolkit.runner.cli.run_task
    assert cli.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {tmp_path / 'x.npz'}: No space left on device") and "\n" not in err



GRID = dict(temperatures=(1.0, 4.0), alphas=(0.2, 0.8), only=("grid",), fuse_grid="on", epochs=2)


def second_process(tmp_path, data):
    """The same grid as `GRID`, by the command line, on the same `--out` (float32, as
    a test's in-process run trains)."""
    command = [sys.executable, "task1_mnist/run.py", "--data-dir", str(data), "--out", str(tmp_path / "out"),
               "--only", "grid", "--fuse-grid", "on", "--temperatures", "1,4", "--alphas", "0.2,0.8", "--epochs", "2",
               "--batch-size", "64", "--validation", "64", "--precision", "float32", "--seeds", "0"]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_line(process, pattern, seen):
    """Reads `process`'s output until a line matches `pattern` (lines kept in `seen`)."""
    for line in process.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return
    raise AssertionError(f"the second process ended without {pattern!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before training", "mid-training", "while recording"])
def test_a_second_process_reaching_a_fused_grid_waits_and_trains_nothing(tmp_path, synthetic_mnist, monkeypatch,
                                                                         point):
    """A second process started at `point` of the first's fused group waits on the group's
    lock (named after every cell, finished or not), then finds each cell recorded:
    each cell is trained and recorded once, and its files are the first process's."""
    from kdtoolkit.runner import runs
    from task1_mnist import data as mnist
    from task1_mnist.experiments import Task1
    from tests.test_task1 import small_config

    data = mnist_file(tmp_path, synthetic_mnist)
    second, seen = [], []

    def start_second():
        if not second:
            second.append(second_process(tmp_path, data))
            wait_for_line(second[0], r"\[fused-\w+-s0\] being trained by pid", seen)  # it waits on the group

    def log(message):
        if (point == "before training" and "] training 4 runs in one" in message) or (
                point == "mid-training" and "[fused-" in message and "] epoch 1/2" in message):
            start_second()

    finish = runs.finish

    def finish_then_start(*args, **kwargs):
        record = finish(*args, **kwargs)
        if point == "while recording" and args[1].startswith("kd-"):
            start_second()  # one cell recorded, three to go (the teacher was recorded before)
        return record

    monkeypatch.setattr(runs, "finish", finish_then_start)
    Task1(small_config(tmp_path, **GRID), arrays=mnist.load_mnist(data), log=log).run()
    out = tmp_path / "out"
    records = {p: p.read_bytes() for p in sorted(out.glob("kd-*/*")) if p.is_file()}
    assert len([p for p in records if p.name == "metrics.json"]) == 4
    output = "".join(seen) + second[0].communicate(timeout=300)[0]
    assert second[0].returncode == 0, output[-3000:]
    assert "] training" not in output and "recorded" not in output, output[-3000:]  # nothing trained twice
    assert {p: p.read_bytes() for p in sorted(out.glob("kd-*/*")) if p.is_file()} == records
    assert not list(out.glob("fused-*"))  # no stray group folder


def test_a_disk_full_before_the_first_run_names_the_lock_file(tmp_path, monkeypatch, capsys):
    """Creating a lock file needs no free block, writing its holder does: a disk full
    before the first run is one line naming that file."""
    import errno

    from kdtoolkit.runner import cli as common_cli

    class FullDisk:
        def __init__(self, path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a+", encoding="utf-8")
            self.name = self.file.name

        def __getattr__(self, attribute):
            return getattr(self.file, attribute)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks, "_open", FullDisk)
    assert common_cli.main(lambda: locks.claim(tmp_path, "seed-0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {locks.lock_path(tmp_path, 'seed-0')}: No space left on device")
    assert "\n" not in err


def read_only_mount(folder, command):
    """`command` (a list) run with `folder` mounted read-only in a user namespace (as a
    read-only share or a finished job's folder is); None where namespaces are not allowed."""
    script = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$@"'
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, "sh", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", script, "sh", *command], cwd=ROOT, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_a_read_only_out_of_finished_runs_is_read_and_an_unfinished_run_is_one_line(tmp_path, synthetic_mnist):
    """Rerunning a finished command on a read-only `--out` prints its summary (exit 0)
    and writes nothing; asking for a run not there stops at its first write, in one line."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a folder read-only")
    out = tmp_path / "out"
    command = [sys.executable, "task1_mnist/run.py", "--data-dir", str(mnist_file(tmp_path, synthetic_mnist)),
               "--out", str(out), "--epochs", "1", "--batch-size", "64", "--validation", "64", "-q"]
    assert subprocess.run([*command, "--only", "teacher,kd"], cwd=ROOT, capture_output=True).returncode == 0
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    finished = read_only_mount(out, [*command, "--only", "teacher,kd"])
    if finished is None:
        pytest.skip("user namespaces are not allowed here: cannot mount a folder read-only")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "kd-T4-a0.5-s0" in finished.stdout and "teacher-s0" in finished.stdout
    unfinished = read_only_mount(out, [*command, "--only", "teacher,kd,scratch"])
    err = [line for line in unfinished.stderr.splitlines() if line.startswith("error:")]
    assert unfinished.returncode == 2 and len(err) == 1 and "Read-only file system; make it writable" in err[0]
    assert "Traceback" not in unfinished.stderr
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
