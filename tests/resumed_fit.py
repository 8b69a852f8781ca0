"""Helper run in a subprocess by test_keras_protocol.py: `Distiller.fit` with
`keras.callbacks.BackupAndRestore`, optionally killed (SIGKILL) in the middle of
an epoch. Prints the trained student's weights' digest as JSON.

    python tests/resumed_fit.py METHOD BACKUP_DIR [KILL_AT_EPOCH]
"""

import hashlib
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kdtoolkit.distiller import Distiller  # noqa: E402

OPTIONS = {"crd": {"negatives": 16, "dim": 8}, "cid": {"init_epochs": 1}, "dkd": {"warmup": 2}}


def models():
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(12, activation="relu"),
                                keras.layers.Dense(3)])
    student = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(float(os.environ.get("DROP", 0.3))),
                                keras.layers.Dense(3)])
    return teacher, student


class KillAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.kill_epoch, self.epoch = epoch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.kill_epoch and batch == 2:
            os.kill(os.getpid(), signal.SIGKILL)


def main(method, backup, kill_at=None):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(96, 6, 6, 1)).astype("float32"), np.arange(96) % 3
    teacher, student = models()
    distiller = Distiller(teacher, student, method, seed=7, **OPTIONS.get(method, {}))
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    callbacks = [keras.callbacks.BackupAndRestore(backup)]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    distiller.fit(x, y, epochs=4, batch_size=16, callbacks=callbacks, verbose=0)
    state = {v.path: hashlib.sha256(np.asarray(v).tobytes()).hexdigest()[:12]
             for v in [*distiller.variables, *distiller.optimizer.variables]}
    print(json.dumps(state))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
