"""The one training loop: a compiled `tf.GradientTape` step driven by a `Method`.

Teacher, KD student, scratch student, teacher assistant and subclass models all
train through `fit`; only the `Method` (their loss) differs.
"""

import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common.results import write_arrays_atomic


def compiled_predictor(logits_fn):
    """Wraps `logits_fn(x, training=False)` in a `tf.function` for fast inference."""
    return tf.function(lambda x: logits_fn(x, training=False), reduce_retracing=True)


def probabilities_fn(logits_fn, batch_size=1024):
    """`images (numpy) -> (n, classes) softmax probabilities`, compiled and batched."""
    predictor = compiled_predictor(logits_fn)

    def probabilities(images):
        images = np.asarray(images, np.float32)
        chunks = [predictor(tf.constant(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return tf.nn.softmax(tf.concat(chunks, axis=0)).numpy()

    return probabilities


def predict(predictor, dataset):
    """Runs `predictor` over a dataset of `{"x", "y", ...}` batches.

    Returns `(logits, labels)` as numpy arrays of shapes `(n, classes)` and `(n,)`,
    in dataset order.
    """
    logits, labels = [], []
    for batch in dataset:
        logits.append(predictor(batch["x"]).numpy())
        labels.append(batch["y"].numpy())
    if not logits:
        raise ValueError("cannot predict on an empty dataset")
    return np.concatenate(logits), np.concatenate(labels).reshape(-1)


def accuracy(logits, labels):
    """Fraction of rows whose arg-max matches the integer label."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.reshape(labels, -1)))


def make_train_step(method, optimizer, strategy=None, element_spec=None):
    """Returns `(step, trackers)`: a compiled step and the metrics it updates.

    With `element_spec` (the batches' `tf.data` spec, batch dimension unknown), the
    step is traced once for every batch size; without it, a last partial batch
    traces the step a second time.

    `trackers` maps each loss term, `"loss"` (their sum) and `"train_accuracy"` to a
    `keras.metrics` object, averaged over the examples seen since the last reset.
    Under a `tf.distribute` strategy each replica computes its share of the
    (global) batch; its loss is divided by the number of replicas because the
    optimizer sums the replicas' gradients, so the update is the global mean's.
    The model must have been built under `strategy.scope()`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    variables = method.trainable_variables
    with strategy.scope():
        trackers = {name: keras.metrics.Mean(name=name) for name in method.term_names}
        trackers["loss"] = keras.metrics.Mean(name="loss")
        trackers["train_accuracy"] = keras.metrics.SparseCategoricalAccuracy()
        optimizer.build(variables)
    replicas = strategy.num_replicas_in_sync

    def replica_step(batch):
        with tf.GradientTape() as tape:
            terms, logits = method.loss_terms(batch, training=True)
            loss = tf.add_n(list(terms.values()))
            scaled_loss = loss / replicas
        gradients = tape.gradient(scaled_loss, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        weight = tf.shape(batch["y"])[0]
        for name, value in terms.items():
            trackers[name].update_state(value, sample_weight=weight)
        trackers["loss"].update_state(loss, sample_weight=weight)
        trackers["train_accuracy"].update_state(batch["y"], logits)

    def step(batch):
        strategy.run(replica_step, args=(batch,))

    step = tf.function(step, input_signature=None if element_spec is None else [element_spec])

    return step, trackers


def accuracy_on(dataset):
    """An `evaluate` callable for `fit`: `predictor -> {"test_accuracy": ...}` on `dataset`."""
    return lambda predictor: {"test_accuracy": accuracy(*predict(predictor, dataset))}


class EpochCheckpoint:
    """The state after the last finished epoch, in one atomically written file
    `directory/state.npz`: every model variable (weights and the random-generator
    states of layers such as dropout), every optimizer variable, and the history so
    far. `fit` saves it after every epoch and continues from it, so an interrupted
    run loses at most the epoch in progress."""

    def __init__(self, directory, model, optimizer):
        self.path = Path(directory) / "state.npz"
        self.model, self.optimizer = model, optimizer

    def _variables(self):
        return {"model": self.model.variables, "optimizer": self.optimizer.variables}

    def save(self, history):
        arrays = {f"{group}_{i}": np.asarray(v) for group, variables in self._variables().items()
                  for i, v in enumerate(variables)}
        write_arrays_atomic(self.path, {**arrays, "history": np.array(json.dumps(history))})

    def load(self):
        """Restores model and (built) optimizer; returns the saved history, or [] if none."""
        if not self.path.exists():
            return []
        with np.load(self.path) as saved:
            for group, variables in self._variables().items():
                for i, variable in enumerate(variables):
                    variable.assign(saved[f"{group}_{i}"])
            return json.loads(str(saved["history"]))


def fit(
    method,
    train_data,
    *,
    epochs,
    optimizer,
    evaluate=None,
    log=None,
    on_epoch_end=None,
    strategy=None,
    resume_dir=None,
):
    """Trains `method.model` for `epochs` passes over `train_data`.

    Args:
      method: a `common.methods.Method`.
      train_data: `tf.data.Dataset` of batch dicts (reshuffled by the dataset itself).
      epochs: number of passes, >= 1.
      optimizer: a `keras.optimizers.Optimizer`, used as it is (created under
        `strategy.scope()` when a strategy is given).
      evaluate: optional `callable(predictor) -> dict` of test metrics, run after
        every epoch; `predictor` is the compiled `x -> class logits` of the method
        (e.g. `accuracy_on(test_data)`).
      log: optional `callable(str)` for one progress line per epoch.
      on_epoch_end: optional `callable(epoch, record)`, e.g. to keep checkpoints.
      strategy: optional `tf.distribute.Strategy` the model was built under; each
        batch of `train_data` is the global batch, split across its replicas.
      resume_dir: optional folder for an `EpochCheckpoint`: training continues
        after the last epoch saved there, and saves every epoch. The dataset is
        first advanced by the finished epochs (its shuffles and random views are
        drawn per pass), so a resumed run sees the data an uninterrupted one would.

    Returns:
      The history: one dict per epoch with `epoch` (1-based), each loss term,
      `loss`, `train_accuracy`, `seconds` (train time) and, with `evaluate`, its
      metrics and `eval_seconds`.
    """
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    strategy = strategy or tf.distribute.get_strategy()
    batches = strategy.experimental_distribute_dataset(train_data)
    step, trackers = make_train_step(method, optimizer, strategy, element_spec=batches.element_spec)
    predictor = compiled_predictor(method.class_logits) if evaluate is not None else None
    checkpoint = EpochCheckpoint(resume_dir, method.model, optimizer) if resume_dir is not None else None
    history = checkpoint.load() if checkpoint is not None else []
    if history and log is not None:
        log(f"resuming after epoch {len(history)}/{epochs} (saved in {resume_dir})")
    for _ in history:
        iter(batches)  # draws that pass's shuffle and views without reading it
    for epoch in range(len(history) + 1, int(epochs) + 1):
        for tracker in trackers.values():
            tracker.reset_state()
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        record = {"epoch": epoch}
        record.update({name: float(t.result()) for name, t in trackers.items()})
        record["seconds"] = time.perf_counter() - start
        if predictor is not None:
            start = time.perf_counter()
            record.update(evaluate(predictor))
            record["eval_seconds"] = time.perf_counter() - start
        history.append(record)
        if checkpoint is not None and epoch < int(epochs):
            checkpoint.save(history)
        if log is not None:
            log(format_epoch(record, epochs, method.term_names))
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return history


def format_epoch(record, epochs, term_names=()):
    """One progress line: `epoch 3/12 loss 0.1234 (ce 0.1, kd 0.02) train_acc 0.98 test_... 4.1s`."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']:.4f}"]
    if len(term_names) > 1:
        parts.append("(" + ", ".join(f"{k} {record[k]:.4f}" for k in term_names) + ")")
    parts.append(f"train_acc {record['train_accuracy']:.4f}")
    parts += [f"{k.replace('accuracy', 'acc')} {v:.4f}" for k, v in record.items()
              if k.startswith("test_") and isinstance(v, float)]
    parts.append(f"{record['seconds']:.1f}s")
    return " ".join(parts)
