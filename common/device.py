"""How TensorFlow uses the accelerator: set once per process, before the first op.

- Memory growth on every GPU (always): TensorFlow otherwise reserves all of a GPU's
  memory at start-up, so a second process (a test worker, LIME in another shell)
  cannot start on the same GPU.
- `deterministic`: TensorFlow's op determinism, so the same seed gives the same
  numbers on a GPU (on a CPU they already do); some GPU kernels get slower.
- `tf32`: TensorFloat-32 for float32 matrix products and convolutions on GPUs that
  have it (Ampere and later; about 1e-3 relative error, much faster). Off gives
  exact float32, as a CPU computes.
"""

import tensorflow as tf

_state = {"deterministic": False}


def configure(deterministic=False, tf32=True):
    """Applies the settings above; call before any TensorFlow op runs on a GPU."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU is already initialised: its setting stays as it was
            pass
    tf.config.experimental.enable_tensor_float_32_execution(bool(tf32))
    if deterministic:
        tf.config.experimental.enable_op_determinism()  # cannot be turned off again in a process
        _state["deterministic"] = True


def settings():
    """What is in force, for run records: `op_determinism`, `tf32`, `memory_growth`."""
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "op_determinism": _state["deterministic"],
        "tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
        "memory_growth": all(tf.config.experimental.get_memory_growth(g) for g in gpus) if gpus else None,
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
