"""Every `keras.applications` family that builds at 32x32 as the TEACHER of a small
CNN, by every registered method (one `fit` step each): the logged terms are finite,
each distillation term is non-zero (a term that is exactly 0 trained on nothing),
and the layers read are the ones common/features.py's docstring table names. Then a
softmax teacher by `kd` (read through its logits, one warning line) and a
MobileNetV2 STUDENT of a ResNet50V2 teacher by the feature methods.

Fast tier (unmarked): MobileNetV3Small with every method, its softmax case and the
`sftn` refusal. The other families, the other softmax cases and the MobileNetV2
student are `slow`.
"""

import functools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import methods
from kdtoolkit.distiller import Distiller
from kdtoolkit.errors import ConfigError

SHAPE = (32, 32, 3)
FAST_FAMILY = "MobileNetV3Small"
# family: (embedding, spatial) as resolved at 32x32, 10 classes (common/features.py's docstring table;
# the same patterns as tests/test_features.py). MobileNetV3Small's layers are auto-named activation_<n>.
TABLE = {
    "MobileNetV2": (r"global_average_pooling2d(_\d+)? \(batch, 1280\)", r"block_13_expand_relu \(batch, 2, 2, 576\)"),
    "MobileNetV3Small": (r"activation(_\d+)? \(batch, 1, 1, 1024\) -> squeeze \(batch, 1024\)",
                         r"activation(_\d+)? \(batch, 2, 2, 288\)"),
    "ResNet50V2": (r"avg_pool \(batch, 2048\)", r"conv4_block6_1_relu \(batch, 2, 2, 256\)"),
    "DenseNet121": (r"avg_pool \(batch, 1024\)", r"pool4_conv \(batch, 2, 2, 512\)"),
    "EfficientNetB0": (r"avg_pool \(batch, 1280\)", r"block6a_expand_activation \(batch, 2, 2, 672\)"),
    "ConvNeXtTiny": (r"convnext_tiny_head_layernorm \(batch, 768\)",
                     r"add(_\d+)? \(batch, 2, 2, 384\)"),
}
# The layer producing the softmax teacher's probabilities (its logits are read at or before it, exactly).
SOFTMAX_LAYER = {"MobileNetV3Small": "predictions", "ConvNeXtTiny": "convnext_tiny_head_dense"}
# The student CNN's reads: its last map (the stride-2 conv, 16x16, larger than every teacher's 2x2) and
# the Dense before its classifier.
STUDENT_READS = {"embedding": r"embedding \(batch, 32\)", "spatial": r"conv2 \(batch, 16, 16, 32\)",
                 "hint": r"conv2 \(batch, 16, 16, 32\)", "logits": r"logits \(batch, 10\)"}
MOBILENETV2_STUDENT_READS = {"embedding": TABLE["MobileNetV2"][0], "spatial": TABLE["MobileNetV2"][1],
                             "hint": TABLE["MobileNetV2"][1], "logits": r"predictions \(batch, 10\)"}

METHODS = tuple(name for name in methods.REGISTRY if name != "sftn")  # sftn trains its own teacher: refused
# Labels of the one batch: every class present twice (CID's `class` term averages over the classes
# with at least two examples in the batch, and is 0 when there is none; CRD draws other-class negatives).
LABELS = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32)


@functools.lru_cache(maxsize=None)
def application(family, activation=None, role="teacher"):
    """`family` at 32x32x3, 10 classes, random weights, built once per module and `role` (a
    Distiller freezes its teacher: a student is another instance)."""
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, family)(weights=None, input_shape=SHAPE, classes=10,
                                                classifier_activation=activation)
    return calibrated(model)


def calibrated(model):
    """`model` with each BatchNormalization's moving statistics set to those of `images()` (one
    forward pass in training mode at momentum 0). At random initialisation the moving variance is
    1 where the activations' is far smaller, so in inference mode the activations shrink layer after
    layer: MobileNetV2's, MobileNetV3Small's and EfficientNetB0's logits, embeddings and maps come
    out near 1e-13, AT's normalised attention map of them is 0 (its term the constant weight / (H W),
    no gradient) and KD's soft target uniform, so every term is non-zero while the teacher teaches
    nothing. Calibrated, each family's targets are of order 1 (ConvNeXt has no BatchNormalization)."""
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(images(), training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
    return model


@functools.lru_cache(maxsize=None)
def images():
    return np.random.default_rng(0).uniform(0.0, 1.0, size=(len(LABELS), *SHAPE)).astype("float32")


def small_student():
    """Conv 16 -> conv 32 stride 2 (16x16 map) -> average pool -> Dense 32 "embedding" -> Dense 10 logits.
    A few thousand weights: built fresh per case, so a case's numbers do not depend on the ones before."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(32, activation="relu", name="embedding")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="small_cnn")


def reads(distiller):
    return f"teacher_reads={distiller.teacher_reads} student_reads={distiller.student_reads}"


def one_step(distiller):
    """One `fit` epoch of one batch of 8; returns `{term: value}` of its history."""
    distiller.compile(optimizer="adam")
    history = distiller.fit(images(), LABELS, batch_size=len(LABELS), epochs=1, verbose=0)
    return {name: float(history.history[name][0]) for name in distiller.method.term_names}


def assert_targets(distiller, method):
    """Each teacher target the method caches carries something: per example, a root mean square
    above 1e-3 (the calibrated families' targets are of order 0.1 to 100; a target near 1e-7 is
    normalised to 0 by AT, and regressed to 0 by FitNets)."""
    for name, value in distiller.teacher_targets(images()).items():
        value = keras.ops.convert_to_numpy(value).reshape(len(LABELS), -1)
        rms = np.sqrt(np.mean(np.square(value), axis=1))
        assert np.all(np.isfinite(value)) and rms.min() > 1e-3, \
            f"{method}: the teacher's {name} is negligible (per-example RMS {rms.min():.3g} to {rms.max():.3g}); " \
            f"{reads(distiller)}"


def assert_terms(distiller, method):
    """One step; every term finite, every distillation term (all but `ce`) non-zero."""
    terms = one_step(distiller)
    seen = f"{method}: terms={terms} {reads(distiller)}"
    assert set(terms) == set(distiller.method.term_names), seen
    for name, value in terms.items():
        assert np.isfinite(value), f"{name} is not finite; {seen}"
    for name, value in terms.items():
        if name == "ce":
            continue
        # ls: its one term `ls_ce` is the (smoothed) cross-entropy itself, > 0 for any logits.
        # dkd: the KD part is warmed up by min(epoch / W, 1), W = warmup (20/240) x epochs; with
        #   epochs=1, W = 1/12 and the scale is already 1 at epoch 1, so tckd and nckd must be non-zero.
        assert value != 0.0, f"{name} is exactly 0 after the step: the method trained on nothing; {seen}"
    if method == "cid":
        # CID's `ce` is the intervention head's, multiplied by `active`, which is 0 until the head trains
        # (after init_epochs = 1 epoch, common/methods/cid.py): exactly 0 in the first epoch, by design.
        assert terms["ce"] == 0.0, f"cid's head ce before its init epoch; {seen}"
    return terms


def assert_reads(described, expected, distiller, role):
    """Each feature in `described` (`{feature: description}`) matches `expected[feature]`."""
    for feature, description in described.items():
        pattern = expected.get(feature)
        if feature == "logits":
            pattern = pattern or r".* \(batch, 10\)( \(.*\))?"
        assert pattern is not None, f"{role} read an unexpected {feature}; {reads(distiller)}"
        assert re.fullmatch(pattern, description), f"{role} {feature}: {description!r} is not {pattern!r}; " \
                                                   f"{reads(distiller)}"


def assert_shapes(feature_model, distiller, role):
    """The feature model's symbolic outputs: logits (batch, 10); the embedding a vector that is not the
    logits; a spatial map or hint map with H, W > 1."""
    shapes = {name: tuple(tensor.shape) for name, tensor in feature_model.output.items()}
    seen = f"{role} shapes {shapes}; {reads(distiller)}"
    assert shapes["logits"] == (None, 10), seen
    if "embedding" in shapes:
        assert len(shapes["embedding"]) == 2 and shapes["embedding"][1] != 10, seen
    for name in ("spatial", "hint"):
        if name in shapes:
            assert len(shapes[name]) == 4 and shapes[name][1] > 1 and shapes[name][2] > 1, seen


def teacher_table(family):
    embedding, spatial = TABLE[family]
    return {"embedding": embedding, "spatial": spatial, "hint": spatial}  # both models have maps: hint = spatial


def reads_features(method):
    cls = methods.REGISTRY[method]
    return bool({*cls.teacher_outputs, *cls.student_outputs} - {"logits"})


def reads_and_caches(method):
    """What `method` reads and caches: its outputs of each model and its cached target names."""
    cls = methods.REGISTRY[method]
    return tuple(cls.teacher_outputs), tuple(cls.student_outputs), tuple(cls.target_names())


def family_method_cases():
    """Every method on the fast family; on the others, `kd` and one method per distinct
    set of feature reads (the first registered of each: the family's layers matter
    through what is read and cached, resolved alike for every method that reads it;
    each method's own terms are checked on the fast family)."""
    cases, seen = [], set()
    representatives = ["kd"]
    for method in METHODS:
        if reads_features(method) and reads_and_caches(method) not in seen:
            seen.add(reads_and_caches(method))
            representatives.append(method)
    for family in TABLE:
        for method in METHODS:
            if family != FAST_FAMILY and method not in representatives:
                continue
            marks = () if family == FAST_FAMILY else (pytest.mark.slow,)
            cases.append(pytest.param(family, method, marks=marks, id=f"{family}-{method}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("family, method", family_method_cases())
def test_an_application_teacher_distils_a_small_cnn_by_every_method(family, method):
    teacher = application(family)
    distiller = Distiller(teacher, small_student(), method, seed=0)
    expected = {"logits"} | set(distiller.cls.teacher_outputs)
    assert set(distiller.teacher_reads) == expected, reads(distiller)
    assert_reads(distiller.teacher_reads, teacher_table(family), distiller, "teacher")
    assert_reads(distiller.student_reads, STUDENT_READS, distiller, "student")
    assert_shapes(distiller.teacher_outputs, distiller, "teacher")
    if distiller.student_outputs is not None:
        assert_shapes(distiller.student_outputs, distiller, "student")
    assert_targets(distiller, method)
    assert_terms(distiller, method)


def test_sftn_is_refused_in_one_line():
    with pytest.raises(ConfigError) as raised:
        Distiller(application(FAST_FAMILY), small_student(), "sftn")
    message = str(raised.value)
    assert "\n" not in message and "sftn trains its own teacher" in message and "method='kd'" in message, message


def softmax_cases():
    return [pytest.param(family, marks=() if family == FAST_FAMILY else (pytest.mark.slow,), id=family)
            for family in TABLE]


@pytest.mark.slow
@pytest.mark.parametrize("family", softmax_cases())
def test_a_softmax_teacher_is_read_through_its_logits_with_one_warning(family):
    teacher = application(family, "softmax")
    with pytest.warns(UserWarning) as warned:
        distiller = Distiller(teacher, small_student(), "kd", seed=0)
    lines = [str(w.message) for w in warned if issubclass(w.category, UserWarning)]
    assert len(lines) == 1 and "\n" not in lines[0], f"{lines}; {reads(distiller)}"
    assert "logits" in lines[0] and "exact" in lines[0], f"{lines}; {reads(distiller)}"
    layer = SOFTMAX_LAYER.get(family, "predictions")
    assert layer in lines[0] and layer in distiller.teacher_reads["logits"], f"{lines}; {reads(distiller)}"
    assert_shapes(distiller.teacher_outputs, distiller, "teacher")
    # Eager against eager, and what fit caches (computed in a tf.function) against the teacher in a
    # tf.function: TensorFlow's graph and eager kernels round differently, by up to 1.6e-4 on
    # EfficientNetB0's probabilities (logits up to ~3600), which is not the toolkit's doing.
    probabilities = keras.ops.convert_to_numpy(teacher(images(), training=False))
    graph_probabilities = keras.ops.convert_to_numpy(
        tf.function(lambda x: teacher(x, training=False))(tf.constant(images())))
    logits = keras.ops.convert_to_numpy(distiller.teacher_targets(images())["logits"])
    cached = distiller.array_targets(images())["teacher_logits"]  # what fit caches per example
    for name, value, expected in (("teacher_targets", logits, probabilities),
                                  ("cached teacher_logits", cached, graph_probabilities)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.softmax(value)), expected, atol=1e-5,
                                   err_msg=f"{name}: {reads(distiller)}")
        assert not np.allclose(value, probabilities, atol=1e-3), f"{name} are the probabilities; {reads(distiller)}"
    assert_terms(distiller, "kd")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["at", "fitnets", "rkd", "crd"])
def test_a_mobilenetv2_student_of_a_resnet50v2_teacher(method):
    """The student side: an application's own layers are read as the student's features. The
    student is built once for the four cases (each trains it one step further)."""
    distiller = Distiller(application("ResNet50V2"), application("MobileNetV2", role="student"), method,
                            seed=0)
    assert_reads(distiller.teacher_reads, teacher_table("ResNet50V2"), distiller, "teacher")
    assert set(distiller.student_reads) == {"logits", *distiller.cls.student_outputs}, reads(distiller)
    assert_reads(distiller.student_reads, MOBILENETV2_STUDENT_READS, distiller, "student")
    assert_shapes(distiller.student_outputs, distiller, "student")
    assert_targets(distiller, method)
    assert_terms(distiller, method)
