"""Which tensor of a Keras model a distillation method reads, by a checked rule:
the feature model a method reads (`feature_model`), the public entry point.

A method reads up to four outputs of a model (`feature_model`):

- `"logits"` `(batch, K)`: the model's output. A softmax output is converted
  back to logits for a teacher (`kdtoolkit.classifier_head.logits_tensor`:
  exactly where the softmax is a separate last layer or fused into the last
  Dense / Conv2D, else as log-probabilities, which softmax maps to the same
  probabilities); a student must return logits.
- `"embedding"` `(batch, D)`: the penultimate representation, the input of the
  classifier (the Dense or Conv2D layer that produces the K logits, found by
  walking back from the output over Flatten, Reshape, Dropout and identity
  layers), taken before any Dropout. A 4-D `(batch, 1, 1, C)` map is squeezed
  to `(batch, C)`, a 4-D map with H, W > 1 is global-average-pooled.
- `"spatial"` `(batch, H, W, C)` with H, W > 1: the output of the last layer,
  in the model's topological order, whose output is such a map, at or after
  the first convolution, zero padding excepted (its border is not a feature);
  where the model's own layers have none, the last such layer of a model nested
  in it (a second pass, below).
- `"hint"` (FitNets): the spatial map when both models have one, else the
  embedding (`kdtoolkit.feature_rules.hint_source`).

A name (`named={"spatial": "block_13_expand"}`, or a layer index) overrides a
default and goes through the same checks. Nothing resolves silently to the
wrong tensor: an embedding is never the logits, a spatial map never 1x1, and
each refusal is one `ConfigError` line naming the model, the layer, its shape,
what was expected and how to name another layer.

What the defaults resolve to on `keras.applications` at a 32x32x3 input with
`classes=10` (tested in tests/test_features.py):

    family            embedding                                   spatial
    MobileNetV2       global_average_pooling2d (batch, 1280)      block_13_expand_relu (batch, 2, 2, 576)
    MobileNetV3Small  the activation after conv_2 (batch, 1, 1,   the activation after expanded_conv_8_expand_bn
                      1024) -> squeeze (batch, 1024), before the  (batch, 2, 2, 288)
                      dropout (auto-named: activation_<n>)        (auto-named: activation_<n>)
    ResNet50V2        avg_pool (batch, 2048)                      conv4_block6_1_relu (batch, 2, 2, 256)
    DenseNet121       avg_pool (batch, 1024)                      pool4_conv (batch, 2, 2, 512)
    EfficientNetB0    avg_pool (batch, 1280), before top_dropout  block6a_expand_activation (batch, 2, 2, 672)
    ConvNeXtTiny      convnext_tiny_head_layernorm (batch, 768)   the `add` closing stage 2's last block
                                                                  (batch, 2, 2, 384) (a keras.ops op: add_<n>)

With `classifier_activation="softmax"` the embedding and spatial map are the
same and the logits are exact: the input of MobileNetV3Small's separate softmax
layer `predictions`, the others' Dense `predictions` (ConvNeXt's
`convnext_tiny_head_dense`) recomputed without its softmax.

At 32x32 these networks end in 1x1 maps, so the spatial map is the last 2x2
map, often inside the block that downsamples it to 1x1 (the rule takes the
last such layer, not the last block output). An `include_top=False` base nested in a Sequential or functional
model with pooling and a Dense head resolves to the same layers; when the base's
own output is 1x1 its inner map is read by applying the base's layers up to it
to the tensor that feeds the base (`"mobilenetv2_1.00_32/block_13_expand_relu"`),
a second pass through those layers with shared weights. That pass costs their
compute again, draws its own dropout masks, and in training a BatchNormalization
among them updates its moving statistics once more per step; name an outer
layer to avoid it.

A model without a graph (a subclassed `keras.Model`) has no layers to read:
`"logits"` is its output; other outputs come from its `call` returning a dict
(`{"logits": ..., "embedding": ...}`) or from a callable passed as `named`
(`fn(x, training=False) -> dict`), through `CallFeatures`.

Images are channels-last `(batch, H, W, C)`, as everywhere in this library.

The parts, each its own module: `kdtoolkit.model_graph` (a model's graph as the
calls of its layers, nested models included; finding a named layer; the one-line
`FeatureError`), `kdtoolkit.classifier_head` (the walk back from the output to
the classifier; a softmax output read as logits), `kdtoolkit.feature_rules` (the
rules picking the embedding and the spatial map, and the hint's source). This
module puts them together into the feature model, and `CallFeatures` reads a
model without a graph.
"""

import keras

from kdtoolkit.classifier_head import logits_tensor
from kdtoolkit.feature_rules import embedding_tensor, has_spatial, spatial_map, spatial_tensor
from kdtoolkit.model_graph import FeatureError, find_site, graph_inputs, producer, shape_text, site_text

FEATURES = ("logits", "embedding", "spatial", "hint")


def hint_choice(model, named, hint_from=None, role="teacher"):
    """`(source, layer)` of FitNets' hint: `named["hint"]` read as a map or a vector,
    else the spatial map or embedding (`hint_from`; None: the spatial map if `model`
    has one), named or default (layer None)."""
    if "hint" in named:
        layer = named["hint"]
        source = hint_from or ("spatial" if spatial_map(find_site(model, layer, role, "hint").output.shape)
                               else "embedding")
        return source, layer
    source = hint_from or ("spatial" if has_spatial(model, named) else "embedding")
    return source, named.get(source)


def resolve(model, feature, layer, role):
    """`(tensor, description)` of `feature` (`"embedding"` or `"spatial"`) of `model`."""
    if feature == "spatial":
        return spatial_tensor(model, layer, role)
    return embedding_tensor(model, layer, role)


def feature_model(model, wanted, named=None, hint_from=None, role="teacher"):
    """`(features, descriptions)`: `features` maps input `x` to `{name: tensor}` for each
    of `wanted` (from `"logits"`, `"embedding"`, `"spatial"`, `"hint"`) sharing `model`'s
    layers, and `descriptions` says for each name which layer was read, e.g.
    `"post_relu (batch, 1, 1, 2048) -> squeeze (batch, 2048)"`.

    `named`: `{name: layer name, path or index}` over the defaults (a named `"spatial"`
    or `"embedding"` also serves as the hint read from it), or a callable
    `fn(x, training=False) -> {name: tensor}` (for subclassed models). `hint_from`:
    `"spatial"` or `"embedding"`, the hint's source (`feature_rules.hint_source` of
    both models); None: the spatial map if `model` has one. `role`: `"teacher"` or
    `"student"`, for the messages (a student must return logits).

    A functional or Sequential model gives a `keras.Model`; a subclassed model a
    `CallFeatures`."""
    wanted = tuple(wanted)
    unknown = sorted(set(wanted) - set(FEATURES))
    if unknown:
        raise FeatureError(f"unknown feature {unknown[0]!r}; features are {', '.join(FEATURES)}")
    inputs = graph_inputs(model)
    if inputs is None and named and not callable(named):
        raise FeatureError(f"{role} {model.name} has no layers to name (a subclassed model): return a dict "
                           f"{{'logits': ..., 'embedding': ...}} from its call, or pass a callable "
                           f"{role}_features=fn with fn(x, training=False) returning that dict")
    if callable(named) or inputs is None:
        features = CallFeatures(model, wanted, named if callable(named) else None, hint_from, role)
        return features, features.descriptions
    named = dict(named or {})
    outputs, descriptions, resolved = {}, {}, {}
    for name in wanted:
        if name == "logits":
            outputs[name], note = logits_tensor(model, role)
            descriptions[name] = site_text(producer(model.outputs[0])) + (f" ({note})" if note else "")
            continue
        source, layer = hint_choice(model, named, hint_from, role) if name == "hint" else (name, named.get(name))
        if (source, layer) not in resolved:  # the hint shares the tensor of the same source
            resolved[source, layer] = resolve(model, source, layer, role)
        outputs[name], descriptions[name] = resolved[source, layer]
    features = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=f"{model.name}_features")
    return features, descriptions


class CallFeatures:
    """`x -> {name: tensor}` of a model without a graph (a subclassed `keras.Model`):
    the model's output as `"logits"`, the other names from the dict its `call`
    returns, or everything from `fn(x, training=False) -> dict`. Shapes are checked
    (statically) at each call: logits `(batch, K)`, an embedding `(batch, D)` (a
    4-D one averaged over H and W, as for functional models), a spatial map
    `(batch, H, W, C)` with H, W > 1. A plain callable, not a layer: the model (or
    `fn`'s owner) holds the weights."""

    def __init__(self, model, wanted, fn=None, hint_from=None, role="teacher"):
        self.model, self.fn, self.wanted = model, fn, tuple(wanted)
        self.hint_from, self.role = hint_from, role
        source = f"{getattr(fn, '__name__', 'fn')}(x)" if fn is not None else f"{model.name}(x)"
        self.descriptions = {name: f"{source}[{name!r}]" for name in self.wanted}

    def __call__(self, x, training=False):
        if self.fn is not None:
            returned = self.fn(x, training=training)
        else:
            returned = self.model(x, training=training)
        if not isinstance(returned, dict):
            extra = sorted(set(self.wanted) - {"logits"})
            if extra:
                raise FeatureError(f"{self.role} {self.model.name} has no layers to read {', '.join(extra)} from "
                                   "(a subclassed model): return a dict {'logits': ..., "
                                   f"'{extra[0]}': ...}} from its call, or pass a callable "
                                   f"{self.role}_features=fn with fn(x, training=False) returning that dict")
            returned = {"logits": returned}
        return {name: self.checked(name, returned) for name in self.wanted}

    def checked(self, name, returned):
        """`returned[name]` (the hint from its source) checked for its rank."""
        key = name
        if name == "hint" and "hint" not in returned:
            key = self.hint_from or ("spatial" if "spatial" in returned else "embedding")
        if key not in returned:
            raise FeatureError(f"{self.role} {self.model.name}: its features have no {key!r} (they have "
                               f"{', '.join(returned)}); return it from call or from the callable "
                               f"{self.role}_features")
        tensor, shape = returned[key], tuple(returned[key].shape)
        where = f"{self.role} {self.model.name}: {key!r} {shape_text(shape)}"
        if key == "logits" and len(shape) != 2:
            raise FeatureError(f"{where} is not (batch, classes) logits")
        if key == "embedding" and len(shape) == 4:
            return keras.ops.mean(tensor, axis=(1, 2))
        if key == "embedding" and len(shape) != 2:
            raise FeatureError(f"{where} is not a vector (batch, D) or a map (batch, H, W, C)")
        if key == "spatial" and not spatial_map(shape):
            raise FeatureError(f"{where} is not a map (batch, H, W, C) with H, W > 1")
        return tensor
