"""`kdtoolkit.features` (and its parts `feature_rules`, `classifier_head`,
`model_graph`): which tensor of a model each feature resolves to, on
`keras.applications` families and small models, and the one-line refusals."""

import functools
import re

import keras
import numpy as np
import pytest

from kdtoolkit import classifier_head, feature_rules, features, model_graph
from kdtoolkit.errors import ConfigError

SHAPE = (32, 32, 3)
APPLICATIONS = {  # family: (constructor, embedding, spatial) as resolved at 32x32 (common/features.py's table)
    "MobileNetV2": ("MobileNetV2", r"global_average_pooling2d(_\d+)? \(batch, 1280\)",
                    r"block_13_expand_relu \(batch, 2, 2, 576\)"),
    "MobileNetV3Small": ("MobileNetV3Small", r"activation(_\d+)? \(batch, 1, 1, 1024\) -> squeeze \(batch, 1024\)",
                         r"activation(_\d+)? \(batch, 2, 2, 288\)"),
    "ResNet50V2": ("ResNet50V2", r"avg_pool \(batch, 2048\)", r"conv4_block6_1_relu \(batch, 2, 2, 256\)"),
    "DenseNet121": ("DenseNet121", r"avg_pool \(batch, 1024\)", r"pool4_conv \(batch, 2, 2, 512\)"),
    "EfficientNetB0": ("EfficientNetB0", r"avg_pool \(batch, 1280\)",
                       r"block6a_expand_activation \(batch, 2, 2, 672\)"),
    "ConvNeXtTiny": ("ConvNeXtTiny", r"convnext_tiny_head_layernorm \(batch, 768\)",
                     r"add(_\d+)? \(batch, 2, 2, 384\)"),
}


@functools.lru_cache(maxsize=None)
def application(family, top="none"):
    """`family` at 32x32x3, 10 classes: `top` "none" (logits), "softmax", or "base" (include_top=False)."""
    keras.utils.set_random_seed(0)
    build = getattr(keras.applications, APPLICATIONS[family][0])
    try:
        if top == "base":
            return build(weights=None, input_shape=SHAPE, include_top=False)
        return build(weights=None, input_shape=SHAPE, classes=10,
                     classifier_activation=None if top == "none" else "softmax")
    except ValueError as err:  # an application that refuses a 32x32 input
        pytest.skip(f"{family} does not build at {SHAPE}: {err}")


def images(n=2):
    return np.random.default_rng(0).uniform(0, 255, size=(n, *SHAPE)).astype("float32")


def assert_resolved(model, role="student"):
    """The default logits / embedding / spatial of `model`; returns them and their descriptions."""
    feature_model, described = features.feature_model(model, ("logits", "embedding", "spatial"), role=role)
    out = feature_model(images(), training=False)
    seen = f"{model.name}: {described}"
    assert out["logits"].shape == (2, 10), seen
    assert len(out["embedding"].shape) == 2 and out["embedding"].shape[0] == 2, seen
    spatial = out["spatial"].shape
    assert len(spatial) == 4 and spatial[1] > 1 and spatial[2] > 1, seen
    assert out["embedding"].shape[1] != 10 or not np.allclose(out["embedding"], out["logits"]), seen
    return out, described


def one_line_refusal(call, *names):
    """Runs `call`, which must raise one ConfigError line naming each of `names`; returns the message."""
    with pytest.raises(ConfigError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, message
    return message


@pytest.mark.slow
@pytest.mark.parametrize("family", APPLICATIONS)
def test_an_application_resolves_its_penultimate_vector_and_last_map(family):
    model = application(family)
    out, described = assert_resolved(model)
    _, embedding, spatial = APPLICATIONS[family]
    assert re.fullmatch(embedding, described["embedding"]), described
    assert re.fullmatch(spatial, described["spatial"]), described
    np.testing.assert_allclose(out["logits"], model(images(), training=False), rtol=1e-5, atol=1e-5,
                               err_msg=str(described))


@pytest.mark.parametrize("family, softmax", [("ResNet50V2", "predictions"), ("MobileNetV3Small", "predictions"),
                                             ("ConvNeXtTiny", "convnext_tiny_head_dense")])
@pytest.mark.slow
def test_a_softmax_teacher_gives_exact_logits_and_a_softmax_student_is_refused(family, softmax):
    model = application(family, "softmax")
    feature_model, described = features.feature_model(model, ("logits", "embedding"), role="teacher")
    logits = feature_model(images(), training=False)["logits"]
    assert "exact" in described["logits"] and softmax in described["logits"], described
    np.testing.assert_allclose(keras.ops.softmax(logits), model(images(), training=False), atol=1e-5,
                               err_msg=str(described))
    assert re.fullmatch(APPLICATIONS[family][1], described["embedding"]), described
    one_line_refusal(lambda: classifier_head.logits_tensor(model, "student"), "student", softmax,
                     "classifier_activation=None")


def nested(family, form):
    """The `include_top=False` base of `family` under pooling and a Dense head, Sequential or functional."""
    base = application(family, "base")
    if form == "sequential":
        return keras.Sequential([keras.Input(SHAPE), base, keras.layers.GlobalAveragePooling2D(name="pool"),
                                 keras.layers.Dense(10, name="head")], name=f"{family}_sequential")
    x = keras.Input(SHAPE)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(base(x, training=False))
    hidden = keras.layers.Dropout(0.5)(pooled)
    return keras.Model(x, keras.layers.Dense(10, name="head")(hidden), name=f"{family}_functional")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["sequential", "functional"])
@pytest.mark.parametrize("family", APPLICATIONS)
def test_a_nested_base_resolves_to_its_pooled_output_and_its_last_map(family, form):
    model = nested(family, form)
    base = application(family, "base")
    out, described = assert_resolved(model)
    assert described["embedding"] == f"pool {model_graph.shape_text(out['embedding'].shape)}", described
    assert re.fullmatch(re.escape(base.name) + "/" + APPLICATIONS[family][2] + r" \(a second pass through "
                        + re.escape(base.name) + "'s layers up to it\\)", described["spatial"]), described
    name = described["spatial"].split("/")[1].split(" ")[0]
    inner = next(op for op in base.operations if op.name == name)  # a layer, or a keras.ops op (ConvNeXt's add)
    expected = keras.Model(base.inputs[0], inner.output)(images(), training=False)
    np.testing.assert_allclose(out["spatial"], expected, rtol=1e-5, atol=1e-5, err_msg=str(described))


def test_a_layer_of_a_nested_model_is_named_by_its_path_or_its_name():
    model = nested("MobileNetV2", "sequential")
    base = application("MobileNetV2", "base")
    expected = keras.Model(base.inputs[0], base.get_layer("block_13_expand").output)(images(), training=False)
    for name in (f"{base.name}/block_13_expand", "block_13_expand"):
        feature_model, described = features.feature_model(model, ("spatial", "embedding"),
                                                          {"spatial": name, "embedding": name})
        out = feature_model(images(), training=False)
        assert described["spatial"].startswith(f"{base.name}/block_13_expand (batch, 2, 2, 576)"), described
        assert "global average pool (batch, 576)" in described["embedding"], described
        np.testing.assert_allclose(out["spatial"], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["embedding"], np.mean(expected, axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_a_wrapped_softmax_application_reads_log_probabilities_and_its_inner_embedding():
    inner = application("MobileNetV3Small", "softmax")
    model = keras.Sequential([keras.Input(SHAPE), inner], name="wrapped")
    feature_model, described = features.feature_model(model, ("logits", "embedding", "spatial"))
    out = feature_model(images(), training=False)
    assert "log-probabilities" in described["logits"], described
    np.testing.assert_allclose(keras.ops.softmax(out["logits"]), model(images()), atol=1e-5)
    expected = (f"{inner.name}/activation(_\\d+)? \\(batch, 1, 1, 1024\\) -> squeeze \\(batch, 1024\\) "
                f"\\(a second pass through {inner.name}'s layers up to it\\)")
    assert re.fullmatch(expected, described["embedding"]), described


def small_models():
    """A CNN like tests/test_distiller.py's teacher and a Dense -> Dropout -> Dense MLP."""
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                            keras.layers.Flatten(), keras.layers.Dense(16, activation="relu", name="penultimate"),
                            keras.layers.Dense(2, name="out")], name="cnn")
    mlp = keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(24, activation="relu", name="hidden"), keras.layers.Dropout(0.5),
                            keras.layers.Dense(2, name="out")], name="mlp")
    return cnn, mlp


def test_small_models_read_their_layers_outputs_before_dropout():
    cnn, mlp = small_models()
    x = np.random.default_rng(1).uniform(size=(4, 12, 12, 1)).astype("float32")
    feature_model, described = features.feature_model(cnn, ("logits", "embedding", "spatial"))
    assert described == {"logits": "out (batch, 2)", "embedding": "penultimate (batch, 16)",
                         "spatial": "conv (batch, 10, 10, 4)"}
    out = feature_model(x)
    np.testing.assert_allclose(out["spatial"], keras.Model(cnn.inputs[0], cnn.get_layer("conv").output)(x), rtol=1e-6)
    feature_model, described = features.feature_model(mlp, ("logits", "embedding"), role="student")
    assert described["embedding"] == "hidden (batch, 24)", described
    hidden = keras.Model(mlp.inputs[0], mlp.get_layer("hidden").output)(x)
    for training in (False, True):  # before the dropout, in training too
        out = feature_model(x, training=training)
        np.testing.assert_allclose(out["embedding"], hidden, rtol=1e-6)
    np.testing.assert_allclose(feature_model(x)["logits"], mlp(x), rtol=1e-6)
    assert feature_rules.hint_source(cnn, mlp) == "embedding" and feature_rules.hint_source(cnn, cnn) == "spatial"
    _, described = features.feature_model(cnn, ("hint",), hint_from="embedding")
    assert described == {"hint": "penultimate (batch, 16)"}


def test_a_separate_or_fused_softmax_is_undone_exactly():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    separate = keras.Model(inputs, keras.layers.Activation("softmax", name="probs")(
        keras.layers.Dense(3, name="dense_logits")(hidden)))
    fused = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="fused")(hidden))
    maps = keras.Input((4, 4, 2))
    conv = keras.layers.Conv2D(3, 4, activation="softmax", name="conv_probs")(maps)
    fused_conv = keras.Model(maps, keras.layers.Flatten()(conv))
    for model, layer in ((separate, "probs"), (fused, "fused"), (fused_conv, "conv_probs")):
        x = rng.normal(size=(4, *model.inputs[0].shape[1:])).astype("float32")
        logits, note = classifier_head.logits_tensor(model, "teacher")
        assert layer in note and "exact" in note, note
        computed = keras.Model(model.inputs[0], logits)(x)
        np.testing.assert_allclose(keras.ops.softmax(computed), model(x), atol=1e-6)
    feature_model, described = features.feature_model(fused, ("embedding",))
    assert described == {"embedding": "hidden (batch, 8)"}
    one_line_refusal(lambda: features.feature_model(fused, ("logits",), role="student"), "student", "fused")


def test_wrong_layers_are_refused_in_one_line():
    resnet, mobilenet = application("ResNet50V2"), application("MobileNetV3Small")
    cnn, mlp = small_models()
    one_line_refusal(lambda: feature_rules.embedding_tensor(resnet, "predictions"), "predictions", "is the logits",
                     "teacher_features={'embedding'", "avg_pool (batch, 2048)")
    one_line_refusal(lambda: feature_rules.embedding_tensor(mobilenet, "logits"), "logits (batch, 1, 1, 10)",
                     "is the logits")
    one_line_refusal(lambda: feature_rules.spatial_tensor(resnet, "post_relu", role="student"),
                     "post_relu (batch, 1, 1, 2048)", "1x1 map", "student_features={'spatial'",
                     "conv4_block6_1_relu (batch, 2, 2, 256)")
    one_line_refusal(lambda: feature_rules.spatial_tensor(resnet, "avg_pool"), "avg_pool (batch, 2048)", "not a map")
    one_line_refusal(lambda: feature_rules.spatial_tensor(mlp), "mlp", "no layer with a (batch, H, W, C) output")
    one_line_refusal(lambda: features.feature_model(mlp, ("logits", "hint"), hint_from="spatial"), "mlp")
    one_line_refusal(lambda: feature_rules.embedding_tensor(resnet, "post_rleu"), "'post_rleu'", "post_relu")
    one_line_refusal(lambda: feature_rules.embedding_tensor(resnet, 10_000), "10000")
    inputs = keras.Input((4, 4, 2))
    flat = keras.layers.Reshape((8, 4), name="rows")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(flat)), name="rowwise")
    one_line_refusal(lambda: feature_rules.embedding_tensor(model, "rows"), "rows (batch, 8, 4)", "not a vector")


class Subclassed(keras.Model):
    """A subclassed CNN whose call returns logits, or with `as_dict` a dict of features."""

    def __init__(self, as_dict=False):
        super().__init__(name="subclassed")
        self.as_dict = as_dict
        self.conv = keras.layers.Conv2D(4, 3, activation="relu")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(2)

    def features(self, x, training=False):
        maps = self.conv(x)
        vector = self.pool(maps)
        return {"logits": self.dense(vector), "embedding": vector, "spatial": maps}

    def call(self, x, training=False):
        found = self.features(x, training=training)
        return found if self.as_dict else found["logits"]


def test_a_subclassed_model_gives_logits_or_its_dict_or_a_callables_features():
    x = np.random.default_rng(3).uniform(size=(2, 12, 12, 1)).astype("float32")
    plain = Subclassed()
    logits_only, described = features.feature_model(plain, ("logits",))
    np.testing.assert_allclose(logits_only(x)["logits"], plain(x), rtol=1e-6)
    wanted = ("logits", "embedding", "spatial", "hint")
    for feature_model, _ in (features.feature_model(Subclassed(as_dict=True), wanted),
                             features.feature_model(plain, wanted, named=plain.features)):
        out = feature_model(x, training=False)
        assert out["embedding"].shape == (2, 4) and out["spatial"].shape == (2, 10, 10, 4), out
        np.testing.assert_allclose(out["hint"], out["spatial"])
    feature_model, _ = features.feature_model(plain, ("logits", "embedding"))
    one_line_refusal(lambda: feature_model(x), "subclassed", "embedding", "return a dict",
                     "teacher_features=fn")
    one_line_refusal(lambda: features.feature_model(plain, ("embedding",), {"embedding": "dense"}, role="student"),
                     "subclassed", "student_features=fn")


def test_a_layer_index_names_the_layer_at_that_position():
    cnn, _ = small_models()
    _, described = features.feature_model(cnn, ("embedding", "spatial"), {"embedding": -2, "spatial": 0})
    assert described == {"embedding": "penultimate (batch, 16)", "spatial": "conv (batch, 10, 10, 4)"}
    one_line_refusal(lambda: feature_rules.embedding_tensor(cnn, -1), "out (batch, 2)", "is the logits")
