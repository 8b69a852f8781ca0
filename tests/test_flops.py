"""FLOPs from TensorFlow's profiler against hand counts (multiply-add = 2 FLOPs)."""

import keras
import pytest
from keras import layers

from kdtoolkit.flops import count_flops
from task1_mnist.models import build_student, build_teacher


def conv_flops(h_out, w_out, k, c_in, c_out):
    return 2 * h_out * w_out * k * k * c_in * c_out + h_out * w_out * c_out  # MACs + bias


def dense_flops(n_in, n_out):
    return 2 * n_in * n_out + n_out


def pool_flops(h_out, w_out, c, k):
    return h_out * w_out * c * k * k  # one comparison per window element


def test_tiny_conv_dense_model_matches_hand_count():
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            layers.Conv2D(3, 3, activation="relu"),  # -> 3x3x3
            layers.MaxPooling2D(2, strides=1),  # -> 2x2x3
            layers.Flatten(),
            layers.Dense(4),
        ]
    )
    hand = conv_flops(3, 3, 3, 2, 3) + pool_flops(2, 2, 3, 2) + dense_flops(12, 4)
    assert hand == 972 + 27 + 48 + 96 + 4
    assert count_flops(model) == hand
    assert count_flops(model, batch_size=3) == 3 * hand


def test_course_models_match_hand_count():
    teacher = (
        conv_flops(26, 26, 3, 1, 32)
        + pool_flops(25, 25, 32, 2)
        + conv_flops(23, 23, 3, 32, 64)
        + pool_flops(11, 11, 64, 2)
        + dense_flops(11 * 11 * 64, 128)
        + dense_flops(128, 10)
    )
    student = dense_flops(784, 784) + dense_flops(784, 784) + dense_flops(784, 10)
    assert count_flops(build_teacher()) == teacher == 22_042_058
    assert count_flops(build_student()) == student == 2_475_882


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        count_flops(build_student(), batch_size=0)
