"""TEMPORARY: the old feature rules, until common/features.py lands."""
import keras
from common.errors import ConfigError
def layer_output(model, layer):
    """The symbolic output of `layer` (a name or an index) of a built functional or
    Sequential `model`; raises `ConfigError` naming the layers when there is none."""
    try:
        return (model.get_layer(layer) if isinstance(layer, str) else model.layers[layer]).output
    except (ValueError, IndexError):
        names = ", ".join(l.name for l in model.layers)
        raise ConfigError(f"{model.name} has no layer {layer!r}; its layers are {names}") from None


def default_features(model):
    """`{"embedding", "spatial" (if any)}` symbolic tensors of `model` (see the module docstring)."""
    found = {"embedding": model.layers[-1].input}
    maps = [l for l in model.layers if len(l.output.shape) == 4]
    if maps:
        found["spatial"] = maps[-1].output
    return found


def feature_model(model, wanted, named=None, hint_from=None):
    """`x -> {name: tensor}` for each of `wanted` (`"logits"`, `"embedding"`,
    `"spatial"`, `"hint"`) sharing `model`'s layers; `named` overrides the default
    layer of a name; `hint_from`: which of `"spatial"` / `"embedding"` is the hint."""
    named = dict(named or {})
    if not model.built or not model.inputs:
        raise ConfigError(f"{model.name} is not a built functional or Sequential model: give it an Input first")
    defaults = default_features(model)
    outputs = {}
    for name in wanted:
        key = hint_from if name == "hint" and "hint" not in named else name
        if name == "logits":
            outputs[name] = model.outputs[0]
        elif name in named:
            outputs[name] = layer_output(model, named[name])
        elif key in named:
            outputs[name] = layer_output(model, named[key])
        elif key in defaults:
            outputs[name] = defaults[key]
        else:
            raise ConfigError(f"{model.name} has no 4-D feature map for {name!r}: name a layer, e.g. "
                              f"features={{'{name}': '<layer name>'}}")
    return keras.Model(model.inputs, outputs, name=f"{model.name}_features")



_feature_model = feature_model


def feature_model(model, wanted, named=None, hint_from=None, role="teacher"):
    return _feature_model(model, wanted, named, hint_from), {}


def logits_tensor(model, role):
    return None, None


def hint_source(teacher, student, teacher_features, student_features):
    both = all("spatial" in default_features(m) or "spatial" in (named or {})
               for m, named in ((teacher, teacher_features), (student, student_features)))
    return "spatial" if both else "embedding"
