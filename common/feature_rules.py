"""The rules that pick a model's `"embedding"` and `"spatial"` map, or check a named
layer as one, and the source of FitNets' hint; never silently the wrong tensor.

- `embedding_tensor`: `(batch, D)`, the input of the classifier
  (`kdtoolkit.classifier_head`), taken before Dropout, Flatten, Reshape and
  identity layers; a `(batch, 1, 1, C)` map is squeezed to `(batch, C)`, a
  `(batch, H, W, C)` map averaged over H and W. A named layer that is the logits
  (the classifier or a layer after it) is refused.
- `spatial_tensor`: `(batch, H, W, C)` with H, W > 1, the output of the last such
  layer at or after the first convolution (zero padding excepted), among the
  model's own layers or, where it has none, those of the models nested in it (the
  fewest levels down). A named 1x1 map, vector or the logits is refused.
- `hint_source`: `"spatial"` when both models have such a map, else `"embedding"`.

What the defaults resolve to on `keras.applications` is tabled in
`kdtoolkit.features`' docstring (common/features.py).
"""

import keras

from kdtoolkit.classifier_head import RESHAPES, head, output_tensor, pass_through
from kdtoolkit.errors import ConfigError
from kdtoolkit.model_graph import (find_site, graph_inputs, lift, passes_text, producer, refuse, shape_text, site_text,
                                   sites)

CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


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
