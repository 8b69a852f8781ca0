"""What `kdtoolkit.distiller.Distiller.fit` takes, turned into the batches its step trains on.

A user gives `fit` what Keras' `fit` takes: arrays (or tensors, or a dict of
them for a model with named inputs) with labels, a `tf.data.Dataset` of
`(x, y)` batches, or a `keras.utils.PyDataset`. Labels are class indices `(n,)`
or one-hot rows `(n, K)`. This module checks them and builds the dataset of
`{"x", "y", "index", "teacher_<target>"}` batches the method's step reads:

- arrays stay in memory; the teacher's targets are computed once per example
  (`cache_teacher`) and kept beside them; every epoch draws a new order, a
  function of the seed and the epoch number alone (`epoch_order`), so a run
  resumed at epoch k (`keras.callbacks.BackupAndRestore`) sees the batches an
  uninterrupted run sees;
- a dataset (or `PyDataset`) is streamed: with `cache_teacher`, one pass runs
  the teacher over it and writes inputs, labels and targets to a `tf.data`
  snapshot on disk (`Dataset.save`), which every epoch then reads in windows of 256 MiB
  each shuffled by the epoch's seed (the dataset's augmentation is drawn once,
  in that pass); without, the dataset is read afresh each epoch (fresh
  augmentations) and the teacher runs on every batch. Either way the training
  set is never held in memory.
"""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from kdtoolkit.data import check_labels, untuned
from kdtoolkit.errors import ConfigError, DataError

SHUFFLE_BYTES = 256 * 2**20  # the window a streamed (disk-cached) dataset is shuffled within


def labels_of(y, num_classes, where="y"):
    """`(n,)` int32 class indices from integer labels `(n,)` / `(n, 1)` or one-hot
    rows `(n, num_classes)`; soft or out-of-range labels are a one-line `DataError`."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        one_hot = np.isin(y, (0, 1)).all(axis=1) & (y.sum(axis=1) == 1)
        if not one_hot.all():
            raise DataError(f"{where}: {int((~one_hot).sum())} rows of shape ({num_classes},) are not one-hot; "
                            "Distiller.fit takes class indices (n,) or one-hot rows, not soft labels")
        y = y.argmax(axis=1)
    return check_labels(y, num_classes, where).astype(np.int32)


def check_inputs(x, where="x"):
    """Refuses, in one line, inputs that are not numbers or hold NaN or infinite values
    (any model's inputs: no image range is assumed)."""
    for i, leaf in enumerate(tf.nest.flatten(x)):
        name = where if len(tf.nest.flatten(x)) == 1 else f"{where} input {i}"
        if leaf.dtype.kind not in "biuf":
            raise DataError(f"{name}: inputs of dtype {leaf.dtype}; give numbers (e.g. float32 or uint8)")
        if leaf.dtype.kind == "f" and not np.isfinite(leaf).all():
            bad = int((~np.isfinite(leaf)).sum())
            raise DataError(f"{name}: {bad} values are NaN or infinite; fix or drop those examples")


def num_examples(x):
    """Examples in array-like `x` (a dict or list of arrays for several inputs)."""
    sizes = {len(leaf) for leaf in tf.nest.flatten(x)}
    if len(sizes) != 1:
        raise DataError(f"the inputs have different numbers of examples: {sorted(sizes)}")
    return sizes.pop()


def as_numpy(x):
    return tf.nest.map_structure(np.asarray, x)


def split_validation(x, y, fraction):
    """`(x, y, (x_val, y_val))`: Keras' `validation_split`, the last `fraction` of the
    examples (before any shuffling) held out."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation_split must be in (0, 1), got {fraction!r}")
    n = num_examples(x)
    cut = int(n * (1.0 - fraction))
    if cut == 0 or cut == n:
        raise ConfigError(f"validation_split={fraction} of {n} examples leaves an empty training or validation set")
    head = lambda a: a[:cut]  # noqa: E731
    tail = lambda a: a[cut:]  # noqa: E731
    return tf.nest.map_structure(head, x), y[:cut], (tf.nest.map_structure(tail, x), y[cut:])


def from_py_dataset(data):
    """A `keras.utils.PyDataset` (or `keras.utils.Sequence`) of `(x, y)` batches as a
    `tf.data.Dataset`, read batch by batch (never all at once)."""
    if len(data) == 0:
        raise DataError("the PyDataset is empty")
    first = data[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise DataError("a PyDataset for Distiller.fit must yield (x, y) batches")
    if len(first) > 2:
        raise ConfigError("Distiller.fit takes no sample weights (the PyDataset yields (x, y, w)); yield (x, y)")
    spec = tf.nest.map_structure(
        lambda a: tf.TensorSpec((None, *np.shape(a)[1:]), tf.as_dtype(np.asarray(a).dtype)), tuple(first))

    def batches():
        for i in range(len(data)):
            yield tuple(tf.nest.map_structure(np.asarray, tuple(data[i])))

    return tf.data.Dataset.from_generator(batches, output_signature=spec)


def check_batched(dataset):
    """Refuses, in one line, a dataset that does not yield `(x, y)` batches."""
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) < 2:
        raise DataError("a dataset for Distiller.fit must yield (x, y) batches; e.g. "
                        "tf.data.Dataset.from_tensor_slices((x, y)).batch(32)")
    if len(spec) > 2:
        raise ConfigError("Distiller.fit takes no sample weights (the dataset yields (x, y, w)); map it to (x, y)")
    if spec[1].shape.rank == 0:
        raise DataError("the dataset yields single examples (its labels are scalars); batch it first, "
                        "e.g. dataset.batch(32)")


def epoch_order(n, seed, epoch):
    """`(n,)` int32: the permutation of the examples in `epoch` (a scalar tensor),
    a pure function of `seed` and `epoch`."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int32), seed=key)


def array_batches(arrays, batch_size, epoch, shuffle=True, seed=0):
    """`{name: (n, ...) array}` as a dataset of `{name: (b, ...)}` batches whose order
    in each epoch is `epoch_order(n, seed, epoch)` (`epoch`: a `tf.Variable` the
    caller sets before the epoch) or, without `shuffle`, the arrays' order."""
    n = num_examples(arrays)
    tensors = tf.nest.map_structure(tf.constant, arrays)
    if shuffle:
        order = tf.data.Dataset.from_tensors(0).map(lambda _: epoch_order(n, seed, epoch.read_value())).unbatch()
    else:
        order = tf.data.Dataset.range(n).map(lambda i: tf.cast(i, tf.int32))
    gather = lambda index: tf.nest.map_structure(lambda t: tf.gather(t, index), tensors)  # noqa: E731
    return untuned(order.batch(batch_size).map(gather).prefetch(2))


def indexed_batches(dataset):
    """`(x, y)` batches as `{"x", "y", "index"}` dicts, `"index"` counting examples from 0."""
    def add_index(offset, batch):
        x, y = batch
        size = tf.shape(y)[0]
        return offset + size, {"x": x, "y": y, "index": offset + tf.range(size)}

    return dataset.scan(tf.constant(0, tf.int32), add_index)


def one_hot_to_index(batch, num_classes):
    """A batch's `"y"` as `(b,)` int32 class indices (one-hot rows are arg-maxed), checked
    in the pipeline: a label outside `0..num_classes-1` or a row that is not one-hot
    stops the dataset with a message saying so."""
    y = batch["y"]
    if y.shape.rank == 2 and y.shape[-1] == num_classes and num_classes > 1:
        tf.debugging.assert_equal(tf.reduce_all((y == 0) | (y == 1)) & tf.reduce_all(tf.reduce_sum(y, -1) == 1),
                                  True, message="Distiller.fit takes one-hot rows, not soft labels")
        y = tf.argmax(y, axis=-1)
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    tf.debugging.assert_equal(tf.reduce_all((y >= 0) & (y < num_classes)), True,
                              message=f"labels must be class indices 0..{num_classes - 1}")
    return {**batch, "y": y}


def stream_batches(dataset, num_classes):
    """A user's `(x, y)` dataset as `{"x", "y", "index"}` batches, read afresh each epoch
    (its number of batches kept where the dataset knows it)."""
    batches = indexed_batches(dataset).map(lambda b: one_hot_to_index(b, num_classes))
    count = int(dataset.cardinality())
    return batches.apply(tf.data.experimental.assert_cardinality(count)) if count >= 0 else batches


def cache_on_disk(dataset, num_classes, targets_fn, folder):
    """Runs `targets_fn(x) -> {target: (b, ...)}` once over `dataset` (`(x, y)` batches)
    and saves the examples with `"y"` (class indices), `"index"` and their
    `"teacher_<target>"` values as a `tf.data` snapshot in `folder`; returns
    `(dataset of single examples, labels (n,), the first batch's size)`. Each batch's
    labels are checked as `labels_of` checks arrays: the first bad batch stops the
    pass with a one-line `DataError` naming it, before any training."""
    labels, problems = [], []

    def with_targets():
        for number, batch in enumerate(indexed_batches(dataset)):
            try:
                y = labels_of(batch["y"].numpy(), num_classes, where=f"batch {number} of the dataset")
            except DataError as err:
                problems.append(err)
                return
            labels.append(y)
            targets = targets_fn(batch["x"])
            yield {**batch, "y": y, **{f"teacher_{k}": v for k, v in targets.items()}}

    probe = next(iter(indexed_batches(dataset.take(1))))
    spec = {"y": tf.TensorSpec((None,), tf.int32), "index": tf.TensorSpec((None,), tf.int32),
            "x": tf.nest.map_structure(lambda v: tf.TensorSpec((None, *v.shape[1:]), v.dtype), probe["x"])}
    for name, value in targets_fn(probe["x"]).items():
        spec[f"teacher_{name}"] = tf.TensorSpec((None, *value.shape[1:]), value.dtype)
    tf.data.Dataset.from_generator(with_targets, output_signature=spec).unbatch().save(folder)
    if problems:
        raise problems[0]
    if not labels:
        raise DataError("the dataset is empty")
    return tf.data.Dataset.load(folder), np.concatenate(labels), len(probe["y"])


def shuffled_stream(examples, batch_size, epoch, seed=0, buffer_bytes=SHUFFLE_BYTES):
    """Single `examples` as batches in an order that is a function of `seed` and the
    epoch (`epoch`: a `tf.Variable` set before each epoch): consecutive windows of
    about `buffer_bytes` (at least one batch) are each permuted at random, as a
    shuffle buffer of that size would mix them."""
    example_bytes = sum(spec.shape.num_elements() * spec.dtype.size for spec in tf.nest.flatten(examples.element_spec))
    window = max(batch_size, int(buffer_bytes // max(example_bytes, 1)))

    def permute(window_index, chunk):
        key = tf.stack([tf.cast(seed, tf.int64), epoch.read_value() * 1_000_003 + window_index])
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(chunk["y"])[0]), seed=key)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), chunk)

    batches = examples.batch(window).enumerate().map(permute).unbatch().batch(batch_size)
    count = int(examples.cardinality())
    if count >= 0:
        batches = batches.apply(tf.data.experimental.assert_cardinality(-(-count // batch_size)))
    return untuned(batches.prefetch(2))


def cache_folder(folder=None):
    """A fresh folder for a streamed dataset's snapshot (in `folder`, else the system's
    temporary directory)."""
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    return tempfile.mkdtemp(prefix="distiller-cache-", dir=folder)


def is_py_dataset(x):
    return isinstance(x, keras.utils.PyDataset)


# `Distiller.fit`'s inputs, checked, and the batches it trains on


def fit_inputs(x, y, validation_split, validation_data, sample_weight, class_weight, classes_of):
    """`(x, y, validation_data)`: what `Distiller.fit` was given, checked, as it trains on
    it: a `tf.data.Dataset` of `(x, y)` batches (a `PyDataset` read as one; `y` None),
    or arrays `x` (NumPy, `(n, ...)`, or a dict or list of them) with `(n,)` int32 class
    indices `y`, the last `validation_split` of them held out as `validation_data`.
    `classes_of(x)`: the teacher's number of classes, from a batch of inputs.
    `sample_weight` and `class_weight` are refused; each refusal is one line."""
    if sample_weight is not None or class_weight is not None:
        raise ConfigError("Distiller.fit takes no sample_weight or class_weight: the methods' terms are batch "
                          "means, some relating examples to each other; repeat or drop examples instead")
    if is_py_dataset(x):
        x = from_py_dataset(x)
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ConfigError("give the labels inside the dataset, as (x, y) batches, not as y")
        if validation_split:
            raise ConfigError("validation_split needs arrays; give a dataset as validation_data instead")
        check_batched(x)
        classes_of(next(iter(x.take(1)))[0])
    else:
        if y is None:
            raise ConfigError("Distiller.fit needs labels: fit(x, y) or a dataset of (x, y) batches")
        x = as_numpy(x)
        check_inputs(x)
        if num_examples(x) != len(y):
            raise ConfigError(f"x has {num_examples(x)} examples and y {len(y)}; give one label per example")
        y = labels_of(y, classes_of(x))
        if validation_split:
            x, y, validation_data = split_validation(x, y, validation_split)
    return x, y, validation_data


def array_targets(targets_fn, x):
    """The teacher's targets `{"teacher_<target>": (n, ...) float32}` for arrays `x`, from
    `targets_fn(x, training=False) -> {target: tensor}` in chunks of 1,024 examples."""
    predict = tf.function(lambda batch: targets_fn(batch, training=False))
    n = num_examples(x)
    parts = [predict(tf.nest.map_structure(lambda a: tf.constant(a[i:i + 1024]), x)) for i in range(0, n, 1024)]
    return {f"teacher_{name}": np.concatenate([p[name].numpy() for p in parts]).astype(np.float32)
            for name in parts[0]}


def training_batches(x, y, batch_size, shuffle, num_classes, targets_fn, epoch, seed, cache_dir=None):
    """`(dataset of {"x", "y", "index", "teacher_<target>"} batches, labels (n,))` of
    `fit_inputs`' `x`, `y`: arrays with the teacher's targets computed once per example
    (`array_targets`), or a streamed dataset written once with its targets to a snapshot
    in `cache_dir` (`cache_on_disk`; its labels read in that pass). `targets_fn`: the
    teacher's `targets_fn(x, training=False) -> {target: tensor}`, or None for batches
    without targets (the teacher runs per step; a streamed dataset then has no labels
    before training: None). `epoch`: the `tf.Variable` the order is drawn for."""
    if isinstance(x, tf.data.Dataset):
        if targets_fn is None:
            return stream_batches(x, num_classes), None  # no pass before training: no labels
        folder = cache_folder(cache_dir)
        examples, labels, size = cache_on_disk(x, num_classes, tf.function(targets_fn), folder)
        return shuffled_stream(examples, batch_size or size, epoch, seed), labels
    arrays = {"x": x, "y": y, "index": np.arange(len(y), dtype=np.int32)}
    if targets_fn is not None:
        arrays.update(array_targets(targets_fn, x))
    return array_batches(arrays, batch_size or 32, epoch, shuffle, seed), y
