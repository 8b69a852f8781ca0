"""Running one named, resumable, recorded training run."""

import datetime
import platform
import resource
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from kdtoolkit import device
from kdtoolkit.runner import locks
from kdtoolkit.flops import count_flops
from kdtoolkit.files import identity_hash, save_weights
from kdtoolkit.training import TrainingDiverged


def environment():
    """Library versions, devices (GPU names, CUDA and cuDNN when a GPU is used) and
    the `kdtoolkit.device` settings in force, stored with every run for reproducibility."""
    gpus = tf.config.list_physical_devices("GPU")
    found = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "devices": [d.device_type for d in tf.config.list_physical_devices()],
    }
    found.update(device.settings())
    if gpus:
        build = tf.sysconfig.get_build_info()
        found["gpus"] = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        found.update(cuda=build.get("cuda_version"), cudnn=build.get("cudnn_version"))
    return found


def peak_rss_mib():
    """Peak resident memory of this process so far, in MiB (`getrusage` max RSS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def set_seed(seed):
    """Seeds Python, NumPy and TensorFlow (`keras.utils.set_random_seed`)."""
    keras.utils.set_random_seed(int(seed))


_FLOPS_BY_ARCHITECTURE = {}


def model_size(model):
    """`{"params": total parameter count, "flops": inference FLOPs at batch 1}`.

    FLOPs depend only on the architecture, so they are counted once per distinct
    model configuration in a process (profiling a large model takes seconds).
    """
    key = model.to_json()
    if key not in _FLOPS_BY_ARCHITECTURE:
        _FLOPS_BY_ARCHITECTURE[key] = count_flops(model)
    return {"params": int(model.count_params()), "flops": _FLOPS_BY_ARCHITECTURE[key]}


def run(store, name, *, identity, config, build, data, train, evaluate, log=None, about=None):
    """Trains and records run `name`, or loads it when it already finished.

    Args:
      store: a `kdtoolkit.runner.results.ResultsStore`.
      name: run folder name, unique within the store.
      identity: dict of the settings that define this run (experiment, seed,
        epochs, T, alpha, data fingerprint, ...); a finished run with another
        identity is an error.
      config: the full configuration, saved with the record.
      build: `() -> keras.Model`, a fresh (untrained) model.
      data: `() -> training input`, called only when the run must train, and
        before the seed is set, so work it triggers (e.g. training the teacher
        whose logits it needs) cannot shift this run's random stream. It returns
        per-example arrays; `train` turns them into a dataset after the seed is
        set, so shuffles and views depend on the run's seed alone.
      train: `(model, training input) -> history`, the per-epoch list from
        `kdtoolkit.training.fit` (or the concatenation of several phases).
      evaluate: `(model) -> dict` of metrics (at least `test_accuracy`).
      log: optional `callable(str)` for progress.
      about: optional dict saved with the record as it is (e.g. `"data"`: where the
        data came from), not part of the identity.

    Returns:
      `(record, model)`: the saved record and the trained model (weights loaded
      from disk when the run was already finished).

    Several processes may share `store`: the run is trained under its lock
    (`kdtoolkit.runner.locks.hold`), so a second process waits for it and then loads it.

    Raises:
      TrainingDiverged: the loss became non-finite; nothing is saved as finished.
    """
    say = log or (lambda _msg: None)
    record = store.finished(name, identity)
    if record is None:
        with locks.hold(store.root, name, say):
            record = store.finished(name, identity)  # another process may have finished it meanwhile
            if record is None:
                return _train(store, name, identity, config, build, data, train, evaluate, say, about)
    say(f"[{name}] finished earlier, skipping (results in {store.run_dir(name)})")
    model = None
    weights = store.weights_path(name)
    if weights.exists():
        set_seed(identity.get("seed", 0))
        model = build()
        model.load_weights(weights)
    return record, model


def _train(store, name, identity, config, build, data, train, evaluate, say, about):
    """`run`'s training of an unfinished run (under its lock)."""
    train_input = data()
    set_seed(identity.get("seed", 0))
    model = build()
    say(f"[{name}] training: {_describe(identity)}")
    device.reset_peak_memory()
    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    try:
        history = train(model, train_input)
    except TrainingDiverged as err:
        raise TrainingDiverged(f"[{name}] {err}; nothing was recorded for this run") from None
    train_seconds = time.perf_counter() - start
    metrics = evaluate(model)
    record = finish(store, name, identity=identity, config=config, model=model, history=history, metrics=metrics,
                    started=started, train_seconds=train_seconds, wall_seconds=time.perf_counter() - start,
                    about=about)
    say(f"[{name}] done in {record['wall_seconds']:.1f}s: {_summary(metrics)}")
    return record, model


def finish(store, name, *, identity, config, model, history, metrics, started, train_seconds, wall_seconds,
           about=None):
    """Records trained run `name`: its weights, then its record (`metrics.json`, written
    last, so a run with a record is finished); returns the record.

    `train_seconds` and `wall_seconds` (training plus final evaluation) are this
    invocation's; the seconds of epochs carried over from an interrupted one
    (`"resumed"` in `history`) are added to both.
    """
    store.run_dir(name).mkdir(parents=True, exist_ok=True)
    save_weights(model, store.weights_path(name))
    earlier = sum(h["seconds"] + h.get("eval_seconds", 0.0) for h in history if h.get("resumed"))
    peak_gpu = device.peak_memory_mib()
    record = {
        "run": name,
        "experiment": identity.get("experiment"),
        "seed": identity.get("seed", 0),
        **metrics,
        **model_size(model),
        "wall_seconds": wall_seconds + earlier,
        "train_seconds": train_seconds + earlier,
        "resumed_seconds": earlier,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **({"peak_gpu_mib": round(peak_gpu, 1)} if peak_gpu is not None else {}),
        "started_at": started.isoformat(timespec="seconds"),
        "identity": identity,
        "identity_hash": identity_hash(identity),
        "config": config,
        **(about or {}),
        "environment": environment(),
        "history": history,
    }
    store.save(name, record)
    return record


def _summary(metrics):
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _describe(identity):
    return " ".join(f"{k}={v}" for k, v in identity.items())
