"""BatchNorm statistics re-estimated after a short run (`task2_mhist.batchnorm`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from task2_mhist import batchnorm


def bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.BatchNormalization(),
                             keras.layers.ReLU(), keras.layers.Dense(2)])


@pytest.mark.slow
def test_a_short_run_predicts_what_it_learned_after_recalibration():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(512, 8)) * 3 + 10).astype("float32")  # far from the initial mean 0, variance 1
    y = (x[:, 0] > 10).astype("int32")
    model = bn_model()
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)  # 32 steps: 0.99^32 = 72% of the start remains
    assert batchnorm.needs_recalibration(model, 32) and not batchnorm.needs_recalibration(model, 1450)
    trained_mode = np.mean(np.argmax(model(x, training=True), -1) == y)
    before = np.mean(np.argmax(model.predict(x, verbose=0), -1) == y)
    dataset = tf.data.Dataset.from_tensor_slices({"x": x}).batch(64)
    assert batchnorm.recalibrate(model, dataset) == 1
    after = np.mean(np.argmax(model.predict(x, verbose=0), -1) == y)
    assert trained_mode > 0.9 and after > 0.9 and before < 0.75, (trained_mode, before, after)
    layer = batchnorm.batch_norm_layers(model)[0]
    hidden = keras.Model(model.inputs, model.layers[0].output)(x).numpy()
    batches = hidden.reshape(8, 64, 16)
    np.testing.assert_allclose(layer.moving_mean.numpy(), batches.mean(axis=1).mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_variance.numpy(), batches.var(axis=1).mean(axis=0), rtol=1e-3)
    assert layer.momentum == 0.99


def test_layers_in_inference_mode_keep_their_statistics():
    inner = bn_model()
    inner.trainable = False  # Keras runs a frozen BatchNorm in inference mode
    outer = keras.Sequential([keras.Input((8,)), inner, keras.layers.Dense(2)])
    layer = batchnorm.batch_norm_layers(outer)[0]
    mean = layer.moving_mean.numpy().copy()
    x = np.random.default_rng(1).normal(size=(64, 8)).astype("float32") + 5
    assert batchnorm.recalibrate(outer, tf.data.Dataset.from_tensor_slices({"x": x}).batch(16)) == 0
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
