"""Task 2 models: a `keras.applications` base (no top) with a small head.

Every model takes RGB pixels in [0, 255] and applies its own architecture's
ImageNet preprocessing inside, so one data pipeline (and one cache of a teacher's
logits) serves every architecture. The base is called with `training=False`, so
its BatchNorm layers stay in inference mode in both phases (feature extraction
and fine-tuning), as the Keras transfer-learning guide recommends.
"""

import keras
from keras import layers

from common.errors import DataError

# name -> (constructor, preprocessing mode of keras.applications)
ARCHITECTURES = {
    "resnet50v2": (keras.applications.ResNet50V2, "tf"),
    "mobilenetv2": (keras.applications.MobileNetV2, "tf"),
    "densenet121": (keras.applications.DenseNet121, "torch"),
}
TEACHER, STUDENT, ASSISTANT = "resnet50v2", "mobilenetv2", "densenet121"
BASE_NAME = "base"


def preprocessing(mode):
    """ImageNet preprocessing as layers: 'tf' -> [-1, 1]; 'torch' -> (x/255 - mean) / std."""
    if mode == "tf":
        return [layers.Rescaling(1 / 127.5, offset=-1.0)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return [layers.Rescaling(1 / 255.0),
            layers.Normalization(mean=mean, variance=[s * s for s in std])]


def build(architecture, weights="imagenet", image_size=224, num_outputs=2, dropout=0.2, name=None):
    """`(batch, S, S, 3)` pixels -> `(batch, num_outputs)` logits.

    `weights`: "imagenet" (Keras download), "none" (random init) or a path to a
    weights file of the base (e.g. Keras' `*_notop.h5`).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    constructor, mode = ARCHITECTURES[architecture]
    base = make_base(constructor, architecture, weights, image_size)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    for layer in preprocessing(mode):
        x = layer(x)
    x = base(x, training=False)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(num_outputs, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or architecture)


def make_base(constructor, architecture, weights, image_size):
    resolved = resolve_weights(weights)
    try:
        base = constructor(include_top=False, weights=resolved, input_shape=(image_size, image_size, 3),
                           pooling="avg")
    except Exception as err:  # download failures surface as several exception types
        if resolved == "imagenet":
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(
                f"could not get ImageNet weights for {architecture} ({reason}); pass --weights PATH "
                f"(a saved weights file of the {architecture} base without top) or --weights none"
            ) from None
        if resolved is not None:
            raise DataError(f"--weights {weights}: cannot load into {architecture} without top ({err})") from None
        raise
    base.name = BASE_NAME
    return base


def resolve_weights(weights):
    """'imagenet' | 'none' | path -> the value `keras.applications` expects."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    from pathlib import Path

    path = Path(weights).expanduser()
    if not path.is_file():
        raise DataError(f"--weights {weights}: no such file; use imagenet, none or a path to a weights file")
    return str(path)


def base_of(model):
    return model.get_layer(BASE_NAME)


def set_base_trainable(model, trainable):
    """Freezes (feature extraction) or unfreezes (fine-tuning) the base; the head stays trainable."""
    base_of(model).trainable = bool(trainable)
