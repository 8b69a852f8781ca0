"""`tf.distribute` strategies by name, for the `--distribute` option.

- `none`: TensorFlow's default strategy (one device: the GPU if there is one).
- `mirrored`: `MirroredStrategy`, synchronous data parallelism over all local GPUs
  (the CPU when there is none).
- `multi-worker`: `MultiWorkerMirroredStrategy` over the machines named in the
  `TF_CONFIG` environment variable (run the same command on each worker).

`--batch-size` is the global batch, split across replicas.
"""

import tensorflow as tf

STRATEGIES = ("none", "mirrored", "multi-worker")


def make_strategy(name):
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
