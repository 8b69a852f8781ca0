"""Task 1 architectures (course figure). All return logits, shape `(batch, outputs)`.

Feature layers, read by feature distillation methods (`feature_model`): the CNNs'
`"spatial"` (last pooled feature map, 11x11x64 in the teacher) and `"embedding"`
(the 128-unit hidden layer); the MLP's `"embedding"` (its second hidden layer)
and `"hidden"` (its first, one unit per input pixel, read as a 28x28x1 map:
the MLP's `"spatial"`). FitNets' `"hint"` is each model's `"spatial"`: the
middle of the CNN's four weight layers and of the MLP's three.
"""

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _cnn(widths, first_pool_stride, num_outputs, name):
    """Conv 3x3/w1 ReLU -> MaxPool 2x2 -> Conv 3x3/w2 ReLU -> MaxPool 2x2 stride 2 ->
    Flatten -> Dropout 0.5 -> Dense 128 ReLU -> Dropout 0.5 -> Dense (valid padding)."""
    first, second = widths
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Conv2D(first, 3, strides=1, padding="valid", activation="relu"),
            layers.MaxPooling2D(2, strides=first_pool_stride),
            layers.Conv2D(second, 3, strides=1, padding="valid", activation="relu"),
            layers.MaxPooling2D(2, strides=2, name="spatial"),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(128, activation="relu", name="embedding"),
            layers.Dropout(0.5),
            layers.Dense(num_outputs),
        ],
        name=name,
    )


def build_teacher(num_outputs=NUM_CLASSES, name="teacher"):
    """CNN teacher of the course: widths 32/64, first pool stride 1.

    1,011,466 parameters and 22,042,058 FLOPs (batch 1) with 10 outputs.
    """
    return _cnn((32, 64), 1, num_outputs, name)


def build_assistant(num_outputs=NUM_CLASSES, name="assistant"):
    """Teacher-assistant CNN: the teacher's design with widths 16/32, first pool stride 2.

    108,618 parameters and 1,546,026 FLOPs at batch 1 (teacher: 1,011,466 and
    22,042,058; student MLP: 1,238,730 and 2,475,882). It sits between the two in
    capacity (a convolutional inductive bias with far fewer weights), not in raw
    parameter count, since the course's MLP student has more weights than its
    CNN teacher.
    """
    return _cnn((16, 32), 2, num_outputs, name)


def build_large_teacher(num_outputs=NUM_CLASSES, name="large_teacher"):
    """The teacher's design at twice its widths (64/128): 2,058,378 parameters with 10
    outputs (Vats 2021's large MNIST teacher: 2,560,906)."""
    return _cnn((64, 128), 1, num_outputs, name)


TEACHER_PRESETS = {"small": build_assistant, "course": build_teacher, "large": build_large_teacher}


def build_student(num_outputs=NUM_CLASSES, name="student"):
    """MLP student: Flatten -> Dense 784 ReLU -> Dense 784 ReLU -> Dense (1,238,730 params)."""
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Flatten(),
            layers.Dense(784, activation="relu", name="hidden"),
            layers.Dense(784, activation="relu", name="embedding"),
            layers.Dense(num_outputs),
        ],
        name=name,
    )


def student_branches(teacher, num_outputs=NUM_CLASSES):
    """SFTN's cuts and student branches (`kdtoolkit.methods.sftn`) for the CNN teacher and
    the MLP student, each split into three blocks:

    - teacher: conv blocks 1-2 (to `"spatial"`, 11x11x64) | Flatten, Dense 128
      (`"embedding"`) | Dense logits; student: Dense 784 (`"hidden"`) | Dense 784
      (`"embedding"`) | Dense logits.
    - cut 1, the teacher's `"spatial"` map: Flatten, then the transform Dense 784 +
      BatchNorm + ReLU (in place of the student's first block), then the student's
      blocks 2 and 3 (Dense 784 ReLU, Dense logits);
    - cut 2, the teacher's `"embedding"`: the transform Dense 784 + BatchNorm + ReLU,
      then the student's block 3.

    Returns `(cuts, branches)`: `x -> {"logits", "cut_1", "cut_2"}` over the teacher's
    layers, and the two branch models (new layers)."""
    spatial, embedding = teacher.get_layer("spatial").output, teacher.get_layer("embedding").output
    cuts = keras.Model(teacher.inputs[0], {"logits": teacher.outputs[0], "cut_1": spatial, "cut_2": embedding},
                       name=f"{teacher.name}_cuts")

    def transform(width):
        return [layers.Dense(width), layers.BatchNormalization(), layers.ReLU()]

    first = keras.Sequential([keras.Input(spatial.shape[1:]), layers.Flatten(), *transform(784),
                              layers.Dense(784, activation="relu"), layers.Dense(num_outputs)], name="sftn_branch_1")
    second = keras.Sequential([keras.Input(embedding.shape[1:]), *transform(784), layers.Dense(num_outputs)],
                              name="sftn_branch_2")
    return cuts, (first, second)


def feature_model(model):
    """`x -> {"logits", "embedding", "spatial", "hint"}` sharing `model`'s layers (see above)."""
    spatial = model.get_layer("spatial").output if any(l.name == "spatial" for l in model.layers) else \
        layers.Reshape(INPUT_SHAPE)(model.get_layer("hidden").output)
    outputs = {"logits": model.outputs[0], "embedding": model.get_layer("embedding").output, "spatial": spatial,
               "hint": spatial}
    return keras.Model(model.inputs[0], outputs, name=f"{model.name}_features")
