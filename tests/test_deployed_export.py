"""Every distilled student saves as `.keras` and loads, and predicts the same, in a
fresh Python process where this toolkit cannot be imported (only Keras and NumPy):
CID's student through `kdtoolkit.deployed.plain_keras`, every other method's as
it is."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from kdtoolkit import deployed
from kdtoolkit.distiller import Distiller
from kdtoolkit.methods import REGISTRY, cid

CLASSES = 3
OPTIONS = {"crd": {"negatives": 32, "dim": 8}}  # CRD's memory bank: fewer negatives than examples
EPOCHS = {"cid": 2}  # CID's head g trains (and its `active` turns 1) from the epoch after `init_epochs`

# Run in the fresh process: loads each `<name>.keras` and writes its predictions on x.npy.
LOADER = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    # A process where the toolkit is not installed: drop the editable install's finder (requirements.txt's `-e .`).
    sys.meta_path = [finder for finder in sys.meta_path if "editable" not in getattr(finder, "__module__", "")]
    try:
        import kdtoolkit
    except ImportError:
        pass
    else:
        sys.exit(f"the toolkit is importable here: {kdtoolkit.__file__}")
    x = np.load("x.npy")
    names = json.loads(sys.argv[1])
    predictions = {name: keras.models.load_model(f"{name}.keras").predict(x, verbose=0) for name in names}
    np.savez("predictions.npz", **predictions)
    try:
        keras.models.load_model("with_head.keras")
    except Exception as err:
        print("with_head:", type(err).__name__, err)
""")


def cid_student(active, seed=0):
    """A `with_head` CID student with a random dictionary and head g, `active` 0 or 1."""
    keras.utils.set_random_seed(seed)
    student = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(3, 3, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(8, activation="relu", name="hidden"),
                                keras.layers.Dense(CLASSES)], name="student")
    head = cid.CID.prediction_head(cid.CIDOptions(temperature=3.0), CLASSES)
    features = lambda s: keras.Model(s.inputs, {"logits": s.outputs[0], "embedding": s.layers[-1].input})  # noqa: E731
    model = deployed.with_head(student, head, features)
    rng = np.random.default_rng(seed)
    for variable in (head.dictionary, head.head.kernel, head.head.bias):
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    head.active.assign(float(active))
    return model


def inputs(n=64, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 12, 12, 1)).astype("float32"), rng.integers(0, CLASSES, n).astype("int32")


def builtin_only(model):
    """Whether every layer of `model`, nested models' included, is one of Keras' own."""
    return all(type(layer).__module__.startswith("keras.") and (not isinstance(layer, keras.Model)
                                                                or builtin_only(layer)) for layer in model.layers)


@pytest.mark.parametrize("active", [0, 1])
def test_cid_student_in_builtin_layers_predicts_as_the_intervention(active):
    model = cid_student(active)
    x, _ = inputs(16)
    builtin = deployed.plain_keras(model)
    assert builtin_only(builtin) and not builtin_only(model)
    assert builtin.name == model.name and deployed.student_features(builtin) is deployed.student_features(model)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(builtin.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    assert builtin.output.dtype == "float32"
    names = [type(layer).__name__ for layer in builtin.layers]
    if active:
        assert names == ["InputLayer", "Functional", "Rescaling", "Softmax", "Dense", "Concatenate", "Dense"]
    else:
        assert names == ["InputLayer", "Functional"]  # the feature model's logits
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert deployed.plain_keras(plain) is plain


def train(method, x, y):
    """`Distiller(teacher, student, method)` trained for one epoch of two steps (CID: two)."""
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(16, activation="relu", name="penultimate"),
                                keras.layers.Dense(CLASSES)])
    student = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(3, 3, activation="relu"),
                                keras.layers.Flatten(), keras.layers.Dense(8, activation="relu", name="hidden"),
                                keras.layers.Dense(CLASSES)], name=f"{method}_student")
    distiller = Distiller(teacher, student, method, teacher_features={"embedding": "penultimate"},
                          **OPTIONS.get(method, {}))
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    distiller.fit(x, y, epochs=EPOCHS.get(method, 1), batch_size=32, verbose=0)
    return distiller


@pytest.mark.slow
def test_every_methods_student_loads_and_predicts_without_the_toolkit(tmp_path):
    x, y = inputs()
    np.save(tmp_path / "x.npy", x)
    expected = {}
    for method, cls in REGISTRY.items():
        if cls.teacher_objective is not None:  # SFTN trains its own teacher: Distiller refuses it
            continue
        student = train(method, x, y).student
        exported = deployed.plain_keras(student)
        assert (exported is student) == (method != "cid")
        exported.save(tmp_path / f"{method}.keras")
        expected[method] = student.predict(x, verbose=0)
        if method == "cid":
            assert float(student.get_layer("cid_intervention").active.numpy()) == 1.0
            student.save(tmp_path / "with_head.keras")  # the toolkit's own layer: needs the toolkit to load
    assert "sftn" in REGISTRY and "sftn" not in expected  # skipped: it trains its own teacher first
    for active in (0, 1):
        model = cid_student(active)
        deployed.plain_keras(model).save(tmp_path / f"cid_random_active{active}.keras")
        expected[f"cid_random_active{active}"] = model.predict(x, verbose=0)

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(sorted(expected))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "with_head: " in done.stdout and "Intervention" in done.stdout  # that process has no toolkit
    with np.load(tmp_path / "predictions.npz") as loaded:
        assert sorted(loaded.files) == sorted(expected)
        for name, logits in expected.items():
            np.testing.assert_allclose(loaded[name], logits, rtol=1e-6, atol=1e-6, err_msg=name)
