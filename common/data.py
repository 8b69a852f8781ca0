"""`tf.data` pipelines over in-memory arrays, and cached teacher outputs."""

import numpy as np
import tensorflow as tf

from common.training import compiled_predictor, predict


def batched(arrays, batch_size, *, shuffle=False, seed=None, map_fn=None):
    """A dataset of batch dicts from a dict of equal-length arrays.

    With `shuffle`, the whole set is reshuffled every epoch (buffer = set size).
    `map_fn` is applied per batch (e.g. uint8 -> float scaling), so arrays can stay
    compact in memory.
    """
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"arrays must share their first dimension, got sizes {sorted(sizes)}")
    (size,) = sizes
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        dataset = dataset.shuffle(size, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if map_fn is not None:
        dataset = dataset.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def teacher_logits(teacher_logits_fn, arrays, batch_size, map_fn=None):
    """`(n, classes)` float32 logits of a frozen model for every row of `arrays`, in order.

    Computed once and attached to the training arrays (`"teacher_logits"`), a frozen
    teacher costs one inference pass instead of one per student step and epoch.
    """
    dataset = batched(arrays, batch_size, map_fn=map_fn)
    logits, _ = predict(compiled_predictor(teacher_logits_fn), dataset)
    return logits.astype(np.float32)
