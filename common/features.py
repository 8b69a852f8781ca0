"""Which tensor of a Keras model a distillation method reads, by a checked rule.

A method reads up to four outputs of a model (`feature_model`):

- `"logits"` `(batch, K)`: the model's output. A softmax output is converted
  back to logits for a teacher (`logits_tensor`: exactly where the softmax is
  a separate last layer or fused into the last Dense / Conv2D, else as
  log-probabilities, which softmax maps to the same probabilities); a student
  must return logits.
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
  embedding (`hint_source`).

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
"""

import dataclasses
import difflib

import keras
import numpy as np

from kdtoolkit.errors import ConfigError

FEATURES = ("logits", "embedding", "spatial", "hint")
PASS_THROUGH = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.GaussianNoise,
                keras.layers.AlphaDropout, keras.layers.ActivityRegularization, keras.layers.Identity)
RESHAPES = (keras.layers.Flatten, keras.layers.Reshape)
CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


class FeatureError(ConfigError):
    """A feature the model does not have, or a named layer that is not one."""


@dataclasses.dataclass(frozen=True)
class Site:
    """One call of `layer` (its `node`) in a model's graph; `parents` are the nested
    models it lies in, outermost first, each with its node in the enclosing graph."""

    layer: object
    node: object
    parents: tuple = ()

    @property
    def path(self):
        """`"outer_model/inner_layer"` for a layer of a nested model, else its name."""
        return "/".join([parent.name for parent, _ in self.parents] + [self.layer.name])

    @property
    def output(self):
        """Its symbolic output, in the graph of the innermost parent."""
        return self.node.output_tensors[0]


# The graph


# The walks below read Keras' own graph bookkeeping, as `keras.Function` does: a
# symbolic tensor's `_keras_history` (the layer and which of its calls made it) and
# a layer's `_inbound_nodes` (its calls). A layer's public `.output` is its first
# call's only, and a nested model's `.input` its own Input, not what feeds it.


def producer(tensor, parents=()):
    """The `Site` that computed symbolic `tensor` (in the graph of `parents[-1]`)."""
    layer, node_index, _ = tensor._keras_history
    return Site(layer, layer._inbound_nodes[node_index], parents)


def is_nested(layer):
    """Whether `layer` is a functional or Sequential model with one input and one output."""
    return isinstance(layer, keras.Model) and len(graph_inputs(layer) or ()) == 1 and len(layer.outputs) == 1


def graph_inputs(model):
    """`model.inputs`, or None for a model without a graph (subclassed, unbuilt Sequential)."""
    try:
        return model.inputs or None
    except (AttributeError, ValueError):
        return None


def sites(model, parents=()):
    """Every `Site` of `model`'s graph in its topological order (`model.operations`:
    its layers and the `keras.ops` between them, such as a residual block's closing
    `add`), the input layers excepted; a nested model's sites come just before its own."""
    in_graph, pending = set(), list(model.outputs)
    while pending:
        site = producer(pending.pop(), parents)
        if id(site.node) not in in_graph:
            in_graph.add(id(site.node))
            pending.extend(site.node.input_tensors)
    found = []
    for layer in getattr(model, "operations", None) or model.layers:
        for node in layer._inbound_nodes:
            if id(node) in in_graph and not isinstance(layer, keras.layers.InputLayer):
                if is_nested(layer):
                    found.extend(sites(layer, parents + ((layer, node),)))
                found.append(Site(layer, node, parents))
    return found


def lift(site, tensor):
    """`tensor` of `site`'s innermost graph as a tensor of the outermost model, and the
    nested models applied a second time to get it (empty when it is a nested model's
    own output)."""
    second_pass = []
    for parent, node in reversed(site.parents):
        if tensor is parent.outputs[0]:
            tensor = node.output_tensors[0]
            continue
        training = {k: v for k, v in node.arguments.kwargs.items() if k == "training"}
        name = f"{parent.name}_up_to_{site.layer.name}"
        inner = keras.Model(parent.inputs[0], tensor, name=f"{name}_{keras.backend.get_uid(name)}")
        tensor = inner(node.input_tensors[0], **training)
        second_pass.append(parent.name)
    return tensor, second_pass


# Descriptions and errors


def shape_text(shape):
    """`(batch, 2, 2, 576)` for a shape `(None, 2, 2, 576)`."""
    return "(" + ", ".join(["batch", *("?" if d is None else str(d) for d in tuple(shape)[1:])]) + ")"


def site_text(site):
    return f"{site.path} {shape_text(site.output.shape)}"


def refuse(model, role, feature, what, candidates=()):
    """A one-line `FeatureError`: `what` is wrong with `feature` of `model`; how to name another layer."""
    listed = f"; candidates: {', '.join(site_text(s) for s in candidates)}" if candidates else ""
    return FeatureError(f"{role} {model.name}: {what}; name another layer, e.g. "
                        f"{role}_features={{'{feature}': '<layer name>'}}{listed}")


def find_site(model, layer, role="teacher", feature="embedding"):
    """The `Site` of `layer` in `model`: an index into `model.layers`, a layer name, a
    path `"nested_model/layer"`, or the name of a layer of a nested model (when only
    one nested model has it)."""
    everything = sites(model)
    if isinstance(layer, (int, np.integer)):
        try:
            target = model.layers[layer]
        except IndexError:
            raise refuse(model, role, feature, f"has no layer index {layer} ({len(model.layers)} layers)") from None
        matches = [s for s in everything if s.layer is target and not s.parents]
    else:  # a path, else the name of a layer at any depth (names have no "/")
        matches = [s for s in everything if s.path == layer] or [s for s in everything if s.layer.name == layer]
    if len({s.path for s in matches}) > 1:
        raise refuse(model, role, feature, f"{layer!r} names {len(matches)} layers, give its path",
                     matches[:4])
    if not matches:
        close = difflib.get_close_matches(str(layer), [s.path for s in everything], n=4, cutoff=0.5)
        raise refuse(model, role, feature, f"has no layer {layer!r}",
                     [s for s in everything if s.path in close])
    return matches[0]


# Logits


def is_softmax(function):
    return function is keras.activations.softmax or getattr(function, "__name__", None) == "softmax"


def softmax_layer(layer):
    """Whether `layer` is a separate softmax over the last axis."""
    if isinstance(layer, keras.layers.Softmax):
        return layer.axis in (-1, [-1], (-1,))
    return isinstance(layer, keras.layers.Activation) and is_softmax(layer.activation)


def pass_through(layer):
    """Whether `layer` only reshapes, or is the identity at inference."""
    identity = isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.linear
    return identity or isinstance(layer, PASS_THROUGH + RESHAPES)


@dataclasses.dataclass(frozen=True)
class Head:
    """How `model` computes its output: `classifier` (the Site producing the logits,
    or whatever layer ends the walk back), the separate `softmax` Site (or None), and
    every Site between the classifier and the output (`trail`)."""

    classifier: Site
    softmax: object
    trail: tuple


def head(model):
    """The `Head` of a functional or Sequential `model` with one `(batch, K)` output;
    the walk back enters a nested model whose output is the model's."""
    site, trail, softmax = producer(model.outputs[0]), [], None
    while True:
        if is_nested(site.layer):
            trail.append(site)
            site = producer(site.layer.outputs[0], site.parents + ((site.layer, site.node),))
            continue
        if softmax is None and softmax_layer(site.layer):
            softmax = site
        elif not pass_through(site.layer):
            return Head(site, softmax, tuple(trail))
        trail.append(site)
        site = producer(site.node.input_tensors[0], site.parents)


def output_tensor(model, role):
    """`model`'s single output, checked to be `(batch, K)`."""
    if len(model.outputs) != 1:
        raise FeatureError(f"{role} {model.name} has {len(model.outputs)} outputs; distillation reads one "
                           "(batch, classes) logits output: give the classifier model alone")
    output = model.outputs[0]
    if len(output.shape) != 2:
        raise FeatureError(f"{role} {model.name}: its output {shape_text(output.shape)} is not (batch, classes) "
                           "logits; end the model with a Dense layer or a Flatten after the classifier")
    return output


def classes_of(shape, classes):
    """Whether `shape` is `(batch, 1, ..., 1, classes)`: the logits, maybe with unit axes."""
    return shape[-1] == classes and all(d == 1 for d in shape[1:-1])


def as_classes(tensor, classes):
    """`tensor` `(batch, 1, ..., 1, K)` as `(batch, K)`."""
    if len(tensor.shape) == 2:
        return tensor
    return keras.ops.reshape(tensor, (-1, classes))


def pre_activation(layer, x):
    """What Dense or Conv2D `layer` computes from `x` before its activation (as its `call`)."""
    if isinstance(layer, keras.layers.Dense):
        y = keras.ops.matmul(x, layer.kernel)
        return y if layer.bias is None else keras.ops.add(y, layer.bias)
    y = layer.convolution_op(x, layer.kernel)
    return y if not layer.use_bias else keras.ops.add(y, keras.ops.reshape(layer.bias, (1, 1, 1, layer.filters)))


def exact_pre_activation(site):
    """Whether `pre_activation` recomputes `site`'s layer exactly (Dense, or Conv2D
    channels-last without groups; not quantized) in the outermost graph (no nesting)."""
    layer = site.layer
    plain = getattr(layer, "quantization_mode", None) is None and not site.parents
    if isinstance(layer, keras.layers.Dense):
        return plain
    return (plain and isinstance(layer, keras.layers.Conv2D) and layer.groups == 1
            and layer.data_format == "channels_last")


def logits_tensor(model, role="teacher"):
    """`(logits, note)`: the symbolic `(batch, K)` class logits of functional or
    Sequential `model`, and one sentence saying how a softmax output was converted
    (None when the output is the logits). A student's softmax output is refused."""
    output = output_tensor(model, role)
    classes = output.shape[-1]
    found = head(model)
    fused = is_softmax(getattr(found.classifier.layer, "activation", None))
    if found.softmax is None and not fused:
        return output, None
    where = found.softmax or found.classifier
    if role == "student":
        raise FeatureError(f"student {model.name}: its output is a softmax ({where.path}), but a trained student must "
                           "return logits; build it with classifier_activation=None or a Dense without activation")
    if found.softmax is not None and not found.softmax.parents and classes_of(found.softmax.output.shape, classes):
        logits = as_classes(found.softmax.node.input_tensors[0], classes)
        return logits, f"{role} {model.name}: read the logits at the input of its softmax layer {where.path} (exact)"
    if found.softmax is None and exact_pre_activation(found.classifier) and classes_of(
            found.classifier.output.shape, classes):
        logits = as_classes(pre_activation(found.classifier.layer, found.classifier.node.input_tensors[0]), classes)
        return logits, (f"{role} {model.name}: recomputed the logits of {where.path} without its softmax "
                        "from its input, kernel and bias (exact)")
    tiny = float(np.finfo(keras.backend.standardize_dtype(output.dtype)).tiny)
    logits = keras.ops.log(keras.ops.maximum(output, tiny))
    return logits, (f"{role} {model.name}: its output ends in a softmax ({where.path}) that cannot be undone "
                    "exactly; read log-probabilities, which softmax maps to the same probabilities")


# Embedding


def unit_map(shape):
    return len(shape) == 4 and shape[1] == 1 and shape[2] == 1


def as_vector(site, tensor, model, role, feature="embedding"):
    """`(tensor as (batch, D), what was done)`: 2-D as is, a `(batch, 1, 1, C)` map
    squeezed, a `(batch, H, W, C)` map averaged over H and W; other ranks refused."""
    shape = tensor.shape
    if len(shape) == 2:
        return tensor, ""
    if unit_map(shape):
        vector = keras.ops.reshape(tensor, (-1, shape[3]))
        return vector, f" -> squeeze {shape_text(vector.shape)}"
    if len(shape) == 4:
        vector = keras.ops.mean(tensor, axis=(1, 2))
        return vector, f" -> global average pool {shape_text(vector.shape)}"
    raise refuse(model, role, feature, f"layer {site.path} {shape_text(shape)} is not a vector (batch, D) "
                 "or a map (batch, H, W, C)")


def representation(site):
    """The Site before `site` whose output is the same representation without Dropout,
    Flatten, Reshape or identity layers (Flatten and Reshape only where they drop unit axes)."""
    while pass_through(site.layer):
        source = site.node.input_tensors[0]
        if isinstance(site.layer, RESHAPES) and not (len(source.shape) == 2 or unit_map(source.shape)):
            break
        site = producer(source, site.parents)
    return site


def classifier(model, role="teacher"):
    """The Site of the Dense or Conv2D layer producing `model`'s K logits."""
    classes = output_tensor(model, role).shape[-1]
    site = head(model).classifier
    if not isinstance(site.layer, (keras.layers.Dense, keras.layers.Conv2D)) or site.output.shape[-1] != classes:
        raise refuse(model, role, "embedding", f"its logits come from {site_text(site)} "
                     f"({type(site.layer).__name__}), not a Dense or Conv2D classifier of {classes} classes, so "
                     "the embedding before it is not known", candidates(model, vectors=True))
    return site


def logits_sites(model):
    """The Sites that are the logits: the classifier (when found) and every layer after it."""
    found = head(model)
    return {id(s.node) for s in (found.classifier, *found.trail)} | {id(producer(model.outputs[0]).node)}


def candidates(model, vectors=False, count=4):
    """The last `count` Sites with a usable map (or, with `vectors`, a vector or map) output."""
    logits = logits_sites(model)
    usable = [s for s in sites(model) if id(s.node) not in logits and len(s.node.output_tensors) == 1
              and (len(s.output.shape) in ((2, 4) if vectors else (4,)))
              and (vectors or spatial_map(s.output.shape))]
    return usable[-count:]


def embedding_tensor(model, layer=None, role="teacher"):
    """`(embedding, description)`: the symbolic `(batch, D)` penultimate representation
    of `model` (module docstring), or the output of `layer` (a name, path or index)
    put through the same rank rule. Never the logits."""
    if layer is None:
        found = classifier(model, role)
        site = representation(producer(found.node.input_tensors[0], found.parents))
    else:
        site = find_site(model, layer, role, "embedding")
        if id(site.node) in logits_sites(model):
            raise refuse(model, role, "embedding", f"layer {site_text(site)} is the logits, not the representation "
                         "before them", candidates(model, vectors=True))
    tensor, second_pass = lift(site, site.output)
    vector, done = as_vector(site, tensor, model, role)
    return vector, site_text(site) + done + passes_text(second_pass)


def passes_text(second_pass):
    return "".join(f" (a second pass through {name}'s layers up to it)" for name in second_pass)


# Spatial


def spatial_map(shape):
    """Whether `shape` is `(batch, H, W, C)` with H and W known and > 1."""
    return len(shape) == 4 and shape[1] is not None and shape[2] is not None and shape[1] > 1 and shape[2] > 1


def feature_maps(model):
    """The Sites whose output is a spatial map, at or after the first convolution, zero
    padding excepted: those of `model`'s own layers, or where it has none, those of
    the nested models in it (the fewest levels down)."""
    found, convolved = [], False
    for site in sites(model):
        convolved = convolved or isinstance(site.layer, CONVOLUTIONS)
        if (convolved and len(site.node.output_tensors) == 1 and spatial_map(site.output.shape)
                and not isinstance(site.layer, keras.layers.ZeroPadding2D)):
            found.append(site)
    shallowest = min((len(site.parents) for site in found), default=0)
    return [site for site in found if len(site.parents) == shallowest]


def spatial_tensor(model, layer=None, role="teacher"):
    """`(map, description)`: the symbolic `(batch, H, W, C)` map, H, W > 1, of the last
    such layer of `model` (module docstring) or of `layer` (a name, path or index)."""
    site = spatial_site(model, layer, role)
    tensor, second_pass = lift(site, site.output)
    return tensor, site_text(site) + passes_text(second_pass)


def spatial_site(model, layer=None, role="teacher"):
    """The Site `spatial_tensor` reads."""
    if layer is None:
        maps = feature_maps(model)
        if not maps:
            raise refuse(model, role, "spatial", "has no layer with a (batch, H, W, C) output with H, W > 1 after "
                         "a convolution")
        site = maps[-1]
    else:
        site = find_site(model, layer, role, "spatial")
        shape = site.output.shape
        if id(site.node) in logits_sites(model):
            raise refuse(model, role, "spatial", f"layer {site_text(site)} is the logits, not a feature map",
                         feature_maps(model)[-3:])
        if not spatial_map(shape):
            what = "a 1x1 map" if unit_map(shape) else "not a map"
            raise refuse(model, role, "spatial", f"layer {site_text(site)} is {what}, not (batch, H, W, C) with "
                         "H, W > 1", feature_maps(model)[-3:])
    return site


def has_spatial(model, named=None):
    """Whether `model` has a spatial map (named in `named` or by default)."""
    if graph_inputs(model) is None:
        return False
    named = dict(named or {}) if not callable(named) else {}
    try:
        spatial_site(model, named.get("spatial"))
    except ConfigError:
        return False
    return True


def hint_source(teacher, student, teacher_named=None, student_named=None):
    """FitNets' hint: `"spatial"` when both models have a spatial map, else `"embedding"`."""
    both = has_spatial(teacher, teacher_named) and has_spatial(student, student_named)
    return "spatial" if both else "embedding"


# The feature model


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
    `"spatial"` or `"embedding"`, the hint's source (`hint_source` of both models);
    None: the spatial map if `model` has one. `role`: `"teacher"` or `"student"`, for
    the messages (a student must return logits).

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
