"""`--precision auto`: bfloat16 where the device computes it natively, recorded with
its reason; a run's precision is part of its identity when it is not float32."""

import json

import keras
import pytest
import tensorflow as tf

from kdtoolkit import device
from kdtoolkit.runner.results import ResultsConflict

pytestmark = pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="reads the CPU's flags")


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f avx512_bf16", "mixed_bfloat16"),
                                             ("fpu avx2 amx_tile amx_bf16", "mixed_bfloat16"),
                                             ("fpu avx2 avx512f", "float32")])
def test_auto_precision_follows_the_cpus_bfloat16_flags(tmp_path, monkeypatch, flags, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    read = device.cpu_info
    monkeypatch.setattr(device, "cpu_info", lambda: read(info))
    precision, reason = device.resolve_precision("auto")
    assert precision == expected and "Test CPU 9000" in reason
    assert device.resolve_precision("float32") == ("float32", "asked for")
    assert device.describe()["bfloat16"] == (expected != "float32")


def test_a_bfloat16_run_records_why_and_is_not_a_float32_runs_twin(tmp_path, synthetic_mnist, monkeypatch):
    from task1_mnist.experiments import run_all
    from tests.test_task1 import small_config

    monkeypatch.setattr(device, "resolve_precision", lambda p: ("mixed_bfloat16", "auto: test") if p == "auto"
                        else (p, "asked for"))
    try:
        run_all(small_config(tmp_path, only=("scratch",), epochs=1, precision="auto"), arrays=synthetic_mnist)
    finally:
        device.configure()  # float32 again for the tests that follow
    record = json.loads((tmp_path / "out" / "scratch-s0" / "metrics.json").read_text())
    assert record["identity"]["precision"] == "mixed_bfloat16"
    assert record["environment"]["precision"] == "mixed_bfloat16"
    assert record["environment"]["precision_reason"] == "auto: test"
    assert keras.mixed_precision.global_policy().name == "float32"
    with pytest.raises(ResultsConflict, match="precision: None now vs 'mixed_bfloat16' saved"):
        run_all(small_config(tmp_path, only=("scratch",), epochs=1, precision="float32"), arrays=synthetic_mnist)
