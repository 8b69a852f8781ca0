"""Helper run in subprocesses by test_keras_protocol.py: `Distiller.fit` as one
worker of a `tf.distribute.MultiWorkerMirroredStrategy` (the cluster in
`TF_CONFIG`), or alone without `TF_CONFIG`. Prints the student's weights as JSON.

    TF_CONFIG='{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": 0}}' \\
        python tests/multiworker_distiller.py
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kdtoolkit.distiller import Distiller  # noqa: E402

strategy = (tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ
            else tf.distribute.OneDeviceStrategy("/cpu:0"))
rng = np.random.default_rng(0)
x, y = rng.uniform(size=(64, 6, 6, 1)).astype("float32"), np.arange(64) % 3
keras.utils.set_random_seed(0)
with strategy.scope():
    teacher = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(12, activation="relu"), keras.layers.Dense(3)])
    student = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    distiller = Distiller(teacher, student, "kd", seed=3)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"],
                  "weights": [w.numpy().tolist() for w in student.weights]}))
