"""Task 1 architectures (course figure). All return logits, shape `(batch, 10)`."""

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def build_teacher(num_outputs=NUM_CLASSES, name="teacher"):
    """CNN teacher: 1,011,466 parameters with 10 outputs.

    Conv 3x3/32 ReLU -> MaxPool 2x2 stride 1 -> Conv 3x3/64 ReLU -> MaxPool 2x2
    stride 2 -> Flatten -> Dropout 0.5 -> Dense 128 ReLU -> Dropout 0.5 -> Dense.
    """
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Conv2D(32, 3, strides=1, padding="valid", activation="relu"),
            layers.MaxPooling2D(2, strides=1),
            layers.Conv2D(64, 3, strides=1, padding="valid", activation="relu"),
            layers.MaxPooling2D(2, strides=2),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(num_outputs),
        ],
        name=name,
    )


def build_assistant(num_outputs=NUM_CLASSES, name="assistant"):
    """Teacher-assistant CNN: the teacher's design at a quarter of its width.

    Conv 3x3/16 ReLU -> MaxPool 2x2 stride 2 -> Conv 3x3/32 ReLU -> MaxPool 2x2
    stride 2 -> Flatten -> Dropout 0.5 -> Dense 128 ReLU -> Dropout 0.5 -> Dense:
    108,618 parameters and 1,546,026 FLOPs at batch 1 (teacher: 1,011,466 and
    22,042,058; student MLP: 1,238,730 and 2,475,882). It sits between the two in
    capacity (a convolutional inductive bias with far fewer weights), not in raw
    parameter count, since the course's MLP student has more weights than its
    CNN teacher.
    """
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(2, strides=2),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2, strides=2),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(num_outputs),
        ],
        name=name,
    )


def build_student(num_outputs=NUM_CLASSES, name="student"):
    """MLP student: Flatten -> Dense 784 ReLU -> Dense 784 ReLU -> Dense (1,238,730 params)."""
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Flatten(),
            layers.Dense(784, activation="relu"),
            layers.Dense(784, activation="relu"),
            layers.Dense(num_outputs),
        ],
        name=name,
    )
