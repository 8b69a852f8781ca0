"""The classifier head of a functional or Sequential model with one `(batch, K)`
output: where its logits come from, and a softmax output read back as logits.

`head(model)` walks back from the output over a separate softmax and over layers
that only reshape or are the identity at inference (Dropout and the like,
Flatten, Reshape: `pass_through`), entering a nested model whose output is the
model's, to the classifier: the Dense or Conv2D producing the K logits (its
output `(batch, K)` or `(batch, 1, 1, K)`).

`logits_tensor(model)` gives the symbolic `(batch, K)` logits of a teacher whose
output is a softmax: exactly, at the input of a separate softmax layer or by
recomputing a softmax-fused Dense / Conv2D without its activation
(`pre_activation`); else as log-probabilities `log(max(p, tiny))`, which softmax
maps to the same probabilities. A student's softmax output is refused.
"""

import dataclasses

import keras
import numpy as np

from kdtoolkit.model_graph import FeatureError, Site, is_nested, producer, shape_text

PASS_THROUGH = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.GaussianNoise,
                keras.layers.AlphaDropout, keras.layers.ActivityRegularization, keras.layers.Identity)
RESHAPES = (keras.layers.Flatten, keras.layers.Reshape)


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
