"""The library entry point: `kdtoolkit.distiller.Distiller` on a user's own models,
and the methods as `keras.distillation` losses."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.distiller import Distiller, MethodLoss
from kdtoolkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class Counter(keras.layers.Layer):
    """Identity layer counting the batches it sees (in a variable, so compiled calls count too)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="calls")

    def call(self, x):
        self.calls.assign_add(1.0)
        return x


def data(n=256, seed=0):
    """Noise with a bright square in the top (class 0) or bottom (class 1) half."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype("int32")
    x = 0.3 * rng.uniform(size=(n, 12, 12, 1)).astype("float32")
    for i, label in enumerate(y):
        row, col = 1 + 6 * label + rng.integers(0, 2), rng.integers(0, 8)
        x[i, row:row + 4, col:col + 4] = 1.0
    return x, y


def models(seed=0):
    keras.utils.set_random_seed(seed)
    counter = Counter(name="counter")
    teacher = keras.Sequential([keras.Input((12, 12, 1)), counter, keras.layers.Conv2D(4, 3, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(16, activation="relu", name="penultimate"),
                                keras.layers.Dense(2)])
    student = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(24, activation="relu", name="hidden"), keras.layers.Dense(2)])
    teacher.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(*data(), epochs=5, verbose=0)
    counter.calls.assign(0.0)
    return teacher, student, counter


@pytest.mark.slow
def test_the_readme_python_example_runs(capsys):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python", readme.index("## Your own models, from Python")) + len("```python")
    exec(compile(readme[start:readme.index("```", start)], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert all(f"{m} {{'accuracy'" in printed for m in ("kd", "dkd", "rkd"))


@pytest.mark.parametrize("method, options", [("kd", {"temperature": 2.0, "alpha": 0.3}), ("dkd", {}),
                                             ("fitnets", {}), ("rkd", {}), ("crd", {"negatives": 32, "dim": 8})])
@pytest.mark.slow
def test_fit_trains_the_student_with_cached_teacher_outputs(method, options):
    x, y = data()
    teacher, student, counter = models()
    before = [w.numpy().copy() for w in student.weights]
    distiller = Distiller(teacher, student, method, **options)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    history = distiller.fit(x, y, epochs=3, batch_size=32, verbose=0,
                            callbacks=[keras.callbacks.EarlyStopping(monitor="loss", patience=5)])
    cached_calls = float(counter.calls.numpy())
    assert cached_calls <= 2  # the caching pass (one chunk of 256) and a shape probe: none per step
    assert set(distiller.method.term_names) | {"loss", "accuracy"} <= set(history.history)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(before, student.weights))
    assert distiller.evaluate(x, y, verbose=0, return_dict=True)["accuracy"] > 0.5
    np.testing.assert_allclose(distiller.predict(x[:5], verbose=0), student(x[:5]).numpy(), rtol=1e-6)


@pytest.mark.slow
def test_a_plain_dataset_and_the_teacher_per_step():
    x, y = data()
    teacher, student, counter = models()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    distiller = Distiller(teacher, student, "kd", cache_teacher=False)
    distiller.compile(optimizer="adam")
    distiller.fit(dataset, epochs=2, verbose=0)
    assert float(counter.calls.numpy()) >= 2 * 256 / 64  # now it runs on every batch (the dataset's own batches)


@pytest.mark.slow
def test_the_training_step_minimises_the_methods_terms():
    """One step's logged terms are the method's `loss_terms` on the same batch."""
    x, y = data(32)
    teacher, student, _ = models()
    distiller = Distiller(teacher, student, "kd", temperature=3.0, alpha=0.25)
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))  # no update: the logged terms are those of the weights
    logs = distiller.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0).history
    t, s = teacher(x).numpy(), student(x).numpy()
    ce = float(losses.teacher_loss(y, s))
    kd = float(losses.distillation_loss(t, s, 3.0))
    np.testing.assert_allclose(logs["ce"][0], 0.25 * ce, rtol=1e-5)
    np.testing.assert_allclose(logs["kd"][0], 0.75 * kd, rtol=1e-5)


def test_method_loss_in_keras_distiller_equals_the_toolkits_step():
    x, y = data(64)
    teacher, student, _ = models()
    keras_distiller = keras.distillation.Distiller(teacher, student, [MethodLoss("kd", temperature=4.0)],
                                                   student_loss_weight=0.5)
    keras_distiller.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    theirs = float(keras_distiller.compute_loss(x=x, y=y, y_pred=student(x), training=False))
    ours = Distiller(teacher, student, "kd", temperature=4.0, alpha=0.5)
    ours.build_method(y)
    terms, _ = ours.method.loss_terms({"x": x, "y": y, "index": np.arange(64), "teacher_logits": teacher(x)},
                                      training=False)
    np.testing.assert_allclose(theirs, float(sum(terms.values())), rtol=1e-5)


def test_method_loss_rkd_on_named_layers():
    x, _ = data(16)
    teacher, student, _ = models()
    loss = MethodLoss("rkd", teacher_layer_name="penultimate", student_layer_name="hidden")
    keras_distiller = keras.distillation.Distiller(teacher, student, [loss], student_loss_weight=0.0)
    keras_distiller.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    value = float(keras_distiller.compute_loss(x=x, y=np.zeros(16, "int32"), y_pred=student(x)))
    features = keras.Model(teacher.inputs, teacher.get_layer("penultimate").output)(x)
    hidden = keras.Model(student.inputs, student.get_layer("hidden").output)(x)
    from kdtoolkit.methods import rkd

    distance, angle = rkd.rkd_losses(features, hidden)
    np.testing.assert_allclose(value, 25 * float(distance) + 50 * float(angle), rtol=1e-5)


def test_bad_input_is_one_clear_error():
    teacher, student, _ = models()
    with pytest.raises(ConfigError, match="kd has no option tau; it takes alpha, standardize, temperature"):
        Distiller(teacher, student, "kd", tau=1)
    with pytest.raises(ValueError, match="unknown method 'kdd'"):
        Distiller(teacher, student, "kdd")
    with pytest.raises(ConfigError, match="has no layer 'nope'"):
        Distiller(teacher, student, "rkd", teacher_features={"embedding": "nope"})
    with pytest.raises(ConfigError, match=r"has no layer with a \(batch, H, W, C\) output with H, W > 1"):
        Distiller(teacher, student, "at")
    with pytest.raises(ConfigError, match="needs labels"):
        MethodLoss("dkd")
    with pytest.raises(ConfigError, match="one label per example"):
        Distiller(teacher, student).fit(*data(8)[:1], np.zeros(3))


@pytest.mark.slow
def test_the_package_installs_and_imports_from_any_folder(tmp_path):
    """`pip install .` builds the library (pyproject.toml) and it imports elsewhere."""
    import shutil
    import subprocess
    import sys

    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "results", "build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                            "--target", str(target), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    assert (target / "kdtoolkit" / "methods" / "crd.py").exists()
    assert not {"common", "task1_mnist", "task2_mhist", "reports"} & {path.name for path in target.iterdir()}
    probe = subprocess.run([sys.executable, "-c", "import kdtoolkit.distiller, kdtoolkit.methods; "
                            "print(kdtoolkit.__file__, sorted(kdtoolkit.methods.REGISTRY))"], cwd=tmp_path,
                           env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.startswith(str(target / "kdtoolkit")) and "'crd'" in probe.stdout
