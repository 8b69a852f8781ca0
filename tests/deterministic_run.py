"""Helper run in a subprocess by test_gpu.py (op determinism is process-wide and
cannot be turned off): trains the same KD student twice with `--deterministic`
and prints both histories' losses and test accuracies as JSON."""

import json
import sys
import tempfile
from pathlib import Path

from task1_mnist.config import Task1Config
from task1_mnist.experiments import run_all
from tests.conftest import synthetic_mnist_arrays

arrays = synthetic_mnist_arrays()
results = []
with tempfile.TemporaryDirectory() as scratch:
    for folder in ("a", "b"):
        config = Task1Config(out=str(Path(scratch) / folder), epochs=2, batch_size=64, validation=64,
                             only=("kd",), deterministic=True, quiet=True)
        record = run_all(config, arrays=arrays)[0]["kd"]
        results.append({"losses": [h["loss"] for h in record["history"]], "test_accuracy": record["test_accuracy"],
                        "op_determinism": record["environment"]["op_determinism"],
                        "gpus": record["environment"].get("gpus", [])})
json.dump(results, sys.stdout)
