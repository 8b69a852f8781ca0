"""GPU behaviour; skipped on machines without a GPU (CI), run on the lent GPU machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from kdtoolkit import device

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="needs a GPU")


def test_deterministic_runs_repeat_exactly_on_a_gpu():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "deterministic_run.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["gpus"] and first["op_determinism"]
    assert first["losses"] == second["losses"] and first["test_accuracy"] == second["test_accuracy"]


def test_gpu_defaults_let_processes_share_the_gpu():
    assert device.settings()["memory_growth"] is True  # set by conftest before the GPU started
    assert device.TRITON_GEMM_OFF in device.settings()["xla_flags"]
    device.reset_peak_memory()
    tf.matmul(tf.ones((512, 512)), tf.ones((512, 512))).numpy()
    assert device.peak_memory_mib() >= 1.0  # two 1 MiB inputs and a 1 MiB product
