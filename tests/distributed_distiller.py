"""Helper run in a subprocess by test_keras_protocol.py: `Distiller.fit` under
`tf.distribute.MirroredStrategy` on 2 logical CPU devices against one device.
TensorFlow's logical devices must be configured before anything else touches it.

    python tests/distributed_distiller.py METHOD
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kdtoolkit.distiller import Distiller  # noqa: E402
from kdtoolkit.errors import ConfigError  # noqa: E402


def train(strategy, method):
    rng = np.random.default_rng(0)
    # 70 examples in batches of 16: the last global batch of 6 splits 3 + 3 over the replicas.
    x, y = rng.uniform(size=(70, 6, 6, 1)).astype("float32"), np.arange(70) % 3
    keras.utils.set_random_seed(0)
    with strategy.scope():
        teacher = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                                    keras.layers.Flatten(), keras.layers.Dense(12, activation="relu"),
                                    keras.layers.Dense(3)])
        student = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                                    keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
        distiller = Distiller(teacher, student, method, seed=3)
        distiller.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    return [w.numpy() for w in student.weights], history.history


method = sys.argv[1]
single, single_history = train(tf.distribute.OneDeviceStrategy("/cpu:0"), method)
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
try:
    weights, history = train(mirrored, method)
except ConfigError as err:
    print(json.dumps({"refused": str(err)}))
    sys.exit(0)
print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "max_weight_difference": max(float(np.abs(a - b).max()) for a, b in zip(single, weights)),
    "loss_single": single_history["loss"], "loss_mirrored": history["loss"],
    "accuracy_single": single_history["accuracy"], "accuracy_mirrored": history["accuracy"],
}))
