"""The one training loop: a compiled `tf.GradientTape` step driven by a `Method`.

Teacher, KD student, scratch student, teacher assistant and subclass models all
train through `fit`; only the `Method` (their loss) differs.
"""

import math
import time

import keras
import numpy as np
import tensorflow as tf

from kdtoolkit.checkpoint import EpochCheckpoint
from kdtoolkit.errors import UserError


def compiled_predictor(logits_fn):
    """Wraps `logits_fn(x, training=False)` in a `tf.function` for fast inference;
    outputs (a tensor or a dict of them) come back as float32 whatever the precision."""
    def predict_float32(x):
        return tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), logits_fn(x, training=False))

    return tf.function(predict_float32, reduce_retracing=True)


def probabilities_fn(logits_fn, batch_size=1024):
    """`images (numpy) -> (n, classes) softmax probabilities`, compiled and batched."""
    predictor = compiled_predictor(logits_fn)

    def probabilities(images):
        images = np.asarray(images, np.float32)
        chunks = [predictor(tf.constant(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        return tf.nn.softmax(tf.concat(chunks, axis=0)).numpy()

    return probabilities


def predict(predictor, dataset, prepare=None):
    """Runs `predictor` over a dataset of `{"x", "y", ...}` batches (each first passed
    through `prepare`, `batch -> batch`, when given: see `fit`).

    Returns `(outputs, labels)` in dataset order: `outputs` the `(n, ...)` numpy array
    of the predictor (e.g. `(n, classes)` logits), or a dict of them when it returns a
    dict; `labels` of shape `(n,)`.
    """
    outputs, labels = [], []
    for batch in dataset:
        outputs.append(predictor((prepare(batch) if prepare is not None else batch)["x"]))
        labels.append(batch["y"].numpy())
    if not outputs:
        raise ValueError("cannot predict on an empty dataset")
    labels = np.concatenate(labels).reshape(-1)
    if isinstance(outputs[0], dict):
        return {k: np.concatenate([o[k].numpy() for o in outputs]) for k in outputs[0]}, labels
    return np.concatenate([o.numpy() for o in outputs]), labels


def accuracy(logits, labels):
    """Fraction of rows whose arg-max matches the integer label."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.reshape(labels, -1)))


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run is not recorded as finished."""


class StepMeans(keras.metrics.Metric):
    """Running means of a training step's named batch means (each loss term, `loss`,
    each model's `train_accuracy`), weighted by the examples each batch holds: one
    `(n,)` total and one example count, so a step updates all of them with two ops
    however many there are (a fused grid has hundreds). `result()` is the
    `{name: mean}` dict since the last `reset_state()`."""

    def __init__(self, names, name="step_means"):
        super().__init__(name=name)
        self.names = tuple(names)
        self.total = self.add_variable(shape=(len(self.names),), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, values, examples):
        """`values`: `(n,)` float32 batch means in `names` order; `examples`: the
        float32 number of examples they average (0: a replica's empty share, adds nothing)."""
        self.total.assign_add(tf.where(examples > 0, values, 0.0) * examples)
        self.count.assign_add(examples)

    def result(self):
        return dict(zip(self.names, tf.unstack(tf.math.divide_no_nan(self.total, self.count))))


def descend(method, optimizer, batch, variables):
    """One gradient step of `method` on `batch`: the step both training loops run
    (`make_train_step` here, `kdtoolkit.distiller.Distiller.train_step` under Keras'
    `fit`). Returns `(terms, loss, class logits, local batch size)`.

    Under a `tf.distribute` strategy each replica computes the mean loss of its
    share of the (global) batch and weights it by `local size / global size` (as
    `tf.nn.compute_average_loss` does); the optimizer sums the replicas'
    gradients, so the update is that of the global batch's mean loss even when
    the replicas get unequal shares (a last partial batch)."""
    local_size = tf.cast(tf.shape(batch["y"])[0], tf.float32)
    global_size = tf.distribute.get_replica_context().all_reduce("sum", local_size)
    with tf.GradientTape() as tape:
        terms, logits = method.loss_terms(batch, training=True)
        loss = tf.add_n([tf.cast(t, tf.float32) for t in terms.values()])
        # A replica can get no examples of a last partial batch: its mean is NaN, its weight 0.
        scaled_loss = optimizer.scale_loss(tf.math.multiply_no_nan(loss, local_size / global_size))
    gradients = tape.gradient(scaled_loss, variables)
    optimizer.apply_gradients(zip(gradients, variables))
    return terms, loss, logits, local_size


def make_train_step(method, optimizer, strategy=None, element_spec=None, jit=False, steps_per_call=1, prepare=None):
    """Returns `(step, means)`: a compiled step and the `StepMeans` it updates.

    With `element_spec` (the batches' `tf.data` spec, batch dimension unknown), the
    step is traced once for every batch size; without it, a last partial batch
    traces the step a second time. `jit`: each replica's step is XLA-compiled
    (with one step per call, for full batches only: see `FullBatchesCompiled`).
    `prepare`: `batch -> batch` run first inside the compiled step, on the device
    (e.g. Task 2's `show`, which turns uint8 images into their augmented views).

    `steps_per_call` > 1: `step` takes an iterator over the batches instead of one
    batch, runs up to that many steps in one compiled call (a `tf.range` loop, so
    Python is visited once per call) and returns how many it ran; fewer means the
    iterator is exhausted. The updates are those of one step per call.

    `means` tracks each loss term, `"loss"` (their sum) and `"train_accuracy"` (one
    per model, `"<prefix>train_accuracy"`, when the method trains several and
    returns their logits by prefix: `kdtoolkit.speed.fused`), averaged over the examples seen since the last reset.
    Each step is `descend` (see there for `tf.distribute`). The model must have
    been built under `strategy.scope()`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    variables = method.trainable_variables
    prefixes = getattr(method, "prefixes", ("",))  # several models' (`kdtoolkit.speed.fused`), or one
    with strategy.scope():
        means = StepMeans([*method.term_names, "loss", *(f"{p}train_accuracy" for p in prefixes)])
        optimizer.build(variables)

    def replica_step(batch):
        if prepare is not None:
            batch = prepare(batch)
        terms, loss, logits, local_size = descend(method, optimizer, batch, variables)
        logits = logits if isinstance(logits, dict) else {"": logits}
        labels = tf.cast(tf.reshape(batch["y"], [-1]), tf.int32)
        predicted = tf.stack([tf.argmax(logits[p], axis=-1, output_type=tf.int32) for p in prefixes])
        accuracies = tf.reduce_mean(tf.cast(tf.equal(predicted, labels), tf.float32), axis=-1)
        batch_means = tf.stack([tf.cast(terms[name], tf.float32) for name in method.term_names] + [loss])
        means.update_state(tf.concat([batch_means, accuracies], axis=0), local_size)

    run_replica = tf.function(replica_step, jit_compile=True) if jit else replica_step

    if steps_per_call == 1:
        def compile_step(replica_fn):
            def step(batch):
                strategy.run(replica_fn, args=(batch,))

            return tf.function(step, input_signature=None if element_spec is None else [element_spec])

        step = compile_step(run_replica)
        return (FullBatchesCompiled(step, compile_step(replica_step)) if jit else step), means

    def steps(iterator):
        done = tf.constant(0)
        for _ in tf.range(steps_per_call):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                break
            strategy.run(run_replica, args=(optional.get_value(),))
            done += 1
        return done

    return tf.function(steps), means


class FullBatchesCompiled:
    """A training step whose XLA program is compiled for the full batch only.

    XLA compiles once per input shape, so a last partial batch would compile the
    whole step a second time (on an H100 a first XLA epoch took 7-20 s against
    0.5 s for the next ones); here batches smaller than the largest seen so far go
    through `plain`, the same step without XLA. Distributed batches (several
    replicas) always take `xla`.
    """

    def __init__(self, xla, plain):
        self.xla, self.plain, self.full = xla, plain, 0

    def __call__(self, batch):
        labels = batch["y"]
        if not isinstance(labels, tf.Tensor):  # per-replica values
            return self.xla(batch)
        size = int(labels.shape[0])
        self.full = max(self.full, size)
        return (self.xla if size == self.full else self.plain)(batch)


def accuracy_on(dataset):
    """An `evaluate` callable for `fit`: `predictor -> {"test_accuracy": ...}` on `dataset`."""
    return lambda predictor: {"test_accuracy": accuracy(*predict(predictor, dataset))}


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
    jit=False,
    steps_per_call=1,
    prepare=None,
    workspaces=None,
):
    """Trains `method.model` for `epochs` passes over `train_data`.

    Args:
      method: a `kdtoolkit.methods.Method`.
      train_data: `tf.data.Dataset` of batch dicts (reshuffled by the dataset itself).
      epochs: number of passes, >= 1.
      optimizer: a `keras.optimizers.Optimizer`, used as it is (created under
        `strategy.scope()` when a strategy is given).
      evaluate: optional `callable(predictor) -> dict` of held-out metrics, run
        after every epoch; `predictor` is the compiled `x -> class logits` of the
        method (e.g. `accuracy_on(test_data)`).
      log: optional `callable(str)` for one progress line per epoch.
      on_epoch_end: optional `callable(epoch, record)`, e.g. to keep checkpoints;
        it runs before the epoch's resume state is saved, so a resumed run never
        skips it.
      strategy: optional `tf.distribute.Strategy` the model was built under; each
        batch of `train_data` is the global batch, split across its replicas.
      resume_dir: optional folder for a `kdtoolkit.checkpoint.EpochCheckpoint`:
        training continues after the last epoch saved there, and saves every
        epoch. The dataset is first advanced by the finished epochs (its shuffles
        and random views are drawn per pass), so a resumed run sees the data an
        uninterrupted one would. Epochs carried over are marked `"resumed": True`.
      jit, steps_per_call: see `make_train_step`; neither changes the updates.
      prepare: see `make_train_step` (the same function must be given to
        `evaluate`'s predictions if its batches need it).
      workspaces: optional `kdtoolkit.speed.workspaces.Workspaces`: the run trains in the
        workspace of its structure, whose compiled step earlier runs of the same
        structure traced (and XLA compiled); `method.model` gets the weights after
        every epoch and `optimizer` the final state. The updates are the same.

    Returns:
      The history: one dict per epoch with `epoch` (1-based), each loss term,
      `loss`, `train_accuracy`, `seconds` (train time), `cpu_seconds` (the
      process's CPU time over it, every thread: `cpu_seconds / seconds` is how
      many cores were busy) and, with `evaluate`, its metrics and `eval_seconds`.

    Raises:
      TrainingDiverged: an epoch's mean loss is NaN or infinite; that epoch is
        neither saved nor passed to `on_epoch_end`.
    """
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    strategy = strategy or tf.distribute.get_strategy()
    batches = strategy.experimental_distribute_dataset(train_data)

    def make_step(method, optimizer):
        return make_train_step(method, optimizer, strategy, element_spec=batches.element_spec, jit=jit,
                               steps_per_call=steps_per_call, prepare=prepare)

    run_method, run_optimizer = method, optimizer
    workspace = None
    if workspaces is not None:
        step_key = (str(batches.element_spec), jit, steps_per_call, prepare)
        workspace = workspaces.get(method, optimizer, make_step, strategy, step_key)
    if workspace is None:
        step, means = make_step(method, optimizer)
        predictor = compiled_predictor(method.class_logits) if evaluate is not None else None
    else:
        workspace.load(method, optimizer)
        method, optimizer = workspace.method, workspace.optimizer
        step, means = workspace.step, workspace.means
        predictor = workspace.predictor if evaluate is not None else None
    checkpoint = None
    history = []
    if resume_dir is not None:
        checkpoint = EpochCheckpoint(resume_dir, method.model, optimizer, method.trainable_variables,
                                     method.extra_layers)
        history = [{**record, "resumed": True} for record in checkpoint.load(log)]
    if history and log is not None:
        log(f"resuming after epoch {len(history)}/{epochs} (saved in {resume_dir})")
    for _ in history:
        iter(batches)  # draws that pass's shuffle and views without reading it
    try:
        for epoch in range(len(history) + 1, int(epochs) + 1):
            means.reset_state()
            method.begin_epoch(epoch, int(epochs))
            start, cpu_start = time.perf_counter(), time.process_time()
            if steps_per_call == 1:
                for batch in batches:
                    step(batch)
            else:
                iterator = iter(batches)
                while int(step(iterator)) == steps_per_call:
                    pass
            record = {"epoch": epoch}
            record.update({name: float(value) for name, value in means.result().items()})
            record["seconds"] = time.perf_counter() - start
            record["cpu_seconds"] = time.process_time() - cpu_start
            if not math.isfinite(record["loss"]):
                raise TrainingDiverged(
                    f"training diverged: the loss is {record['loss']} in epoch {epoch}/{epochs}; "
                    f"lower the learning rate (now {float(optimizer.learning_rate):g}) and run again"
                )
            if predictor is not None:
                start = time.perf_counter()
                record.update(evaluate(predictor))
                record["eval_seconds"] = time.perf_counter() - start
            history.append(record)
            if workspace is not None:
                workspace.store(run_method, run_optimizer if epoch == int(epochs) else None)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
            if checkpoint is not None and epoch < int(epochs):
                checkpoint.save(history)
            if log is not None:  # its state is saved (written in the background; see `finally`)
                log(method.epoch_line(record, epochs))
    finally:
        if checkpoint is not None:
            checkpoint.wait()  # the last epoch reported is on disk, also when interrupted
    return history


def format_epoch(record, epochs, term_names=()):
    """One progress line: `epoch 3/12 loss 0.1234 (ce 0.1, kd 0.02) train_acc 0.98 val_... test_... 4.1s`."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']:.4f}"]
    if len(term_names) > 1:
        parts.append("(" + ", ".join(f"{k} {record[k]:.4f}" for k in term_names) + ")")
    parts.append(f"train_acc {record['train_accuracy']:.4f}")
    parts += [f"{k.replace('accuracy', 'acc')} {v:.4f}" for k, v in record.items()
              if k.startswith(("val_", "test_")) and isinstance(v, float)]
    parts.append(f"{record['seconds']:.1f}s")
    return " ".join(parts)
