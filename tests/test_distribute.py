"""The training loop under tf.distribute: two replicas give the one-device update."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mirrored_two_replicas_match_one_device():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep a TensorFlow found there
    env = {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed_step.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["weights_changed"]
    assert result["max_weight_difference"] < 1e-5
    assert result["loss_mirrored"] == pytest.approx(result["loss_single"], rel=1e-5)


def test_only_the_chief_writes_results(tmp_path):
    from types import SimpleNamespace

    from kdtoolkit.distribute import is_chief, results_root

    def strategy(task_type, task_id, jobs):
        spec = SimpleNamespace(as_dict=lambda: {job: ["host:1"] for job in jobs})
        return SimpleNamespace(cluster_resolver=SimpleNamespace(task_type=task_type, task_id=task_id,
                                                                cluster_spec=lambda: spec))

    assert is_chief(SimpleNamespace()) and is_chief(strategy(None, None, ()))
    assert is_chief(strategy("chief", 0, ("chief", "worker")))
    assert not is_chief(strategy("worker", 0, ("chief", "worker")))
    assert is_chief(strategy("worker", 0, ("worker",))) and not is_chief(strategy("worker", 1, ("worker",)))
    assert results_root(tmp_path, strategy("worker", 2, ("worker",))) == tmp_path / ".workers" / "worker-2"
    assert results_root(tmp_path, strategy("worker", 0, ("worker",))) == tmp_path
