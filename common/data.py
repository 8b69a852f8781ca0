"""`tf.data` pipelines over in-memory arrays, cached teacher outputs, data
fingerprints and the validation split."""

import hashlib

import numpy as np
import tensorflow as tf

from kdtoolkit.errors import DataError
from kdtoolkit.training import compiled_predictor, predict


def _example(mask):
    """`"index 5"`, `"index (5, 3, 2)"`: the first True position of `mask`."""
    first = np.argwhere(mask)[0]
    return f"index {int(first[0])}" if len(first) == 1 else f"index {tuple(int(i) for i in first)}"


def check_images(x, where, *, shape=None, to="uint8"):
    """Image array `x` checked and returned in the pipeline's pixel scale, or a
    one-line `DataError` starting with `where` (a file and array name, say).

    Accepted: integers within 0..255 (uint8 returned as it is, no copy), and
    finite floats in [0, 1] (scaled by 255) or in [0, 255]. Refused: NaN or
    infinite values, integers or floats outside those ranges, non-numeric
    dtypes, and (with `shape`, the shape of one image) other image shapes.
    `to="uint8"`: uint8 pixels 0..255 (floats rounded); `to="float"`: float32 in
    [0, 1]. An all-float array whose largest value is at most 1 is read as [0, 1].
    """
    if to not in ("uint8", "float"):
        raise ValueError(f"to must be 'uint8' or 'float', got {to!r}")
    x = np.asarray(x)
    if x.ndim < 1 or len(x) == 0:
        raise DataError(f"{where}: no images (shape {x.shape}); expected (n, ...) with n > 0")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise DataError(f"{where}: images of shape {x.shape[1:]}, expected {tuple(shape)} (array shape {x.shape})")
    if x.dtype == np.uint8:
        return x if to == "uint8" else x.astype(np.float32) / 255.0
    if x.dtype.kind in "iu":
        bad = (x < 0) | (x > 255)
        if bad.any():
            raise DataError(f"{where}: {int(bad.sum())} pixel values outside 0..255 (e.g. {x[bad].flat[0]} at "
                            f"{_example(bad)}); store images as uint8 0..255 or floats in [0, 1]")
        return x.astype(np.uint8) if to == "uint8" else x.astype(np.float32) / 255.0
    if x.dtype.kind != "f":
        raise DataError(f"{where}: images of dtype {x.dtype}; store them as uint8 0..255 or floats in [0, 1]")
    low, high = float(x.min()), float(x.max())  # NaN and infinities show in these: two passes, no mask
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = ~np.isfinite(x)
        raise DataError(f"{where}: {int(bad.sum())} pixel values are NaN or infinite (e.g. {x[bad].flat[0]} at "
                        f"{_example(bad)}); fix or drop those images")
    if low < 0 or high > 255:
        bad = (x < 0) | (x > 255)
        raise DataError(f"{where}: float pixels span [{low:g}, {high:g}] ({int(bad.sum())} values outside [0, 255], "
                        f"e.g. {x[bad].flat[0]:g} at {_example(bad)}); give floats in [0, 1] or [0, 255], or uint8")
    unit = high <= 1.0
    if to == "float":
        return (x if unit else x / 255.0).astype(np.float32)
    scaled = x.astype(np.float32)  # one copy (float32 holds k/255 * 255 to well within 0.5), then in place
    if unit:
        scaled *= 255
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def check_labels(y, num_classes, where):
    """Class labels `y` checked: `(n,)` (or `(n, 1)`, flattened) integers in
    `0..num_classes-1`; whole-numbered floats are accepted as integers. Returns
    them (integer arrays as they are, no copy; floats as int32), or raises a
    one-line `DataError` starting with `where` naming the bad count and an example."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise DataError(f"{where}: labels of shape {y.shape}; expected (n,) class indices 0..{num_classes - 1} "
                        "(not one-hot)")
    if y.dtype.kind == "b" or y.dtype.kind not in "iuf":
        raise DataError(f"{where}: labels of dtype {y.dtype}; expected integer classes 0..{num_classes - 1}")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(np.nan_to_num(y)))
        if bad.any():
            raise DataError(f"{where}: {int(bad.sum())} labels are not whole numbers (e.g. {y[bad][0]!r} at "
                            f"{_example(bad)}); expected integer classes 0..{num_classes - 1}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} labels outside 0..{num_classes - 1} (e.g. {y[bad][0]:g} at "
                        f"{_example(bad)}); labels must be class indices 0..{num_classes - 1}")
    return y.astype(np.int32) if y.dtype.kind == "f" else y


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
