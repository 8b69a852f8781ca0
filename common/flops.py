"""FLOPs of a Keras model, counted by TensorFlow's own profiler.

The method of the `keras-flops` package, rewritten for current TensorFlow and
Keras 3: trace the model's forward pass at a fixed batch size, freeze its
variables into constants, and sum the `flops` statistics that TensorFlow registers
per op. A multiply-add counts as 2 FLOPs (Conv2D: 2·k_h·k_w·c_in per output value;
MatMul: 2·n_in per output value); bias adds, element-wise ops and pooling count
one per output value per input read as TensorFlow defines them; ReLU and other
activations have no registered statistic and count 0, as in `keras-flops`.
"""

import logging

import tensorflow as tf
from tensorflow.python.framework import convert_to_constants


def count_flops(model, batch_size=1):
    """Total inference FLOPs of `model` for one batch of `batch_size` inputs (int)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    input_shapes = [tuple(inp.shape[1:]) for inp in model.inputs]
    if any(dim is None for shape in input_shapes for dim in shape):
        raise ValueError(f"count_flops needs fully known input shapes, got {input_shapes}")
    specs = [
        tf.TensorSpec((int(batch_size),) + shape, dtype=inp.dtype)
        for shape, inp in zip(input_shapes, model.inputs)
    ]
    forward = tf.function(lambda *xs: model(xs[0] if len(xs) == 1 else list(xs), training=False))
    concrete = forward.get_concrete_function(*specs)
    _, graph_def = convert_to_constants.convert_variables_to_constants_v2_as_graph(concrete)
    tf_logger = tf.get_logger()
    previous_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # the v1 profiler prints deprecation notices
    try:
        return _profile_flops(graph_def)
    finally:
        tf_logger.setLevel(previous_level)


def _profile_flops(graph_def):
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        options = (
            tf.compat.v1.profiler.ProfileOptionBuilder(
                tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
            )
            .with_empty_output()
            .build()
        )
        profile = tf.compat.v1.profiler.profile(
            graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options
        )
    return int(profile.total_float_ops)
