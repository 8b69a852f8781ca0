"""Helper run in a subprocess by test_distribute.py: TensorFlow's logical devices
must be configured before anything else touches TensorFlow."""

import json
import sys

import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kdtoolkit import data as common_data  # noqa: E402
from kdtoolkit import device, methods, training  # noqa: E402

device.configure()  # memory growth: on a GPU machine this process otherwise takes all the GPU's memory


def train(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    rng = np.random.default_rng(0)
    # 17 examples in batches of 8: the last global batch of 1 leaves one replica empty,
    # so the update is right only if each replica's loss is weighted by its share.
    arrays = {"x": rng.normal(size=(17, 3)).astype(np.float32), "y": rng.integers(0, 2, 17).astype(np.int32)}
    arrays["teacher_logits"] = rng.normal(size=(17, 2)).astype(np.float32)
    history = training.fit(methods.Distillation(model, temperature=2.0, alpha=0.5), common_data.batched(arrays, 8), epochs=2,
                           optimizer=keras.optimizers.SGD(0.1), strategy=strategy)
    return model.get_weights(), history


single_weights, single_history = train(tf.distribute.OneDeviceStrategy("/cpu:0"))  # not a GPU: same arithmetic
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
mirrored_weights, mirrored_history = train(mirrored)
json.dump({
    "replicas": mirrored.num_replicas_in_sync,
    "max_weight_difference": max(float(np.abs(a - b).max()) for a, b in zip(single_weights, mirrored_weights)),
    "weights_changed": bool(any(np.abs(a).sum() > 0 for a in single_weights)),
    "loss_single": single_history[-1]["loss"],
    "loss_mirrored": mirrored_history[-1]["loss"],
}, sys.stdout)
