"""TensorFlow Lite export of trained Keras models, and their measurement on a CPU.

Three variants per model (TFLite post-training quantization):
- `float32`: the model as it is;
- `dynamic_int8`: weights stored as int8, activations computed in float;
- `int8`: weights and activations int8 (full integer), input and output int8,
  calibrated on representative training inputs.

Files are run through the LiteRT interpreter (`ai_edge_litert`, the maintained
successor of `tf.lite.Interpreter`; `tf.lite` is used only where that package is
missing, and `runtime()` says which), one image per call, on one CPU thread:
once over the whole test set for the file's test metric, and in interleaved
timed rounds for its latency (`time_files`).
"""

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np
import tensorflow as tf

from kdtoolkit.files import write_atomic, write_json_atomic

VARIANTS = ("float32", "dynamic_int8", "int8")


def runtime():
    """`(Interpreter class, "ai-edge-litert 2.3.0" | "tf.lite (TensorFlow 2.21.0)")`."""
    try:
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai-edge-litert {version('ai-edge-litert')}"
    except ImportError:
        return tf.lite.Interpreter, f"tf.lite (TensorFlow {tf.__version__})"


@contextlib.contextmanager
def _quiet_native_output():
    """The converter prints MLIR notices on the C++ streams: hidden unless it fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def convert(model, variant, representative=None):
    """The `.tflite` bytes of a Keras `model` as `variant` (see `VARIANTS`);
    `representative`: float32 inputs `(n, ...)` calibrating `int8`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 export needs representative inputs")
        samples = np.asarray(representative, np.float32)
        converter.representative_dataset = lambda: ([samples[i:i + 1]] for i in range(len(samples)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with _quiet_native_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Statistics for quantized inputs were expected": calibration gives them
        return converter.convert()


class LiteModel:
    """A `.tflite` model in the interpreter, on one CPU thread."""

    def __init__(self, content):
        interpreter_class, _ = runtime()
        self.interpreter = interpreter_class(model_content=content, num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def quantize(self, image):
        """One float32 image `(...)` as the file's input tensor `(1, ...)`."""
        if self.input["dtype"] == np.float32:
            return image[None].astype(np.float32)
        scale, zero = self.input["quantization"]
        info = np.iinfo(self.input["dtype"])
        return np.clip(np.round(image / scale + zero), info.min, info.max).astype(self.input["dtype"])[None]

    def _dequantize(self, values):
        if self.output["dtype"] == np.float32:
            return values.astype(np.float32)
        scale, zero = self.output["quantization"]
        return (values.astype(np.float32) - zero) * scale

    def call(self, tensor):
        """The raw output `(1, classes)` of one input tensor from `quantize`."""
        self.interpreter.set_tensor(self.input["index"], tensor)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def logits(self, images):
        """Float logits `(n, classes)` of float32 `images` `(n, ...)`, one image per call."""
        return np.stack([self._dequantize(self.call(self.quantize(image)))[0]
                         for image in np.asarray(images, np.float32)])

    def seconds_per_call(self, tensors, calls):
        """Mean wall seconds of `calls` back-to-back calls cycling through `tensors`."""
        start = time.perf_counter()
        for i in range(calls):
            self.call(tensors[i % len(tensors)])
        return (time.perf_counter() - start) / calls


# The latency protocol (`time_files`); a measurement under another one is redone.
LATENCY_PROTOCOL = {"rounds": 15, "round_seconds": 0.05, "warmup_calls": 50, "images": 16}


def time_files(contents, images, protocol=LATENCY_PROTOCOL, seed=0):
    """CPU latency per image of each `.tflite` file of `contents` (`{key: bytes}`),
    timed so that files compare fairly: every file is loaded and warmed up first
    (`warmup_calls` calls, which also size a round to about `round_seconds`), then
    each of `rounds` rounds times every file in a fresh random order, so a slow
    spell of the machine falls on all files alike. A call is setting the input,
    invoking and reading the output, on the first `images` test images already in
    the file's input type (quantising them is left out, as on a device whose
    camera gives the input type). Returns `{key: {"latency_ms_median",
    "latency_ms_q1", "latency_ms_q3", "calls_per_round"}}`: quartiles over rounds
    of a round's mean milliseconds per call."""
    models = {key: LiteModel(content) for key, content in contents.items()}
    sample = np.asarray(images[:protocol["images"]], np.float32)
    tensors = {key: [model.quantize(image) for image in sample] for key, model in models.items()}
    calls = {}
    for key, model in models.items():
        warm = model.seconds_per_call(tensors[key], protocol["warmup_calls"])
        calls[key] = max(1, round(protocol["round_seconds"] / max(warm, 1e-9)))
    rounds = {key: [] for key in models}
    order = list(models)
    rng = np.random.default_rng(seed)
    for _ in range(protocol["rounds"]):
        for index in rng.permutation(len(order)):
            key = order[index]
            rounds[key].append(1000 * models[key].seconds_per_call(tensors[key], calls[key]))
    return {key: {"latency_ms_median": float(np.median(ms)), "latency_ms_q1": float(np.percentile(ms, 25)),
                  "latency_ms_q3": float(np.percentile(ms, 75)), "calls_per_round": calls[key]}
            for key, ms in rounds.items()}


def export_model(folder, model, representative, images, score, log=None):
    """Every variant of `model` as `folder/<variant>.tflite`, each scored on all of
    `images` (`score(logits)`: the file's test metric): `{variant: {"path",
    "size_bytes", "score", ...}}`, with the file's latency (`time_files`) where one
    was saved under the current runtime and protocol. A file already there is
    kept, and its measurement (`<variant>.json`, keyed by the file's hash) reused,
    so a rerun only does what is missing."""
    say = log or (lambda _msg: None)
    _, name = runtime()
    measured = {}
    for variant in VARIANTS:
        path = folder / f"{variant}.tflite"
        if not path.exists():
            say(f"converting to {variant}")
            content = convert(model, variant, representative)
            write_atomic(path, lambda handle, content=content: handle.write(content), mode="wb")
        content = path.read_bytes()
        digest = hashlib.sha256(content).hexdigest()[:16]
        saved_path = path.with_suffix(".json")
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
        if saved.get("sha256") != digest or saved.get("runtime") != name:
            say(f"scoring {variant} on {len(images)} test images")
            saved = {"sha256": digest, "runtime": name, "size_bytes": len(content),
                     "score": score(LiteModel(content).logits(images))}
            write_json_atomic(saved_path, saved)
        if saved.get("latency_protocol") != LATENCY_PROTOCOL:
            saved = {key: value for key, value in saved.items() if not key.startswith(("latency", "calls"))}
        say(f"{variant}: {saved['size_bytes'] / 1024:,.0f} KiB, score {saved['score']:.4f}")
        measured[variant] = {"path": path, **saved}
    return measured


def time_exported(measured, images, log=None):
    """Latency of every file of `measured` (`{key: export_model's entry}`) that has
    none yet; when any file needs timing, all are timed again together, so one
    table's latencies always come from one interleaved session (`time_files`).
    Saves each to its `<variant>.json`; returns `measured` with the latencies."""
    if all("latency_ms_median" in entry for entry in measured.values()):
        return measured
    say = log or (lambda _msg: None)
    say(f"timing {len(measured)} files, interleaved ({LATENCY_PROTOCOL['rounds']} rounds)")
    timed = time_files({key: entry["path"].read_bytes() for key, entry in measured.items()}, images)
    for key, entry in measured.items():
        entry.update(timed[key], latency_protocol=LATENCY_PROTOCOL)
        write_json_atomic(entry["path"].with_suffix(".json"),
                          {k: v for k, v in entry.items() if k != "path"})
    return measured
