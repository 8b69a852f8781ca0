"""`kdtoolkit.distiller.Distiller` behaves as a `keras.Model` behaves: saving and
loading, Keras' checkpoint callbacks, a resumed run after `kill -9`,
`tf.distribute`, and what Keras' `fit` takes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit.distiller import Distiller, MethodLoss
from kdtoolkit.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 6, 6, 1)).astype("float32"), (np.arange(n) % 3).astype("int32")


def models(seed=0):
    keras.utils.set_random_seed(seed)
    teacher = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(12, activation="relu"),
                                keras.layers.Dense(3)])
    student = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.2),
                                keras.layers.Dense(3)])
    return teacher, student


def fitted(method="kd", epochs=1, **options):
    x, y = data()
    teacher, student = models()
    distiller = Distiller(teacher, student, method, seed=1, **options)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    distiller.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    return distiller


def run_python(script, *args, cwd=ROOT, pythonpath=str(ROOT)):
    env = {**os.environ, "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *([script] if script.endswith(".py") else ["-c", script]), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# -- saving and loading -----------------------------------------------------------------------------

@pytest.mark.parametrize("method, options", [("kd", {"temperature": 3.0}), ("crd", {"negatives": 16, "dim": 8}),
                                             ("fitnets", {})])
@pytest.mark.slow
def test_save_and_load_model_keep_the_method_and_its_state(tmp_path, method, options):
    distiller = fitted(method, **options)
    distiller.save(tmp_path / "d.keras")
    loaded = keras.models.load_model(tmp_path / "d.keras")
    assert isinstance(loaded, Distiller) and loaded.method_name == method and loaded.options == distiller.options
    x, y = data()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), distiller.predict(x, verbose=0))
    assert len(loaded.weights) == len(distiller.weights)
    for a, b in zip(distiller.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    loaded.fit(x, y, epochs=1, batch_size=16, verbose=0)  # trains on, with its optimizer's state


@pytest.mark.slow
def test_get_config_round_trips():
    distiller = fitted("dkd", nckd_weight=4.0)
    config = distiller.get_config()
    json.dumps(keras.saving.serialize_keras_object(distiller))  # all of it serializable
    again = Distiller.from_config(config)
    assert again.get_config()["options"] == config["options"] and again.seed == distiller.seed


@pytest.mark.slow
def test_model_checkpoint_whole_model_and_weights_only(tmp_path):
    x, y = data()
    teacher, student = models()
    distiller = Distiller(teacher, student, "kd", seed=1)
    distiller.compile(optimizer="adam")
    distiller.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(tmp_path / "best.keras"),
        keras.callbacks.ModelCheckpoint(tmp_path / "last.weights.h5", save_weights_only=True)])
    whole = keras.models.load_model(tmp_path / "best.keras")
    np.testing.assert_array_equal(whole.predict(x, verbose=0), distiller.predict(x, verbose=0))
    teacher2, student2 = models(seed=5)
    other = Distiller(teacher2, student2, "kd", seed=1)
    other.compile(optimizer="adam")
    other.fit(x, y, epochs=1, batch_size=32, verbose=0)
    other.load_weights(tmp_path / "last.weights.h5")
    np.testing.assert_array_equal(other.predict(x, verbose=0), distiller.predict(x, verbose=0))


@pytest.mark.slow
def test_predict_and_call_before_fit_are_harmless():
    x, y = data()
    teacher, student = models()
    distiller = Distiller(teacher, student, "crd", negatives=16, dim=8)
    distiller.compile(optimizer="adam")
    assert distiller.predict(x[:4], verbose=0).shape == (4, 3)
    assert distiller(x[:2]).shape == (2, 3)
    history = distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and distiller.built


@pytest.mark.slow
@pytest.mark.parametrize("method", ["crd", "cid"])  # state per example and per class; dropout in the student
def test_backup_and_restore_after_kill_9_ends_bit_for_bit(tmp_path, method):
    """Killed with SIGKILL in the middle of epoch 3 of 4 and run again, the run ends
    with every variable (student, method state, optimizer) equal to an uninterrupted
    run's: the example order and the random streams (dropout, CRD's negatives) are
    functions of the seed and the epoch."""
    script = str(ROOT / "tests" / "resumed_fit.py")
    whole = run_python(script, method, str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_python(script, method, str(tmp_path / "resumed"), "2")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    resumed = run_python(script, method, str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = json.loads(whole.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert got == expected, [name for name in expected if expected[name] != got.get(name)]


# -- tf.distribute ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dkd", "extractive"])  # (FitNets' regressor has a per-replica BatchNorm)
def test_mirrored_strategy_on_two_cpus_trains_as_one_device(method):
    done = run_python(str(ROOT / "tests" / "distributed_distiller.py"), method)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["max_weight_difference"] < 1e-5
    np.testing.assert_allclose(result["loss_mirrored"], result["loss_single"], rtol=1e-5)
    assert result["accuracy_mirrored"] == result["accuracy_single"]


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_two_processes_train_as_one_device():
    """Two worker processes on 127.0.0.1 (`TF_CONFIG`) end with the one-device weights.
    Plain Keras 3.15 `fit` fails under this strategy (it reduces a distributed batch
    and scalar logs along axis 0); `Distiller` builds before Keras' `fit` and logs
    `(1,)` tensors there."""
    import socket

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    script = str(ROOT / "tests" / "multiworker_distiller.py")
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    processes = [subprocess.Popen([sys.executable, script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**env, "TF_CONFIG": json.dumps({
                                      "cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})})
                 for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-1500:] for _, err in outputs]
    alone = run_python(script)
    assert alone.returncode == 0, alone.stderr[-2000:]
    expected = json.loads(alone.stdout.splitlines()[-1])
    for out, _ in outputs:
        result = json.loads(out.splitlines()[-1])
        assert result["replicas"] == 2
        np.testing.assert_allclose(result["loss"], expected["loss"], rtol=1e-5)
        for got, want in zip(result["weights"], expected["weights"]):
            np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method, why", [("crd", "memory banks"), ("rkd", "relate every pair and triple of the batch")])
def test_a_method_that_cannot_be_split_across_replicas_is_one_line(method, why):
    done = run_python(str(ROOT / "tests" / "distributed_distiller.py"), method)
    assert done.returncode == 0, done.stderr[-2000:]
    refused = json.loads(done.stdout.strip().splitlines()[-1])["refused"]
    assert f"{method} cannot be split across replicas" in refused and why in refused and "\n" not in refused


# -- what fit takes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_validation_split_one_hot_labels_and_tensorboard(tmp_path):
    x, y = data()
    teacher, student = models()
    distiller = Distiller(teacher, student, "kd", seed=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    history = distiller.fit(x, np.eye(3)[y], epochs=1, batch_size=16, validation_split=0.25, verbose=0,
                            callbacks=[keras.callbacks.TensorBoard(tmp_path / "logs")])
    assert {"val_loss", "val_accuracy", "kd", "ce"} <= set(history.history)
    assert len(distiller.labels) == 72  # the last quarter held out, as Keras does
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_a_py_dataset_and_a_streamed_dataset(tmp_path):
    x, y = data()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]

    teacher, student = models()
    distiller = Distiller(teacher, student, "kd", seed=1, cache_dir=tmp_path)
    distiller.compile(optimizer="adam")
    assert np.isfinite(distiller.fit(Batches(), epochs=2, verbose=0).history["loss"]).all()
    assert any(tmp_path.rglob("*.snapshot")) or any(tmp_path.rglob("snapshot.metadata"))  # cached on disk


def counting_dataset(x, y, reads):
    """`(x, y)` batches of 16 from a generator that counts the examples it yields."""
    def examples():
        for i in range(len(y)):
            reads.append(i)
            yield x[i], y[i]

    spec = (tf.TensorSpec(x.shape[1:], tf.float32), tf.TensorSpec((), tf.int32))
    return tf.data.Dataset.from_generator(examples, output_signature=spec).batch(16)


@pytest.mark.slow
def test_a_dataset_is_read_once_with_the_cache_and_each_epoch_without():
    x, y = data()
    for cache, expected in ((True, len(y)), (False, 3 * len(y))):  # (+ batches read ahead for shapes)
        reads = []
        teacher, student = models()
        distiller = Distiller(teacher, student, "kd", seed=1, cache_teacher=cache)
        distiller.compile(optimizer="adam")
        history = distiller.fit(counting_dataset(x, y, reads), epochs=3, verbose=0)
        assert len(history.history["loss"]) == 3
        assert expected <= len(reads) <= expected + 64, (cache, len(reads))


@pytest.mark.slow
@pytest.mark.parametrize("bad, match", [
    (lambda y: np.where(np.arange(len(y)) == 40, 7, y), r"batch 2 of the dataset: 1 labels outside 0..2"),
    (lambda y: np.full((len(y), 3), 1 / 3, "float32"), r"batch 0 of the dataset: .*soft labels"),
])
def test_a_dataset_with_bad_labels_stops_before_training(bad, match):
    """Streamed labels are checked as arrays are: with the teacher cached, the pass
    before training names the first bad batch in one line; without it, the pipeline
    stops at that batch with a message saying what is wrong."""
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, bad(y))).batch(16)
    teacher, student = models()
    distiller = Distiller(teacher, student, "kd", seed=1)
    distiller.compile(optimizer="adam")
    before = student.get_weights()
    with pytest.raises(DataError, match=match):
        distiller.fit(dataset, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, student.get_weights()))  # not one step taken
    streamed = Distiller(*models(), "kd", seed=1, cache_teacher=False)
    streamed.compile(optimizer="adam")
    with pytest.raises(tf.errors.InvalidArgumentError, match="class indices 0..2|not soft labels"):
        streamed.fit(dataset, epochs=1, verbose=0)


def test_epochs_see_the_examples_in_new_orders_from_the_seed():
    from kdtoolkit import fit_data

    epoch = tf.Variable(0, dtype=tf.int64)
    arrays = {"y": np.arange(20, dtype=np.int32)}
    batches = fit_data.array_batches(arrays, 20, epoch, seed=4)
    first = next(iter(batches))["y"].numpy()
    epoch.assign(1)
    second = next(iter(batches))["y"].numpy()
    epoch.assign(0)
    again = next(iter(batches))["y"].numpy()
    assert sorted(first) == list(range(20)) and not np.array_equal(first, second)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("call, match", [
    (lambda d, x, y: d.fit(x, y, sample_weight=np.ones(len(y))), "no sample_weight or class_weight"),
    (lambda d, x, y: d.fit(x, y, class_weight={0: 1.0, 1: 2.0, 2: 1.0}), "no sample_weight or class_weight"),
    (lambda d, x, y: d.fit(tf.data.Dataset.from_tensor_slices((x, y))), "batch it first"),
    (lambda d, x, y: d.fit(x, np.full((len(y), 3), 1 / 3)), "not one-hot"),
    (lambda d, x, y: d.fit(x, y + 5), "labels outside 0..2"),
    (lambda d, x, y: d.fit(x, y[:10]), "one label per example"),
    (lambda d, x, y: d.fit(np.where(x > 0.99, np.nan, x), y), "values are NaN or infinite"),
    (lambda d, x, y: Distiller(d.teacher, d.given_student, "kd", temperature=1e9), "temperature 1e\\+09 is above"),
    (lambda d, x, y: d.compile("adam", loss="mse"), "takes no loss"),
    (lambda d, x, y: d.fit(tf.data.Dataset.from_tensor_slices((x, y, y)).batch(8)), "no sample weights"),
])
def test_what_fit_cannot_take_is_one_line(call, match):
    x, y = data()
    teacher, student = models()
    distiller = Distiller(teacher, student, "kd")
    distiller.compile(optimizer="adam")
    with pytest.raises((ConfigError, DataError), match=match) as error:
        call(distiller, x, y)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_stateful_method_refuses_other_data():
    distiller = fitted("crd", negatives=16, dim=8)
    x, y = data()
    distiller.fit(x, y, epochs=1, batch_size=16, verbose=0)  # the same data: trains on
    with pytest.raises(ConfigError, match="keeps state per training example, built for another training set of 96"):
        distiller.fit(x[:48], y[:48], epochs=1, verbose=0)


def test_method_loss_takes_only_what_its_term_uses_and_names_python_arguments():
    with pytest.raises(ConfigError, match="takes temperature, not alpha; KD's alpha is .*student_loss_weight"):
        MethodLoss("kd", alpha=0.3)
    with pytest.raises(ConfigError, match="^temperature must be a number > 0"):
        MethodLoss("kd", temperature=-1)
    with pytest.raises(ConfigError, match="^temperature must be a number > 0"):
        Distiller(*models(), "kd", temperature=0)
    loss = MethodLoss("rkd", distance_weight=5.0, teacher_layer_name="dense")
    again = MethodLoss.from_config(loss.get_config())
    assert again.options == loss.options and again.teacher_layer_name == "dense"


@pytest.mark.slow
def test_keras_distiller_holding_a_method_loss_saves_and_loads(tmp_path):
    x, y = data()
    teacher, student = models()
    keras_distiller = keras.distillation.Distiller(teacher, student, [MethodLoss("kd", temperature=3.0)],
                                                   student_loss_weight=0.5)
    keras_distiller.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras_distiller.fit(x, y, epochs=1, verbose=0)
    keras_distiller.save(tmp_path / "k.keras")
    loaded = keras.models.load_model(tmp_path / "k.keras")
    assert loaded.distillation_losses[0].options.temperature == 3.0
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), keras_distiller.predict(x, verbose=0))


# -- models nobody here wrote -----------------------------------------------------------------------

class Subclassed(keras.Model):
    """A subclassed model in the style of Keras' own distillation tests; with
    `features`, its call returns `{"logits", "embedding"}`."""

    def __init__(self, width, features=False, **kwargs):
        super().__init__(**kwargs)
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(width, activation="relu")
        self.out = keras.layers.Dense(3)
        self.features = features

    def call(self, x, training=False):
        embedding = self.hidden(self.flatten(x))
        logits = self.out(embedding)
        return {"logits": logits, "embedding": embedding} if self.features else logits


@pytest.mark.slow
def test_subclassed_teacher_and_student_for_logits_and_through_a_dict_for_features():
    x, y = data()
    keras.utils.set_random_seed(0)
    distiller = Distiller(Subclassed(12), Subclassed(8), "dkd", seed=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0] and distiller.num_classes == 3

    teacher, student = Subclassed(12, features=True), Subclassed(8)
    with pytest.raises(ConfigError, match="subclassed model.*return a dict"):
        Distiller(teacher, student, "rkd").fit(x, y, epochs=1, verbose=0)
    body = Subclassed(8)
    student_features = lambda x, training=False: {"logits": body(x, training=training),  # noqa: E731
                                                  "embedding": body.hidden(body.flatten(x))}
    distiller = Distiller(teacher, body, "rkd", student_features=student_features, seed=1)
    distiller.compile(optimizer="adam")
    terms = distiller.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert terms["distance"][0] > 0 and terms["angle"][0] > 0
    with pytest.raises(NotImplementedError, match="feature callables cannot be serialized"):
        distiller.get_config()


def test_a_softmax_teacher_is_read_through_its_logits_and_a_softmax_student_refused():
    x, y = data()
    teacher, student = models()
    probabilities = keras.Sequential([keras.Input((6, 6, 1)), *teacher.layers[:-1],
                                      keras.layers.Dense(3, activation="softmax")])
    probabilities.layers[-1].set_weights(teacher.layers[-1].get_weights())
    with pytest.warns(UserWarning, match="recomputed the logits"):
        distiller = Distiller(probabilities, student, "kd")
    np.testing.assert_allclose(distiller.teacher_targets(x)["logits"], teacher(x), rtol=1e-5, atol=1e-6)
    soft_student = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3),
                                     keras.layers.Softmax()])
    with pytest.raises(ConfigError, match="a trained student must return logits"):
        Distiller(teacher, soft_student, "kd")
