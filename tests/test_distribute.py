"""The training loop under tf.distribute: two replicas give the one-device update."""

import json
import os
import re
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

    def resolver(task_type, task_id, jobs):
        spec = SimpleNamespace(as_dict=lambda: {job: ["host:1"] for job in jobs})
        return SimpleNamespace(task_type=task_type, task_id=task_id, cluster_spec=lambda: spec)

    assert is_chief(None) and is_chief(resolver(None, None, ()))
    assert is_chief(resolver("chief", 0, ("chief", "worker")))
    assert not is_chief(resolver("worker", 0, ("chief", "worker")))
    assert is_chief(resolver("worker", 0, ("worker",))) and not is_chief(resolver("worker", 1, ("worker",)))
    assert results_root(tmp_path, resolver("worker", 2, ("worker",))) == tmp_path / ".workers" / "worker-2"
    assert results_root(tmp_path, resolver("worker", 0, ("worker",))) == tmp_path


@pytest.mark.slow
def test_a_lost_worker_is_one_line_and_a_worker_names_the_chiefs_results(tmp_path, real_mnist_dir):
    """Two workers of `--distribute multi-worker` on 127.0.0.1: worker 1 killed with
    SIGKILL mid-run leaves worker 0 one line (no traceback) and exit 2. A whole run
    of the cluster ends with worker 1 naming where the chief's results are and
    tabling its own copy of them. Rerun, the finished cluster agrees and reads its
    runs; with worker 1's copy behind the chief's, every worker stops in one line
    before any step (resuming would put them out of step)."""
    import shutil
    import socket
    import time

    def cluster(out, kill_after=None):
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        command = [sys.executable, "task1_mnist/run.py", "--data-dir", str(real_mnist_dir), "--limit", "512",
                   "--epochs", "2", "--only", "teacher,kd", "--batch-size", "64", "--distribute", "multi-worker",
                   "--out", str(out), "-q"]
        workers = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "TF_CONFIG": json.dumps({
                                        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                        "task": {"type": "worker", "index": i}})}) for i in range(2)]
        if kill_after is not None:
            deadline = time.time() + 120
            while not (out / ".workers" / "worker-1").exists() and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(kill_after)
            workers[1].kill()
        return [(w.wait(timeout=300), w.stdout.read(), w.stderr.read()) for w in workers]

    (code, _, err), _ = cluster(tmp_path / "cut", kill_after=4)
    last = [line for line in err.splitlines() if line.strip()][-1]
    # TensorFlow names the unhealthy task when its heartbeat stops (every try here); else "another worker"
    assert code == 2 and re.match(r"error: (worker 1|another worker) of the multi-worker cluster stopped", last), err
    assert "run the same command on every worker to resume" in last
    assert "Traceback" not in err
    (chief, chief_out, _), (worker, worker_out, _) = cluster(tmp_path / "whole")
    assert chief == worker == 0
    assert f"worker 1 of the cluster: the chief writes the results to {tmp_path / 'whole'}" in worker_out
    assert "kd-T4-a0.5-s0" in chief_out and "kd-T4-a0.5-s0" in worker_out
    assert (tmp_path / "whole" / "kd-T4-a0.5-s0" / "metrics.json").exists()
    assert [code for code, _, _ in cluster(tmp_path / "whole")] == [0, 0]
    shutil.rmtree(tmp_path / "whole" / ".workers" / "worker-1" / "kd-T4-a0.5-s0")
    for code, _, err in cluster(tmp_path / "whole"):
        last = [line for line in err.splitlines() if line.strip()][-1]
        assert code == 2 and last.startswith("error: the workers' copies of the results are not at the chief's point")
