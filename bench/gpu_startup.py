"""Seconds to a working GPU: import TensorFlow, a first op, a first convolution (cuDNN),
a first XLA compilation of a small dense step (ptxas or the driver's PTX compiler).

    python bench/gpu_startup.py
"""

import time

start = time.perf_counter()
marks = {}
import tensorflow as tf  # noqa: E402

marks["import"] = time.perf_counter() - start
tf.config.experimental.set_memory_growth(tf.config.list_physical_devices("GPU")[0], True)
x = tf.random.normal([256, 784])
float(tf.reduce_sum(x))
marks["first_op"] = time.perf_counter() - start
image = tf.random.normal([32, 28, 28, 1])
float(tf.reduce_sum(tf.nn.conv2d(image, tf.random.normal([3, 3, 1, 32]), 1, "SAME")))
marks["first_conv"] = time.perf_counter() - start
w = tf.Variable(tf.random.normal([784, 1200]) * 0.01)


@tf.function(jit_compile=True)
def step(x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.softmax(tf.matmul(x, w)))
    w.assign_sub(0.1 * tape.gradient(loss, w))
    return loss


float(step(x))
marks["first_xla"] = time.perf_counter() - start
float(step(x))
marks["second_xla_call"] = time.perf_counter() - start
print("startup seconds since start: " + ", ".join(f"{k} {v:.2f}" for k, v in marks.items()))
