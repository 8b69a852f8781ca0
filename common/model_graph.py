"""A Keras model's graph read as `Site`s: every call of a layer (or of a `keras.ops`
operation) in a functional or Sequential model, those inside nested models
included, found by a layer's name, path or index; and the one-line refusals.

A `Site` is one call (`node`) of a `layer`; its `output` is the symbolic tensor
that call made, of whatever shape: a map `(batch, H, W, C)`, a vector
`(batch, D)`, the logits `(batch, K)`. Its `path` names it:
`"block_13_expand_relu"`, or `"mobilenetv2_1.00_32/block_13_expand_relu"` for a
layer of a nested model. `lift` turns a nested model's inner tensor into a tensor
of the outermost model, by a second pass through the nested model's layers up to
it (`kdtoolkit.features` says what that costs).

A refusal (`refuse`) is one `FeatureError` line naming the model, what is wrong,
how to name another layer, and candidates as `path (batch, 2, 2, 576)`
(`shape_text`).
"""

import dataclasses
import difflib

import keras
import numpy as np

from kdtoolkit.errors import ConfigError


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


def passes_text(second_pass):
    return "".join(f" (a second pass through {name}'s layers up to it)" for name in second_pass)


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
