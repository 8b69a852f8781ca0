"""TFLite latency timing (`kdtoolkit.deploy.export.time_files`) on small Keras models."""

import keras
import numpy as np
import pytest

from kdtoolkit.deploy import export


def dense_model(width):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(10)(hidden))


@pytest.mark.slow
def test_time_files_ranks_a_larger_model_slower_and_reports_quartiles():
    images = np.random.default_rng(0).random((32, 64), np.float32)
    contents = {"small": export.convert(dense_model(8), "float32"),
                "large": export.convert(dense_model(2048), "float32"),
                "large int8": export.convert(dense_model(2048), "int8", images)}
    protocol = {**export.LATENCY_PROTOCOL, "rounds": 5, "round_seconds": 0.01}
    timed = export.time_files(contents, images, protocol)
    assert set(timed) == set(contents)
    for found in timed.values():
        assert 0 < found["latency_ms_q1"] <= found["latency_ms_median"] <= found["latency_ms_q3"]
        assert found["calls_per_round"] >= 1
    # 64x2048 + 2048x10 multiply-adds per call against 64x8 + 8x10: far slower.
    assert timed["large"]["latency_ms_median"] > 3 * timed["small"]["latency_ms_median"]
    # Rounds are about `round_seconds` long: the small model gets more calls.
    assert timed["small"]["calls_per_round"] > timed["large"]["calls_per_round"]


def test_logits_of_an_int8_file_match_the_keras_model():
    model = dense_model(32)
    images = np.random.default_rng(1).random((64, 64), np.float32)
    logits = export.LiteModel(export.convert(model, "int8", images)).logits(images)
    expected = model.predict(images, verbose=0)
    assert logits.shape == expected.shape
    assert np.max(np.abs(logits - expected)) < 0.05 * np.abs(expected).max() + 0.05
