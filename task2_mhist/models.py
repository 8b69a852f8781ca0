"""Task 2 models: a `keras.applications` base (no top) with a small head.

Every model takes RGB pixels in [0, 255] and applies its own architecture's
ImageNet preprocessing inside, so one data pipeline (and one cache of a teacher's
logits) serves every architecture. BatchNorm runs in inference mode while the
base is frozen (feature extraction). A pretrained base (ImageNet or a weights
file) is wrapped in `InferenceMode`, so its BatchNorm statistics also stay fixed
while fine-tuning (its weights, BatchNorm scale and offset included, still
train), as the Keras transfer-learning guide recommends; a randomly initialised
base has no statistics to keep, so its BatchNorm layers learn theirs while
fine-tuning.
"""

import warnings

import keras
from keras import layers

from kdtoolkit import deployed
from kdtoolkit.errors import DataError

# name -> (constructor, preprocessing mode of keras.applications)
ARCHITECTURES = {
    "resnet50v2": (keras.applications.ResNet50V2, "tf"),
    "mobilenetv2": (keras.applications.MobileNetV2, "tf"),
    "densenet121": (keras.applications.DenseNet121, "torch"),
}
TEACHER, STUDENT, ASSISTANT = "resnet50v2", "mobilenetv2", "densenet121"
BASE_NAME = "base"  # outputs the last feature map, (batch, S/32, S/32, C)
POOLED = "pooled"  # its global average, (batch, C): the features the head reads


@keras.saving.register_keras_serializable(package="kd_toolkit")
class InferenceMode(layers.Layer):
    """Runs `base` with `training=False` whatever mode the enclosing model is called in.

    Writing `base(x, training=False)` inside a functional model is not enough in
    Keras 3: calling the model with `training=True` overrides it for the nested
    call (keras-team/keras#20285), so BatchNorm would use and update batch
    statistics while fine-tuning. This layer's `call` takes no `training`
    argument, so the outer mode stops here.
    """

    def __init__(self, base, **kwargs):
        super().__init__(**kwargs)
        self.base = base

    def call(self, inputs):
        return self.base(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.base.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "base": keras.saving.serialize_keras_object(self.base)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("base")), **config)


def preprocessing(mode):
    """ImageNet preprocessing as layers: 'tf' -> [-1, 1]; 'torch' -> (x/255 - mean) / std."""
    if mode == "tf":
        return [layers.Rescaling(1 / 127.5, offset=-1.0)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return [layers.Rescaling(1 / 255.0),
            layers.Normalization(mean=mean, variance=[s * s for s in std])]


def build(architecture, weights="imagenet", image_size=224, num_outputs=2, dropout=0.2, name=None):
    """`(batch, S, S, 3)` pixels -> `(batch, num_outputs)` logits.

    `weights`: "imagenet" (Keras download), "none" (random init), a folder holding
    Keras' no-top ImageNet files under their Keras names (`keras_weights_file`; one
    folder serves every architecture), or a weights file of this base.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    constructor, mode = ARCHITECTURES[architecture]
    resolved = resolve_weights(weights, architecture, image_size)
    base = make_base(constructor, architecture, weights, resolved, image_size)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    for layer in preprocessing(mode):
        x = layer(x)
    x = InferenceMode(base, name=BASE_NAME)(x) if resolved is not None else base(x)
    x = layers.GlobalAveragePooling2D(name=POOLED)(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or architecture)


def make_base(constructor, architecture, weights, resolved, image_size):
    """The `keras.applications` base; `resolved` is `resolve_weights(weights, ...)`."""
    try:
        with warnings.catch_warnings():  # a mismatched file makes Keras warn once per layer
            warnings.simplefilter("ignore")
            base = constructor(include_top=False, weights=resolved, input_shape=(image_size, image_size, 3))
    except Exception as err:  # download and load failures surface as several exception types
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0][:200] if lines else type(err).__name__
        if resolved == "imagenet":
            raise DataError(
                f"could not get ImageNet weights for {architecture} ({reason}); pass --weights DIR (a folder "
                f"holding {keras_weights_file(architecture, image_size)} and the other bases' Keras no-top "
                f"files), --weights PATH (one file of this base) or --weights none"
            ) from None
        if resolved is not None:
            raise DataError(
                f"--weights {weights}: not the weights of {architecture} without top ({reason}); use its Keras "
                f"no-top file {keras_weights_file(architecture, image_size)}, a folder of such files, imagenet or none"
            ) from None
        raise
    base.name = BASE_NAME
    return base


def keras_weights_file(architecture, image_size=224):
    """The name Keras gives the no-top ImageNet weights of `architecture` (what
    `weights="imagenet"` downloads to `~/.keras/models/`). MobileNetV2 has one file
    per input size in 96/128/160/192/224 and uses the 224 one for other sizes."""
    if architecture == "mobilenetv2":
        rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
    return f"{architecture}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def resolve_weights(weights, architecture, image_size=224):
    """'imagenet' | 'none' | folder | file -> the value `keras.applications` expects."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    from pathlib import Path

    path = Path(weights).expanduser()
    if path.is_dir():
        path = path / keras_weights_file(architecture, image_size)
        if not path.is_file():
            raise DataError(f"--weights {weights}: {path.name} (the Keras no-top weights of {architecture}) "
                            "is not in that folder; add it or use imagenet or none")
    elif not path.is_file():
        raise DataError(f"--weights {weights}: no such file or folder; use imagenet, none, a folder of Keras "
                        "no-top weight files or a weights file")
    return str(path)


def base_of(model):
    """The `keras.applications` base inside `model` (unwrapped from `InferenceMode`;
    `model` may be a student with a method's prediction head, `kdtoolkit.deployed`)."""
    inner = deployed.student_features(model)
    layer = (model if inner is None else inner).get_layer(BASE_NAME)
    return layer.base if isinstance(layer, InferenceMode) else layer


def _layer_chain(model):
    """`model`'s layers in call order (Task 2 models are one chain), without the input."""
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def feature_model(model):
    """`x -> {"logits", "embedding": pooled features (batch, C), "spatial": the base's
    last feature map (batch, h, w, C), "hint": FitNets' hint, the pooled features}`,
    sharing `model`'s layers. (The chain is called anew: a nested base's own
    `output` is that of its inner graph.)"""
    x = pixels = keras.Input(model.input_shape[1:])
    outputs = {}
    for layer in _layer_chain(model):
        x = layer(x)
        if layer.name in (BASE_NAME, POOLED):
            outputs["spatial" if layer.name == BASE_NAME else "embedding"] = x
    outputs["hint"] = outputs["embedding"]
    return keras.Model(pixels, {"logits": x, **outputs}, name=f"{model.name}_features")


def student_branches(teacher, width=1280, num_outputs=2, dropout=0.2):
    """SFTN's cut and student branch (`kdtoolkit.methods.sftn`): both models are split
    into two blocks, base (to the pooled features) | head (Dropout, Dense logits),
    so there is one cut, the teacher's pooled features (2,048 for ResNet50V2). Its
    branch is the transform Dense `width` + BatchNorm + ReLU (into MobileNetV2's
    1,280 pooled features, in place of its base), then a fresh student head. Cuts
    inside the bases are not made: their maps at 224 px would multiply the cost of
    the teacher's training on a CPU. Returns `(cuts, (branch,))`, `cuts`:
    `x -> {"logits", "cut_1"}` over `teacher`'s layers."""
    features = feature_model(teacher)
    cuts = keras.Model(features.inputs, {"logits": features.output["logits"], "cut_1": features.output["embedding"]},
                       name=f"{teacher.name}_cuts")
    branch = keras.Sequential([keras.Input((features.output["embedding"].shape[-1],)), layers.Dense(width),
                               layers.BatchNormalization(), layers.ReLU(), layers.Dropout(dropout),
                               layers.Dense(num_outputs)], name="sftn_branch_1")
    return cuts, (branch,)


def split_at_base(model):
    """`(features, head)`, two models sharing `model`'s layers: pixels -> the base's
    pooled features `(batch, D)` (preprocessing included), and features -> outputs.
    `head(features(x))` is `model(x)`; training `head` trains `model`'s head."""
    layer_list = _layer_chain(model)
    cut = layer_list.index(model.get_layer(POOLED)) + 1
    x = pixels = keras.Input(model.input_shape[1:])
    for layer in layer_list[:cut]:
        x = layer(x)
    y = features = keras.Input(x.shape[1:])
    for layer in layer_list[cut:]:
        y = layer(y)
    return keras.Model(pixels, x, name=f"{model.name}_features"), keras.Model(features, y, name=f"{model.name}_head")


def weights_fingerprint(model):
    """A short hash of a model's weight values: equal fingerprints, equal weights."""
    import hashlib

    digest = hashlib.sha1()
    for array in model.get_weights():
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def set_base_trainable(model, trainable):
    """Freezes (feature extraction) or unfreezes (fine-tuning) the base; the head stays trainable."""
    base_of(model).trainable = bool(trainable)
