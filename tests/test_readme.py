"""The README's quick runs, as a new user types them (with `--out` in a temporary
folder, and for Task 2 a synthetic folder and offline weight files for DIR)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_mhist, write_keras_weights

ROOT = Path(__file__).resolve().parents[1]


def quick_commands():
    """The indented commands of the README's "Quick runs" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick runs"):readme.index("## Adding a method")]
    return [line.strip() for line in section.splitlines() if line.startswith("    python ")]


def run(command, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable if word == "python" else word for word in shlex.split(command)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
    return done


@pytest.mark.slow
def test_the_task1_quick_try_and_the_report(tmp_path, real_mnist_dir):
    commands = quick_commands()
    try_task1 = next(c for c in commands if "task1_mnist/run.py" in c and "--limit" in c)
    report = next(c for c in commands if "make_report.py" in c)
    out = tmp_path / "results" / "task1"
    run(f"{try_task1} --out {out} -q", tmp_path)
    assert {p.parent.name for p in out.glob("*/metrics.json")} == {"teacher-s0", "kd-T4-a0.5-s0", "scratch-s0"}
    run(report.replace("--results results", f"--results {tmp_path / 'results'}")
              .replace("--out reports", f"--out {tmp_path / 'report'}"), tmp_path)
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "| KD student (T=4, alpha=0.5) |" in text and "data: mnist.npz (first 3000" in text


@pytest.mark.slow
def test_the_task2_quick_try(tmp_path):
    from task2_mhist import models

    try_task2 = next(c for c in quick_commands() if "task2_mhist/run.py" in c and "--only" in c)
    folder = make_mhist(tmp_path / "mhist", n_train=24, n_test=12, size=64)
    weights = tmp_path / "weights"
    write_keras_weights(weights, (models.TEACHER, models.STUDENT), 64)
    out = tmp_path / "out"
    run(f"{try_task2.replace('DIR', str(folder))} --weights {weights} --out {out} -q", tmp_path)
    finished = {p.parent.name for p in out.glob("*/metrics.json")}
    assert {"teacher-ft-s0", "kd-T4-a0.5-ft-s0", "scratch-ft-s0"} <= finished
