"""`tf.distribute` strategies by name, for the `--distribute` option.

- `none`: TensorFlow's default strategy (one device: the GPU if there is one).
- `mirrored`: `MirroredStrategy`, synchronous data parallelism over all local GPUs
  (the CPU when there is none).
- `multi-worker`: `MultiWorkerMirroredStrategy` over the machines named in the
  `TF_CONFIG` environment variable (run the same command on each worker).

`--batch-size` is the global batch, split across replicas. Every worker runs the
same steps; only the chief writes `--out` (see `results_root`).
"""

import os
import re
from pathlib import Path

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


def cluster_resolver(name):
    """The cluster resolver of strategy `name`, read from `TF_CONFIG` without building
    the strategy (None for the one-process strategies)."""
    if name != "multi-worker":
        return None
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def is_chief(resolver):
    """Whether this process is the one that writes results: yes unless it is a
    non-chief worker of a multi-worker cluster (the chief, or worker 0 of a
    cluster without one, writes; the rule of TensorFlow's multi-worker guide).
    `resolver`: a strategy's `cluster_resolver`, or None (one process)."""
    task_type = getattr(resolver, "task_type", None)
    if task_type is None or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and not has_chief


def results_root(out, resolver):
    """`out` for the chief; `out/.workers/<type>-<id>` for the other workers, which
    keep their own copy of the store (so each resumes exactly as the chief does)
    without writing the chief's results."""
    if is_chief(resolver):
        return Path(out)
    return Path(out) / ".workers" / f"{resolver.task_type}-{resolver.task_id}"


def workers_agree(strategy, value):
    """Whether every worker of `strategy` gets the same integer from `value()` (gathered
    across the cluster; True for one process, where `value` is not called)."""
    if getattr(strategy, "cluster_resolver", None) is None:
        return True
    local = tf.constant([value()], tf.int64)
    gathered = strategy.gather(strategy.experimental_distribute_values_from_function(lambda _context: local), axis=0)
    return bool(tf.reduce_all(gathered == gathered[0]))


def lost_workers(err):
    """The workers TensorFlow's error `err` names as stopped (`worker 1`, from its
    "/job:worker/replica:0/task:1" lines after "unhealthy"), or "another worker"."""
    text = str(err)
    named = re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text[text.find("unhealthy"):]) if "unhealthy" in text else []
    names = sorted({f"{job} {task}" for job, task in named})
    return ", ".join(names) if names else "another worker"


def lost_worker(err):
    """Whether `err` (raised in a multi-worker run, `TF_CONFIG` set) says that another
    worker of the cluster stopped: its collective ops are aborted or time out."""
    lost = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)
    return isinstance(err, lost) and "TF_CONFIG" in os.environ
