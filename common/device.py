"""How TensorFlow uses the accelerator: set once per process, before the first op.

- Memory growth on every GPU (always): TensorFlow otherwise reserves all of a GPU's
  memory at start-up, so a second process (a test worker, LIME in another shell)
  cannot start on the same GPU.
- `deterministic`: TensorFlow's op determinism, so the same seed gives the same
  numbers on a GPU (on a CPU they already do); some GPU kernels get slower.
- `tf32`: TensorFloat-32 for float32 matrix products and convolutions on GPUs that
  have it (Ampere and later; about 1e-3 relative error, much faster). Off gives
  exact float32, as a CPU computes.
- `precision`: Keras' global dtype policy, `float32` or mixed (`mixed_bfloat16`,
  `mixed_float16`: layers compute in 16 bits and keep float32 variables; losses
  and softmax are computed in float32 in `common.losses`, and float16 training
  scales its loss, see `optimizer`). Models built afterwards use it.
- `jit` (`use_jit`): XLA compilation of the training step: `on`, `off`, or `auto`
  = on where a GPU is used (on this project's CPUs XLA slowed convolutions), except
  under op determinism (XLA has no deterministic GPU MaxPool gradient: a
  deterministic XLA step fails on an H100).
- XLA's Triton GEMM autotuning off on GPUs (`XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`,
  unless `XLA_FLAGS` already names that flag): cuBLAS serves the matrix products. On an
  H100 it cut the first (compiling) epoch of the MNIST MLP from 7.2 s to 3.0 s and of
  the CNN from 11.9 s to 9.1 s; steady epochs stayed the same.
"""

import os

import keras
import tensorflow as tf

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
JIT = ("auto", "on", "off")

_state = {"deterministic": False}


def configure(deterministic=False, tf32=True, precision="float32"):
    """Applies the settings above; call before any TensorFlow op runs on a GPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    keras.mixed_precision.set_global_policy(precision)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        use_xla_flag(TRITON_GEMM_OFF)
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU is already initialised: its setting stays as it was
            pass
    tf.config.experimental.enable_tensor_float_32_execution(bool(tf32))
    if deterministic:
        tf.config.experimental.enable_op_determinism()  # cannot be turned off again in a process
        _state["deterministic"] = True


TRITON_GEMM_OFF = "--xla_gpu_enable_triton_gemm=false"


def use_jit(jit):
    """`--jit` resolved to a bool: `auto` is on exactly when a GPU is visible and op
    determinism is off."""
    if jit not in JIT:
        raise ValueError(f"jit must be one of {', '.join(JIT)}, got {jit!r}")
    if jit == "auto":
        return bool(tf.config.list_physical_devices("GPU")) and not _state["deterministic"]
    return jit == "on"


def use_xla_flag(flag):
    """Adds `flag` (`--name=value`) to `XLA_FLAGS` unless the user's `XLA_FLAGS` sets that
    name already; XLA reads them at its first compilation."""
    current = os.environ.get("XLA_FLAGS", "")
    name = flag.split("=")[0]
    if not any(f.split("=")[0] == name for f in current.split()):
        os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()


def optimizer(optimizer):
    """`optimizer` as training at the current precision needs it: wrapped in Keras'
    dynamic loss scaling under `mixed_float16` (float16 gradients underflow), as it
    is otherwise. Create it under the strategy's scope."""
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def settings():
    """What is in force, for run records: `precision`, `op_determinism`, `tf32`, `memory_growth`,
    `xla_flags`."""
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "precision": keras.mixed_precision.global_policy().name,
        "op_determinism": _state["deterministic"],
        "tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
        "memory_growth": all(tf.config.experimental.get_memory_growth(g) for g in gpus) if gpus else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def reset_peak_memory():
    """Starts a new peak-memory count on the first GPU (no-op without one)."""
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def peak_memory_mib():
    """Peak memory TensorFlow allocated on the first GPU since the last reset, in MiB;
    None without a GPU."""
    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
