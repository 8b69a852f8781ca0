"""`tf.data` pipelines over in-memory arrays, cached teacher outputs, data
fingerprints and the validation split."""

import hashlib

import numpy as np
import tensorflow as tf

from common.errors import DataError
from common.training import compiled_predictor, predict


def untuned(dataset):
    """`dataset` with tf.data's autotuning off (`tf.data.Options().autotune`).

    The autotuner's background thread sleeps in doubling periods (10 ms, 20 ms, ...
    up to a minute), and on the machines measured here a finished iterator waited
    for that sleep to end: an epoch's seconds came out rounded up to 2.55, 10.24,
    20.47, 81.9 or 141.9 (measured in docs/benchmarks.md; `tests/test_training.py`
    checks that every pipeline carries this option). Every
    pipeline here gathers from arrays in memory, so a fixed parallelism (the cores)
    and a small prefetch lose nothing to tuning."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


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
    return untuned(dataset.prefetch(tf.data.AUTOTUNE))


def teacher_outputs(outputs_fn, arrays, batch_size, map_fn=None):
    """`{name: (n, ...)}` float32 outputs of a frozen model for every row of `arrays`, in
    order; `outputs_fn(x, training=False)` returns a dict (e.g. a method's
    `teacher_targets`) or one tensor (`{"logits": ...}`).

    Computed once and attached to the training arrays (`"teacher_<name>"`), a frozen
    teacher costs one inference pass instead of one per student step and epoch.
    """
    dataset = batched(arrays, batch_size, map_fn=map_fn)
    outputs, _ = predict(compiled_predictor(outputs_fn), dataset)
    outputs = outputs if isinstance(outputs, dict) else {"logits": outputs}
    return {name: array.astype(np.float32) for name, array in outputs.items()}


def fingerprint(*parts):
    """16 hex digits of SHA-256 over numpy arrays and strings, in order: equal data,
    equal fingerprint. Run identities and caches carry it, so results of one data
    set are never reused for another of the same size."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            digest.update(part.encode())
        else:
            array = np.ascontiguousarray(part)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def validation_count(validation, size):
    """Held-out examples for `--validation`: an integer count, or a fraction in (0, 1)
    of `size`; 0 holds none out. Leaves at least one example per side."""
    count = int(round(validation * size)) if 0 < validation < 1 else int(validation)
    if count and not 1 <= count < size:
        raise DataError(f"--validation {validation:g} holds out {count} of the {size} training examples; "
                        f"use a count below {size}, a fraction such as 0.1, or 0 for none")
    return count


def stratified_split(labels, count, seed=0):
    """`(train_indices, validation_indices)`, sorted: `count` examples held out, each
    class in proportion to its share (largest remainders), drawn with a fixed seed so
    every run and seed sees the same split."""
    labels = np.asarray(labels).reshape(-1)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * count / len(labels)
    take = np.floor(exact).astype(int)
    for i in np.argsort(take - exact)[: count - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    validation = np.sort(np.concatenate(held)) if held else np.array([], int)
    return np.setdiff1d(np.arange(len(labels)), validation), validation
