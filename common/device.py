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
  and softmax are computed in float32 in `kdtoolkit.losses`, and float16 training
  scales its loss, see `optimizer`), or `auto`: bfloat16 where the device computes
  it natively (`resolve_precision`). Models built afterwards use it.
- `jit` (`use_jit`): XLA compilation of the training step: `on`, `off`, or `auto`
  = on where a GPU is used (on this project's CPUs XLA slowed convolutions), except
  under op determinism (XLA has no deterministic GPU MaxPool gradient: a
  deterministic XLA step fails on an H100).
- XLA's Triton GEMM autotuning off on GPUs (`XLA_FLAGS=--xla_gpu_enable_triton_gemm=false`,
  unless `XLA_FLAGS` already names that flag): cuBLAS serves the matrix products. On an
  H100 it cut the first (compiling) epoch of the MNIST MLP from 7.2 s to 3.0 s and of
  the CNN from 11.9 s to 9.1 s; steady epochs stayed the same.
"""

import contextlib
import os
import platform

import keras
import tensorflow as tf

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
PRECISION_CHOICES = ("auto", *PRECISIONS)  # `--precision`: `auto` is resolved by `resolve_precision`
JIT = ("auto", "on", "off")

_state = {"deterministic": False, "precision_reason": "default"}


def configure(deterministic=False, tf32=True, precision="float32"):
    """Applies the settings above; call before any TensorFlow op runs on a GPU.
    `precision` may be `auto` (`resolve_precision`); the reason is recorded in `settings`."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    precision, _state["precision_reason"] = resolve_precision(precision)
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


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy set to `name` inside the block, restored after."""
    saved = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(saved)


TRITON_GEMM_OFF = "--xla_gpu_enable_triton_gemm=false"

BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU instructions that compute bfloat16 natively
CPU_FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info(path="/proc/cpuinfo"):
    """`{"model": the CPU's model name, "flags": its flags}` (Linux's `/proc/cpuinfo`;
    an empty model and no flags elsewhere)."""
    model, flags = "", set()
    try:
        text = open(path).read()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "flags": set()}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": flags}


def describe():
    """This process's compute device for benchmark files: `kind` ("gpu" or "cpu"),
    `name` (GPU or CPU model), `cores`, the CPU `flags` that matter for speed and
    whether the device computes bfloat16 natively (`bfloat16`)."""
    cpu = cpu_info()
    about = {"cores": os.cpu_count(), "cpu": cpu["model"],
             "cpu_flags": sorted(f for f in CPU_FLAGS_SHOWN if f in cpu["flags"])}
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        capability = details.get("compute_capability", (0, 0))
        return {"kind": "gpu", "name": details.get("device_name", gpus[0].name),
                "bfloat16": tuple(capability) >= (8, 0), "compute_capability": list(capability), **about}
    return {"kind": "cpu", "name": cpu["model"] or "cpu",
            "bfloat16": any(f in cpu["flags"] for f in BFLOAT16_CPU_FLAGS), **about}


def resolve_precision(precision):
    """`(policy, reason)` for `--precision`: `auto` is `mixed_bfloat16` where the device
    computes bfloat16 natively (a GPU of compute capability 8.0 or later; a CPU with
    AMX-BF16 or AVX512-BF16) and `float32` elsewhere; any other value is itself."""
    if precision != "auto":
        return precision, "asked for"
    about = describe()
    if about["bfloat16"]:
        why = (f"GPU {about['name']} has bfloat16 tensor cores" if about["kind"] == "gpu" else
               f"CPU {about['name']} has {', '.join(f for f in BFLOAT16_CPU_FLAGS if f in about['cpu_flags'])}")
        return "mixed_bfloat16", f"auto: {why}"
    return "float32", f"auto: {about['kind'].upper()} {about['name']} computes no bfloat16 natively"



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
    """What is in force, for run records: `precision` (and why: `precision_reason`),
    `op_determinism`, `tf32`, `memory_growth`, `xla_flags`."""
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "precision": keras.mixed_precision.global_policy().name,
        "precision_reason": _state["precision_reason"],
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
