"""Keras' own `keras.distillation` tests, rewritten for this toolkit.

Source: keras-team/keras, `keras/src/distillation/distiller_test.py` (class
`TestDistiller`, commit b4f00e7e) and `keras/src/distillation/distillation_loss_test.py`
(classes `TestLogitsDistillation`, `TestFeatureDistillation`,
`TestEndToEndDistillation`), the versions whose API (`distillation_losses=`,
`LogitsDistillation`, `FeatureDistillation`) is the installed Keras 3.15's. The
older `strategies_test.py` (the `strategy=` API) is not adapted: that API is gone.
Each Keras test becomes plain pytest functions in two groups:

1. `keras.distillation.Distiller` holding `kdtoolkit.method_loss.MethodLoss` where
   Keras' tests hold `LogitsDistillation` (logits: "kd") or
   `FeatureDistillation` (named layers: "rkd" on Dense outputs, "at" on Conv2D
   maps). Names start with `test_keras_distiller_` / `test_method_loss_`.
2. The toolkit's `kdtoolkit.distiller.Distiller` in place of Keras' Distiller: the
   same scenarios in its API (one method per distiller, KD's `alpha` in place of
   `student_loss_weight`, `compile` without a loss, `ConfigError` for bad input).
   Names start with `test_distiller_`.

Beyond Keras' assertions (outputs exist and are finite) several tests check
values: a loss equals its weighted terms, a zero weight gives a zero term, a
reloaded model predicts what the saved one did, the frozen teacher's weights do
not move.

Deliberately left out:
- Backend switches (`requires_trainable_backend`, JAX tracer notes): this
  toolkit runs on TensorFlow only.
- Keras' `FeatureDistillation(loss=...)` nesting (a loss structure per output)
  and `LogitsDistillation(loss="kl_divergence")`: `MethodLoss` computes one
  method's term and has no `loss` argument.
- Keras' private feature extractors for group 2 (`_teacher_feature_extractor`):
  the toolkit's Distiller reads features through `kdtoolkit.features`; its public
  `teacher_reads` / `student_reads` are checked instead.
- Several losses with weights for group 2: a toolkit Distiller runs one method,
  whose terms are weighted by the method's own options.
- Epochs and sizes are cut (1-3 epochs, 20-100 examples) to keep the module
  within about a minute on two CPU cores.
"""

import json

import keras
import numpy as np
import pytest

from kdtoolkit import losses
from kdtoolkit.distiller import Distiller, MethodLoss
from kdtoolkit.errors import ConfigError
from kdtoolkit.methods import rkd as rkd_method

CLASSES = 10


# -- models and data ----------------------------------------------------------------------------------

class TwoDense(keras.Model):
    """A subclassed two-layer classifier (Keras' `SimpleTeacher` / `SimpleStudent`
    shape); with `features=True` its call returns `{"logits", "embedding"}`."""

    def __init__(self, hidden_dim, vocab_size=CLASSES, features=False, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(hidden_dim, activation="relu")
        self.head = keras.layers.Dense(vocab_size)
        self.features = features

    def call(self, inputs, training=None):
        embedding = self.hidden(inputs)
        logits = self.head(embedding)
        return {"logits": logits, "embedding": embedding} if self.features else logits


def simple_teacher(features=False):
    return TwoDense(32, features=features, name="simple_teacher")


def simple_student(features=False):
    return TwoDense(16, features=features, name="simple_student")


def built(model, x):
    """`model` called once on two examples of `x` (how Keras' tests build theirs)."""
    model(x[:2])
    return model


def dense_sequential(prefix, widths):
    """A Sequential of named Dense layers, no `Input`: built by its first call."""
    hidden = [keras.layers.Dense(w, activation="relu", name=f"{prefix}_dense_{i}") for i, w in enumerate(widths, 1)]
    return keras.Sequential([*hidden, keras.layers.Dense(CLASSES, name=f"{prefix}_output")])


def conv_sequential(prefix, filters):
    """A small CNN whose `<prefix>_conv` layer gives a (batch, 6, 6, filters) map."""
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(filters, 3, activation="relu",
                                                                          name=f"{prefix}_conv"),
                             keras.layers.Flatten(), keras.layers.Dense(CLASSES, name=f"{prefix}_output")])


def arrays(n, features=5, seed=0, shape=None):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *(shape or (features,)))).astype("float32")
    return x, rng.integers(0, CLASSES, n).astype("int32")


def seeded(seed=0):
    keras.utils.set_random_seed(seed)


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def keras_distiller(teacher, student, distillation_losses, **kwargs):
    """Keras' Distiller, compiled as Keras' tests compile it (with logits, so from_logits)."""
    distiller = keras.distillation.Distiller(teacher, student, distillation_losses,
                                             **{"student_loss_weight": 0.5, **kwargs})
    distiller.compile(optimizer="adam", loss=sparse_ce(), metrics=["accuracy"])
    return distiller


def weights_of(model):
    return [np.array(w) for w in model.weights]


def changed(before, model):
    return any(not np.allclose(a, np.array(b), atol=1e-6) for a, b in zip(before, model.weights))


def assert_finite_history(history, names):
    for name in names:
        assert name in history, (name, sorted(history))
        assert len(history[name]) > 0 and np.isfinite(history[name]).all(), (name, history[name])


# == 1. keras.distillation.Distiller holding MethodLoss ==============================================

@pytest.fixture
def keras_setup():
    """Keras' `TestDistiller.setUp`: built subclassed models, one KD loss at T = 2."""
    seeded()
    x, y = arrays(20)
    teacher, student = built(simple_teacher(), x), built(simple_student(), x)
    loss = MethodLoss("kd", temperature=2.0)
    return {"x": x, "y": y, "teacher": teacher, "student": student, "loss": loss,
            "distiller": keras_distiller(teacher, student, loss)}


def test_keras_distiller_initialization(keras_setup):
    """<- TestDistiller.test_distiller_initialization"""
    distiller = keras_setup["distiller"]
    assert not keras_setup["teacher"].trainable and keras_setup["student"].trainable
    assert distiller.student_loss_weight == 0.5
    assert isinstance(distiller.distillation_losses, list) and len(distiller.distillation_losses) == 1
    held = distiller.distillation_losses[0]
    assert isinstance(held, MethodLoss) and isinstance(held, keras.distillation.DistillationLoss)
    assert held.method == "kd" and held.options.temperature == 2.0
    assert distiller.optimizer is not None and distiller.compiled


def test_keras_distiller_call_is_the_student(keras_setup):
    """<- TestDistiller.test_distiller_call"""
    x = keras_setup["x"]
    outputs = keras_setup["distiller"](x)
    assert tuple(outputs.shape) == (20, CLASSES)
    np.testing.assert_allclose(np.asarray(outputs), np.asarray(keras_setup["student"](x)), rtol=1e-6)
    assert not np.allclose(np.asarray(outputs), np.asarray(keras_setup["teacher"](x)))


def test_keras_distiller_freezes_a_new_teacher(keras_setup):
    """<- TestDistiller.test_teacher_freezing"""
    new_teacher = built(simple_teacher(), keras_setup["x"])
    assert new_teacher.trainable
    keras.distillation.Distiller(new_teacher, keras_setup["student"], keras_setup["loss"], student_loss_weight=0.5)
    assert not new_teacher.trainable and keras_setup["student"].trainable


def test_keras_distiller_refuses_objects_that_are_not_models(keras_setup):
    """<- TestDistiller.test_model_compatibility_validation"""
    with pytest.raises(ValueError, match="Teacher must be a keras.Model"):
        keras.distillation.Distiller("not_a_model", keras_setup["student"], keras_setup["loss"])
    with pytest.raises(ValueError, match="Student must be a keras.Model"):
        keras.distillation.Distiller(keras_setup["teacher"], "not_a_model", keras_setup["loss"])


@pytest.mark.slow
def test_keras_distiller_several_method_losses_with_weights(keras_setup):
    """<- TestDistiller.test_multi_distillation_loss_functionality; the combined
    loss is also checked against its terms computed by hand."""
    teacher, student = keras_setup["teacher"], keras_setup["student"]
    pair = [MethodLoss("kd", temperature=3.0), MethodLoss("kd", temperature=2.0)]
    distiller = keras_distiller(teacher, student, pair, distillation_loss_weights=[0.7, 0.3])
    assert len(distiller.distillation_losses) == 2 and distiller.distillation_loss_weights == [0.7, 0.3]

    x, y = arrays(10, seed=1)
    t, s = teacher(x), student(x)
    total = float(distiller.compute_loss(x=x, y=y, y_pred=s, training=False))
    ce = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, s, from_logits=True)))
    kd = 0.7 * float(losses.distillation_loss(t, s, 3.0)) + 0.3 * float(losses.distillation_loss(t, s, 2.0))
    np.testing.assert_allclose(total, 0.5 * ce + 0.5 * kd, rtol=1e-5)

    history = distiller.fit(x, y, epochs=1, verbose=0).history
    assert_finite_history(history, ["total_loss", "student_loss", "distillation_loss"])


def test_keras_distiller_needs_one_weight_per_loss(keras_setup):
    """<- TestDistiller.test_multi_distillation_loss_validation"""
    pair = [MethodLoss("kd", temperature=3.0), MethodLoss("kd", temperature=2.0)]
    distiller = keras.distillation.Distiller(keras_setup["teacher"], keras_setup["student"], pair,
                                             student_loss_weight=0.5)
    assert len(distiller.distillation_losses) == 2 and distiller.distillation_loss_weights == [1.0, 1.0]
    with pytest.raises(ValueError, match="must match"):
        keras.distillation.Distiller(keras_setup["teacher"], keras_setup["student"], pair,
                                     distillation_loss_weights=[1.0], student_loss_weight=0.5)


@pytest.mark.slow
def test_keras_distiller_student_loss_weight_zero_and_one(keras_setup):
    """<- TestDistiller.test_student_loss_weighting; at 0 the student's loss is
    not computed (logged 0), at 1 the distillation loss is not."""
    x, y = keras_setup["x"][:5], keras_setup["y"][:5]
    only_distillation = keras_distiller(keras_setup["teacher"], keras_setup["student"], keras_setup["loss"],
                                        student_loss_weight=0.0)
    only_student = keras_distiller(keras_setup["teacher"], keras_setup["student"], keras_setup["loss"],
                                   student_loss_weight=1.0)
    history_0 = only_distillation.fit(x, y, epochs=1, verbose=0).history
    history_1 = only_student.fit(x, y, epochs=1, verbose=0).history
    assert_finite_history(history_0, ["total_loss"])
    assert_finite_history(history_1, ["total_loss"])
    assert history_0["student_loss"] == [0.0] and history_0["distillation_loss"][0] > 0
    assert history_1["distillation_loss"] == [0.0] and history_1["student_loss"][0] > 0


@pytest.mark.slow
def test_keras_distiller_full_training_workflow():
    """<- TestDistiller.test_full_training_workflow (the teacher is also checked unchanged)"""
    seeded(42)
    x_train, y_train = arrays(100, seed=42)
    x_val, y_val = arrays(20, seed=43)
    teacher, student = built(simple_teacher(), x_train), built(simple_student(), x_train)
    teacher_before = weights_of(teacher)
    distiller = keras_distiller(teacher, student, MethodLoss("kd", temperature=2.0))
    history = distiller.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=3, batch_size=16,
                            verbose=0).history
    assert_finite_history(history, ["total_loss", "student_loss", "distillation_loss", "val_total_loss"])
    assert distiller.predict(x_val[:5], verbose=0).shape == (5, CLASSES)

    before = weights_of(student)
    distiller.fit(x_train[:10], y_train[:10], epochs=1, verbose=0)
    assert changed(before, student)
    assert not changed(teacher_before, teacher)


def test_keras_distiller_evaluate():
    """<- TestDistiller.test_evaluation_workflow"""
    seeded(42)
    x, y = arrays(30, seed=42)
    distiller = keras_distiller(built(simple_teacher(), x), built(simple_student(), x),
                                MethodLoss("kd", temperature=2.0))
    distiller.fit(x[:10], y[:10], epochs=1, verbose=0)
    results = distiller.evaluate(x, y, verbose=0)
    assert isinstance(results, list) and len(results) > 0 and np.isfinite(results).all()


def test_keras_distiller_predict_before_fit():
    """<- TestDistiller.test_prediction_workflow (not compiled, not trained)"""
    seeded(42)
    x, _ = arrays(20, seed=42)
    student = built(simple_student(), x)
    distiller = keras.distillation.Distiller(built(simple_teacher(), x), student, MethodLoss("kd", temperature=2.0),
                                             student_loss_weight=0.5)
    predictions = distiller.predict(x, verbose=0)
    assert predictions.shape == (20, CLASSES) and np.isfinite(predictions).all()
    np.testing.assert_allclose(predictions, np.asarray(student(x)), rtol=1e-5, atol=1e-6)


def test_keras_distiller_serialization_and_saving(tmp_path):
    """<- TestDistiller.test_distiller_serialization_and_saving"""
    seeded()
    teacher, student = dense_sequential("teacher", [32, 16]), dense_sequential("student", [16, 8])
    original = keras.distillation.Distiller(teacher, student, MethodLoss("kd", temperature=3.0),
                                            student_loss_weight=0.7)
    x, _ = arrays(2, features=20)
    original(x)

    config = original.get_config()
    for key in ("teacher", "student", "distillation_losses", "distillation_loss_weights", "student_loss_weight"):
        assert key in config, key
    assert isinstance(json.dumps(config), str)

    rebuilt = keras.distillation.Distiller.from_config(config)
    assert rebuilt.student_loss_weight == 0.7
    again = rebuilt.distillation_losses[0]
    assert isinstance(again, MethodLoss) and again.method == "kd" and again.options.temperature == 3.0
    assert tuple(rebuilt(x).shape) == (2, CLASSES)

    original.compile(loss=sparse_ce())
    path = tmp_path / "distiller_model.keras"
    original.save(path)
    loaded = keras.models.load_model(path)
    assert tuple(loaded(x).shape) == (2, CLASSES) and loaded.student_loss_weight == 0.7
    assert isinstance(loaded.distillation_losses[0], MethodLoss)
    assert loaded.distillation_losses[0].options.temperature == 3.0
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(original(x)), rtol=1e-6)


@pytest.mark.parametrize("method", ["kd", "at", "rkd"])
def test_method_loss_validate_outputs(method):
    """<- TestLogitsDistillation.test_logits_distillation_basic and
    TestFeatureDistillation.test_feature_distillation_basic: single tensors pass
    (of different widths or map sizes where the method relates them), a dict or a
    list is refused."""
    rng = np.random.default_rng(0)
    if method == "at":  # attention maps of 4 x 4 and 2 x 2 feature maps
        teacher, student = rng.random((2, 4, 4, 8)), rng.random((2, 2, 2, 3))
    elif method == "rkd":  # embeddings of widths 6 and 3
        teacher, student = rng.random((4, 6)), rng.random((4, 3))
    else:
        teacher, student = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), np.array([[2.0, 1.0, 4.0], [3.0, 6.0, 2.0]])
    teacher, student = (keras.ops.convert_to_tensor(a, dtype="float32") for a in (teacher, student))
    loss = MethodLoss(method)
    loss.validate_outputs(teacher, student)
    assert np.isfinite(float(loss.compute_loss(teacher, student)))
    with pytest.raises(ValueError, match="one student output tensor"):
        loss.validate_outputs(teacher, {"output": teacher})
    with pytest.raises(ValueError, match="one student output tensor"):
        loss.validate_outputs(teacher, [student, student])
    with pytest.raises(ValueError, match="one teacher output tensor"):
        loss.validate_outputs((teacher,), student)


@pytest.fixture
def end_to_end():
    """Keras' `TestEndToEndDistillation.setUp`: named Dense Sequentials built by a call."""
    seeded()
    x, y = arrays(32, features=20)
    teacher, student = dense_sequential("teacher", [32, 16]), dense_sequential("student", [32, 16])
    return {"x": x, "y": y, "teacher": built(teacher, x), "student": built(student, x)}


def test_keras_distiller_kd_end_to_end(end_to_end):
    """<- TestEndToEndDistillation.test_logits_distillation_end_to_end"""
    distiller = keras_distiller(end_to_end["teacher"], end_to_end["student"], MethodLoss("kd", temperature=3.0))
    history = distiller.fit(end_to_end["x"], end_to_end["y"], epochs=2, verbose=0).history
    assert_finite_history(history, ["total_loss", "student_loss", "distillation_loss"])
    assert history["total_loss"][-1] > 0
    assert distiller.predict(end_to_end["x"][:5], verbose=0).shape == (5, CLASSES)
    assert isinstance(distiller.student, keras.Model) and distiller.student is end_to_end["student"]


@pytest.mark.slow
def test_keras_distiller_rkd_on_named_layers_end_to_end(end_to_end):
    """<- TestEndToEndDistillation.test_feature_distillation_end_to_end, with RKD on
    the first Dense layers' outputs in place of an MSE FeatureDistillation."""
    loss = MethodLoss("rkd", teacher_layer_name="teacher_dense_1", student_layer_name="student_dense_1")
    distiller = keras_distiller(end_to_end["teacher"], end_to_end["student"], loss)
    history = distiller.fit(end_to_end["x"], end_to_end["y"], epochs=2, verbose=0).history
    assert_finite_history(history, ["total_loss", "student_loss", "distillation_loss"])
    assert history["distillation_loss"][0] > 0
    assert len(distiller._teacher_feature_extractor.outputs) == 2  # the final output and teacher_dense_1
    assert len(distiller._student_feature_extractor.outputs) == 2


@pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")  # Keras' extractor takes a list
@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")  # AT alone leaves the head untouched
def test_keras_distiller_at_on_named_conv_layers_end_to_end():
    """<- TestEndToEndDistillation.test_feature_distillation_end_to_end, with AT on
    Conv2D maps of different channel counts; the loss equals the toolkit's AT term."""
    seeded()
    x, y = arrays(32, shape=(8, 8, 1))
    teacher, student = conv_sequential("teacher", 8), conv_sequential("student", 4)
    loss = MethodLoss("at", weight=100.0, teacher_layer_name="teacher_conv", student_layer_name="student_conv")
    distiller = keras_distiller(teacher, student, loss, student_loss_weight=0.0)
    maps = [keras.Model(m.inputs[0], m.get_layer(f"{role}_conv").output)(x) for m, role in
            ((teacher, "teacher"), (student, "student"))]
    from kdtoolkit.methods import at as at_method

    np.testing.assert_allclose(float(distiller.compute_loss(x=x, y=y, y_pred=student(x), training=False)),
                               100.0 * float(at_method.feature_map_loss(*maps)), rtol=1e-5)
    history = distiller.fit(x, y, epochs=2, verbose=0).history
    assert_finite_history(history, ["total_loss", "distillation_loss"])
    assert len(distiller._teacher_feature_extractor.outputs) == 2


@pytest.mark.slow  # 6-10 s on two shared cores: Keras traces three losses and two extractors
def test_keras_distiller_several_method_losses_end_to_end(end_to_end):
    """<- TestEndToEndDistillation.test_multi_distillation_loss_distillation_end_to_end:
    KD on the logits and RKD on two pairs of named layers, one extractor pass each."""
    named = [MethodLoss("rkd", teacher_layer_name=f"teacher_dense_{i}", student_layer_name=f"student_dense_{i}")
             for i in (1, 2)]
    distiller = keras_distiller(end_to_end["teacher"], end_to_end["student"],
                                [MethodLoss("kd", temperature=3.0), *named], distillation_loss_weights=[1.0, 0.5, 0.3])
    history = distiller.fit(end_to_end["x"], end_to_end["y"], epochs=2, verbose=0).history
    assert_finite_history(history, ["total_loss", "student_loss", "distillation_loss"])
    assert len(distiller._teacher_feature_extractor.outputs) == 3  # the final output and two Dense layers
    assert len(distiller._student_feature_extractor.outputs) == 3


# == 2. the toolkit's Distiller in place of Keras' ===================================================

@pytest.fixture
def ours():
    """`TestDistiller.setUp` for the toolkit: built subclassed models, KD at T = 2."""
    seeded()
    x, y = arrays(20)
    teacher, student = built(simple_teacher(), x), built(simple_student(), x)
    distiller = Distiller(teacher, student, "kd", temperature=2.0, seed=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    return {"x": x, "y": y, "teacher": teacher, "student": student, "distiller": distiller}


def test_distiller_initialization(ours):
    """<- TestDistiller.test_distiller_initialization (KD's alpha is Keras' student_loss_weight)"""
    distiller = ours["distiller"]
    assert not ours["teacher"].trainable and ours["student"].trainable
    assert distiller.method_name == "kd" and distiller.options.temperature == 2.0 and distiller.options.alpha == 0.5
    assert distiller.teacher is ours["teacher"] and distiller.student is ours["student"]
    assert distiller.optimizer is not None and distiller.compiled


def test_distiller_call_is_the_student(ours):
    """<- TestDistiller.test_distiller_call"""
    x = ours["x"]
    outputs = ours["distiller"](x)
    assert tuple(outputs.shape) == (20, CLASSES)
    np.testing.assert_allclose(np.asarray(outputs), np.asarray(ours["student"](x)), rtol=1e-6)
    assert not np.allclose(np.asarray(outputs), np.asarray(ours["teacher"](x)))


def test_distiller_freezes_a_new_teacher(ours):
    """<- TestDistiller.test_teacher_freezing"""
    new_teacher = built(simple_teacher(), ours["x"])
    assert new_teacher.trainable
    Distiller(new_teacher, ours["student"], "kd", temperature=2.0)
    assert not new_teacher.trainable and ours["student"].trainable


def test_distiller_refuses_bad_input(ours):
    """<- TestDistiller.test_model_compatibility_validation and the validation halves
    of the multi-loss and validate_outputs tests: each refusal is a `ConfigError`
    (a ValueError) at once."""
    teacher, student = ours["teacher"], ours["student"]
    with pytest.raises(ConfigError, match="teacher must be a keras.Model, got str"):
        Distiller("not_a_model", student, "kd")
    with pytest.raises(ConfigError, match="student must be a keras.Model, got str"):
        Distiller(teacher, "not_a_model", "kd")
    with pytest.raises(ConfigError, match="kd has no option student_loss_weight"):
        Distiller(teacher, student, "kd", student_loss_weight=0.5)
    with pytest.raises(ConfigError, match="alpha"):
        Distiller(teacher, student, "kd", alpha=1.5)
    with pytest.raises(ConfigError, match="takes no loss"):
        ours["distiller"].compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ConfigError, match="no layers to name"):  # a subclassed model has no layer names
        Distiller(teacher, student, "rkd", teacher_features={"embedding": "dense"})
    with pytest.raises(ConfigError, match="return a dict"):  # nor an embedding unless its call returns one
        Distiller(teacher, student, "rkd").fit(ours["x"], ours["y"], epochs=1, verbose=0)


@pytest.mark.parametrize("alpha, zero_term, other_term", [(1.0, "kd", "ce"), (0.0, "ce", "kd")])
def test_distiller_student_loss_only_and_distillation_only(ours, alpha, zero_term, other_term):
    """<- TestDistiller.test_student_loss_weighting: KD's alpha = 1 trains on the
    labels alone, alpha = 0 on the teacher alone; the other term is logged as 0."""
    distiller = Distiller(ours["teacher"], ours["student"], "kd", temperature=2.0, alpha=alpha, seed=1)
    distiller.compile(optimizer="adam")
    history = distiller.fit(ours["x"][:5], ours["y"][:5], epochs=1, verbose=0).history
    assert_finite_history(history, ["loss", "ce", "kd"])
    assert history[zero_term] == [0.0] and history[other_term][0] > 0
    np.testing.assert_allclose(history["loss"][0], history[other_term][0], rtol=1e-6)


@pytest.mark.slow
def test_distiller_full_training_workflow():
    """<- TestDistiller.test_full_training_workflow, subclassed models and validation_data"""
    seeded(42)
    x_train, y_train = arrays(100, seed=42)
    x_val, y_val = arrays(20, seed=43)
    teacher, student = built(simple_teacher(), x_train), built(simple_student(), x_train)
    teacher_before = weights_of(teacher)
    distiller = Distiller(teacher, student, "kd", temperature=2.0, seed=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    history = distiller.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=3, batch_size=16,
                            verbose=0).history
    assert_finite_history(history, ["loss", "ce", "kd", "accuracy", "val_loss", "val_accuracy"])
    assert len(history["loss"]) == 3
    assert distiller.predict(x_val[:5], verbose=0).shape == (5, CLASSES)

    before = weights_of(student)
    distiller.fit(x_train[:10], y_train[:10], epochs=1, verbose=0)
    assert changed(before, student)
    assert not changed(teacher_before, teacher)


def test_distiller_evaluate():
    """<- TestDistiller.test_evaluation_workflow; evaluate scores the student alone
    (its cross-entropy as `loss`)."""
    seeded(42)
    x, y = arrays(30, seed=42)
    student = built(simple_student(), x)
    distiller = Distiller(built(simple_teacher(), x), student, "kd", temperature=2.0, seed=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    distiller.fit(x[:10], y[:10], epochs=1, verbose=0)
    results = distiller.evaluate(x, y, verbose=0)
    assert isinstance(results, list) and len(results) == 2 and np.isfinite(results).all()
    ce = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, student(x), from_logits=True)))
    np.testing.assert_allclose(results[0], ce, rtol=1e-5)


def test_distiller_predict_before_fit():
    """<- TestDistiller.test_prediction_workflow (not compiled, not trained)"""
    seeded(42)
    x, _ = arrays(20, seed=42)
    student = built(simple_student(), x)
    distiller = Distiller(built(simple_teacher(), x), student, "kd", temperature=2.0)
    predictions = distiller.predict(x, verbose=0)
    assert predictions.shape == (20, CLASSES) and np.isfinite(predictions).all()
    np.testing.assert_allclose(predictions, np.asarray(student(x)), rtol=1e-5, atol=1e-6)


def test_distiller_serialization_and_saving(tmp_path):
    """<- TestDistiller.test_distiller_serialization_and_saving: Sequential models
    without an Input, built by the distiller's first call."""
    seeded()
    teacher, student = dense_sequential("teacher", [32, 16]), dense_sequential("student", [16, 8])
    original = Distiller(teacher, student, "kd", temperature=3.0, alpha=0.7, seed=3)
    x, _ = arrays(2, features=20)
    original(x)

    config = original.get_config()
    for key in ("teacher", "student", "method", "options", "seed"):
        assert key in config, key
    assert isinstance(json.dumps(config), str)

    rebuilt = Distiller.from_config(config)
    assert rebuilt.method_name == "kd" and rebuilt.options == original.options and rebuilt.seed == 3
    assert rebuilt.options.temperature == 3.0 and rebuilt.options.alpha == 0.7
    assert tuple(rebuilt(x).shape) == (2, CLASSES)

    original.compile(optimizer="adam")
    path = tmp_path / "distiller_model.keras"
    original.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, Distiller) and loaded.options == original.options
    assert tuple(loaded(x).shape) == (2, CLASSES)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(original(x)), rtol=1e-6)


def test_distiller_kd_end_to_end(end_to_end):
    """<- TestEndToEndDistillation.test_logits_distillation_end_to_end"""
    distiller = Distiller(end_to_end["teacher"], end_to_end["student"], "kd", temperature=3.0, seed=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    history = distiller.fit(end_to_end["x"], end_to_end["y"], epochs=2, verbose=0).history
    assert_finite_history(history, ["loss", "ce", "kd", "accuracy"])
    assert history["loss"][-1] > 0
    assert distiller.predict(end_to_end["x"][:5], verbose=0).shape == (5, CLASSES)
    assert isinstance(distiller.student, keras.Model) and distiller.student is end_to_end["student"]


def test_distiller_rkd_on_named_layers_end_to_end(end_to_end):
    """<- TestEndToEndDistillation.test_feature_distillation_end_to_end: RKD on the
    named first Dense layers; the first step's logged terms equal RKD on their outputs."""
    teacher, student, x, y = end_to_end["teacher"], end_to_end["student"], end_to_end["x"], end_to_end["y"]
    distiller = Distiller(teacher, student, "rkd", teacher_features={"embedding": "teacher_dense_1"},
                          student_features={"embedding": "student_dense_1"}, seed=1)
    assert distiller.teacher_reads["embedding"].startswith("teacher_dense_1 ")
    assert distiller.student_reads["embedding"].startswith("student_dense_1 ")
    distiller.compile(optimizer=keras.optimizers.SGD(0.0))  # no update: the logged terms are those of the weights
    history = distiller.fit(x, y, epochs=1, batch_size=32, verbose=0).history
    assert_finite_history(history, ["loss", "ce", "distance", "angle"])
    embedding = [keras.Model(m.inputs[0], m.get_layer(name).output)(x)
                 for m, name in ((teacher, "teacher_dense_1"), (student, "student_dense_1"))]
    distance, angle = rkd_method.rkd_losses(*embedding)
    np.testing.assert_allclose(history["distance"][0], 25.0 * float(distance), rtol=1e-4)
    np.testing.assert_allclose(history["angle"][0], 50.0 * float(angle), rtol=1e-4)


def test_distiller_at_on_named_conv_layers_end_to_end():
    """<- TestEndToEndDistillation.test_feature_distillation_end_to_end, with AT on
    named Conv2D maps."""
    seeded()
    x, y = arrays(32, shape=(8, 8, 1))
    distiller = Distiller(conv_sequential("teacher", 8), conv_sequential("student", 4), "at",
                          teacher_features={"spatial": "teacher_conv"}, student_features={"spatial": "student_conv"},
                          seed=1)
    assert distiller.teacher_reads["spatial"] == "teacher_conv (batch, 6, 6, 8)"
    assert distiller.student_reads["spatial"] == "student_conv (batch, 6, 6, 4)"
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    history = distiller.fit(x, y, epochs=2, verbose=0).history
    assert_finite_history(history, ["loss", "ce", "at", "accuracy"])
    assert history["at"][0] > 0


@pytest.mark.slow
def test_distiller_feature_method_on_subclassed_models():
    """Keras' subclassed `SimpleTeacher` / `SimpleStudent` with a feature method:
    the teacher's call returns {"logits", "embedding"}, the student's embedding
    comes from a callable `student_features`."""
    seeded()
    x, y = arrays(40)
    teacher, student = simple_teacher(features=True), simple_student()
    reads = lambda inputs, training=False: {"logits": student(inputs, training=training),  # noqa: E731
                                            "embedding": student.hidden(inputs)}
    distiller = Distiller(teacher, student, "rkd", student_features=reads, seed=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    history = distiller.fit(x, y, epochs=1, batch_size=20, verbose=0).history
    assert_finite_history(history, ["loss", "ce", "distance", "angle", "accuracy"])
    assert history["distance"][0] > 0 and history["angle"][0] > 0
    assert np.isfinite(distiller.evaluate(x, y, verbose=0)).all()
    assert distiller.predict(x[:4], verbose=0).shape == (4, CLASSES)


@pytest.mark.slow
def test_distiller_student_returning_a_dict_trains_with_metrics():
    seeded()
    x, y = arrays(40)
    distiller = Distiller(simple_teacher(features=True), simple_student(features=True), "rkd", seed=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    history = distiller.fit(x, y, epochs=1, batch_size=20, verbose=0).history
    assert_finite_history(history, ["loss", "distance", "angle", "accuracy"])
    kd = Distiller(simple_teacher(features=True), simple_student(features=True), "kd", seed=1)  # logits of the dict
    kd.compile(optimizer="adam", metrics=["accuracy"])
    assert_finite_history(kd.fit(x, y, epochs=1, batch_size=20, verbose=0).history, ["loss", "kd", "accuracy"])


def test_distiller_student_returning_a_dict_evaluates_and_predicts_logits():
    seeded()
    x, y = arrays(40)
    distiller = Distiller(simple_teacher(features=True), simple_student(features=True), "rkd", seed=1)
    distiller.compile(optimizer="adam")
    assert np.isfinite(distiller.evaluate(x, y, verbose=0)).all()
    assert distiller.predict(x[:4], verbose=0).shape == (4, CLASSES)
