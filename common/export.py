"""TensorFlow Lite export of trained Keras models, and their measurement on a CPU.

Three variants per model (TFLite post-training quantization):
- `float32`: the model as it is;
- `dynamic_int8`: weights stored as int8, activations computed in float;
- `int8`: weights and activations int8 (full integer), input and output int8,
  calibrated on representative training inputs.

Files are run through the LiteRT interpreter (`ai_edge_litert`, the maintained
successor of `tf.lite.Interpreter`; `tf.lite` is used only where that package is
missing, and `runtime()` says which), one image per call, on one CPU thread,
so each file's logits and its latency per image come from the same pass.
"""

import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import tensorflow as tf

from common.results import write_atomic, write_json_atomic

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
    """A `.tflite` model in the interpreter: `run(images) -> (logits, seconds per image)`."""

    def __init__(self, content):
        interpreter_class, _ = runtime()
        self.interpreter = interpreter_class(model_content=content, num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def _quantize(self, image):
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

    def run(self, images):
        """Float logits `(n, classes)` of float32 `images` `(n, ...)`, one per call, and
        the wall seconds of each call (set input, invoke, read output)."""
        logits, seconds = [], []
        for image in np.asarray(images, np.float32):
            start = time.perf_counter()
            self.interpreter.set_tensor(self.input["index"], self._quantize(image))
            self.interpreter.invoke()
            out = self.interpreter.get_tensor(self.output["index"])
            seconds.append(time.perf_counter() - start)
            logits.append(self._dequantize(out)[0])
        return np.stack(logits), seconds


def measure(content, images):
    """`(logits, {"size_bytes", "latency_ms_median", "latency_ms_mean"})` of one file."""
    logits, seconds = LiteModel(content).run(images)
    return logits, {"size_bytes": len(content), "latency_ms_median": 1000 * statistics.median(seconds),
                    "latency_ms_mean": 1000 * statistics.fmean(seconds)}


def export_model(folder, model, images, representative, score, log=None):
    """Every variant of `model` as `folder/<variant>.tflite`, measured on `images`:
    `{variant: {"size_bytes", "latency_ms_median", "latency_ms_mean", "score"}}`,
    `score(logits)` being the file's test metric. A file already there is kept, and
    its measurement (`<variant>.json`, keyed by the file's hash and the runtime) is
    reused, so a rerun only does what is missing."""
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
            say(f"measuring {variant} on {len(images)} test images")
            logits, stats = measure(content, images)
            saved = {"sha256": digest, "runtime": name, **stats, "score": score(logits)}
            write_json_atomic(saved_path, saved)
        say(f"{variant}: {saved['size_bytes'] / 1024:,.0f} KiB, {saved['latency_ms_median']:.3f} ms/image, "
            f"score {saved['score']:.4f}")
        measured[variant] = saved
    return measured
