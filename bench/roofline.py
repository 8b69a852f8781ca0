"""Benchmark: this machine's roofline at float32 and bfloat16, and how near the
toolkit's training steps come to it.

In one process, at each precision:

- peaks: forward rates (GFLOP/s, two flops per multiply-add) of the matrix
  products and convolutions at the shapes Task 1's models use (batch 256), and of
  one large matrix product, each a compiled op timed for at least `--seconds`
  (median of 5 trials after a warm-up);
- achieved: the toolkit's compiled training step (`kdtoolkit.training.fit`) for the
  CNN teacher (cross-entropy), the KD student (cached teacher logits) and a fused
  grid of `--grid-cells` KD cells (`kdtoolkit.speed.fused`), on random MNIST-shaped data
  (speed does not depend on the values): images/s of the last epoch, times the
  training FLOPs per image (3 x the forward FLOPs at batch 1: forward plus a
  backward of twice its cost), and the cores kept busy (CPU seconds / seconds);
- each achieved rate as a fraction of the peak of its model's dominant op
  (teacher: its second convolution; student and grid: the 784 x 784 matrix product);
- the Task 1 core's arithmetic (`--only teacher,kd,scratch,grid` at the default
  config: the teacher, the grid's cells, the course's KD run being one of them,
  and the scratch student) and the seconds it needs at those peaks (a floor no
  schedule on this machine beats) and at the rates achieved here.

Writes `bench/results/roofline_<device>.json` with the CPU's model name and flags
(or the GPU's name) and prints a table.

    python bench/roofline.py
"""

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdtoolkit.runner import cli  # noqa: E402

cli.import_tensorflow_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kdtoolkit import data as common_data  # noqa: E402
from kdtoolkit import device, methods, training
from kdtoolkit.runner import runs  # noqa: E402
from kdtoolkit.speed.fused import Fused  # noqa: E402
from kdtoolkit.files import write_json_atomic  # noqa: E402
from task1_mnist.config import Task1Config  # noqa: E402
from task1_mnist.models import build_student, build_teacher  # noqa: E402

PRECISIONS = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16}
BATCH = 256
# name -> (kind, shapes): matmul (m, k, n); conv (batch, height, width, in channels, out channels, kernel)
KERNELS = {
    "matmul student 256x784 . 784x784": ("matmul", (BATCH, 784, 784)),
    "matmul teacher 256x7744 . 7744x128": ("matmul", (BATCH, 7744, 128)),
    "matmul 2048^3": ("matmul", (2048, 2048, 2048)),
    "conv teacher 1: 28x28x1 -> 32, 3x3": ("conv", (BATCH, 28, 28, 1, 32, 3)),
    "conv teacher 2: 25x25x32 -> 64, 3x3": ("conv", (BATCH, 25, 25, 32, 64, 3)),
}
DOMINANT = {"teacher": "conv teacher 2: 25x25x32 -> 64, 3x3", "kd_student": "matmul student 256x784 . 784x784",
            "fused_grid": "matmul student 256x784 . 784x784"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8192, help="random training images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per model; the last is timed")
    parser.add_argument("--grid-cells", type=int, default=4, help="KD cells of the fused grid")
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum time of each peak trial")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--out", help="default: bench/results/roofline_<device>.json")
    return parser.parse_args(argv)


def kernel_flops(kind, shape):
    """Forward flops of one op (2 per multiply-add); a convolution is 'valid'."""
    if kind == "matmul":
        m, k, n = shape
        return 2 * m * k * n
    batch, height, width, c_in, c_out, kernel = shape
    return 2 * batch * (height - kernel + 1) * (width - kernel + 1) * c_in * c_out * kernel * kernel


def peak_rate(kind, shape, dtype, seconds):
    """Median GFLOP/s of a compiled `kind` op (a `KERNELS` shape) over 5 trials of at
    least `seconds` each."""
    if kind == "matmul":
        op = layer_op("matmul", shape, 1, dtype)
    else:
        batch, height, width, c_in, c_out, kernel = shape
        op = layer_op("conv", ((height, width, c_in), (kernel, kernel), (1, 1), "valid", c_out), batch, dtype)
    return op_rate(op, kernel_flops(kind, shape), seconds)


def op_rate(op, flops, seconds, trials=5):
    """Median GFLOP/s of the compiled `op()` (`flops` a call) over `trials` trials of at
    least `seconds` each, after 3 warm-up calls."""
    for _ in range(3):
        op().numpy()
    rates = []
    for _ in range(trials):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            op().numpy()
            calls += 1
        rates.append(flops * calls / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def weight_layers(model):
    """`[(kind, key, forward flops per image)]` of `model`'s convolutions (`conv`,
    `depthwise`) and dense layers, 2 flops per multiply-add; `key` (the op's input
    shape, kernel, stride, padding and output channels) is what its speed depends on."""
    found = []
    for layer in _leaves(model):
        name = type(layer).__name__
        if name not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            continue
        inputs, outputs = tuple(layer.input.shape[1:]), tuple(layer.output.shape[1:])
        if name == "Dense":
            positions = int(np.prod(inputs[:-1])) if len(inputs) > 1 else 1
            found.append(("matmul", (positions, inputs[-1], outputs[-1]), 2 * positions * inputs[-1] * outputs[-1]))
            continue
        kh, kw = layer.kernel_size
        per_output = kh * kw * (1 if name == "DepthwiseConv2D" else inputs[-1] // layer.groups)
        key = (inputs, (kh, kw), tuple(layer.strides), layer.padding, outputs[-1])
        found.append(("depthwise" if name == "DepthwiseConv2D" else "conv", key,
                      2 * int(np.prod(outputs)) * per_output))
    return found


def _leaves(model):
    """`model`'s layers in order, those of nested models (a base inside a head) included."""
    for layer in model.layers:
        yield from (_leaves(layer) if hasattr(layer, "layers") else (layer,))


def layer_op(kind, key, batch, dtype):
    """The compiled forward op of a `weight_layers` entry at `batch`, on resident random data."""
    rng = np.random.default_rng(0)
    if kind == "matmul":
        m, k, n = key
        a, b = (tf.constant(rng.normal(size=s), dtype) for s in ((batch * m, k), (k, n)))
        return tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    inputs, (kh, kw), strides, padding, c_out = key
    x = tf.constant(rng.normal(size=(batch, *inputs)), dtype)
    if kind == "depthwise":
        w = tf.constant(rng.normal(size=(kh, kw, inputs[-1], c_out // inputs[-1])), dtype)
        return tf.function(lambda: tf.reduce_sum(tf.nn.depthwise_conv2d(x, w, (1, *strides, 1), padding.upper())))
    w = tf.constant(rng.normal(size=(kh, kw, inputs[-1], c_out)), dtype)
    return tf.function(lambda: tf.reduce_sum(tf.nn.conv2d(x, w, strides, padding.upper())))


def model_roofline(model, batch, dtype, seconds=0.2):
    """The forward roofline of `model` at `batch`: every convolution and dense layer's op
    timed alone at its own shape (once per distinct shape; 3 trials of `seconds`), and
    the model's peak rate: its weight layers' flops over the sum of their times at
    those rates. `{"forward_gflop_per_image", "peak_gflops", "weight_layers",
    "distinct_shapes", "flops_share": {kind: share}}`; a training step's flops are
    about 3x the forward's (a backward of twice its cost)."""
    layers = weight_layers(model)
    distinct = {(kind, key): flops for kind, key, flops in layers}  # the same shape: the same flops and rate
    rates = {(kind, key): op_rate(layer_op(kind, key, batch, dtype), batch * flops, seconds, trials=3)
             for (kind, key), flops in distinct.items()}
    total = sum(flops for _, _, flops in layers)
    at_peak = sum(flops / rates[(kind, key)] for kind, key, flops in layers)
    shares = {}
    for kind, _, flops in layers:
        shares[kind] = shares.get(kind, 0.0) + flops / total
    return {"forward_gflop_per_image": total / 1e9, "peak_gflops": total / at_peak, "weight_layers": len(layers),
            "distinct_shapes": len(rates), "flops_share": shares}


def achieved(name, examples, epochs, cells):
    """`{"images_per_second", "gflops", "cores_busy"}` of the last epoch of `name`'s training."""
    rng = np.random.default_rng(0)
    arrays = {"x": rng.uniform(0, 1, (examples, 28, 28, 1)).astype(np.float32),
              "y": rng.integers(0, 10, examples).astype(np.int32)}
    runs.set_seed(0)
    if name == "teacher":
        model = build_teacher()
        method, models = methods.CrossEntropy(model), [model]
    else:
        arrays["teacher_logits"] = rng.normal(0, 3, (examples, 10)).astype(np.float32)
        models = [build_student() for _ in range(1 if name == "kd_student" else cells)]
        members = [methods.Distillation(m, temperature=t, alpha=0.5) for m, t in zip(models, (4.0, 1.0, 8.0, 16.0) * 8)]
        method = members[0] if name == "kd_student" else Fused(members)
    data = common_data.batched(arrays, BATCH, shuffle=True, seed=0)
    last = training.fit(method, data, epochs=epochs, optimizer=keras.optimizers.Adam(1e-3))[-1]
    forward = sum(runs.model_size(m)["flops"] for m in models)
    per_second = examples / last["seconds"]
    return {"images_per_second": per_second, "gflops": per_second * 3 * forward / 1e9,
            "cores_busy": last["cpu_seconds"] / last["seconds"], "training_flops_per_image": 3 * forward}


def task1_core(peaks, found, config=None):
    """The Task 1 core's training arithmetic at `config` (default: the course's) and
    its seconds at the dominant ops' `peaks` and at the `found` achieved rates."""
    config = config or Task1Config()
    images = round(60000 * (1 - config.validation)) * config.epochs
    cells = len(config.temperatures) * len(config.alphas)
    course_in_grid = config.temperature in config.temperatures and config.alpha in config.alphas
    students = cells + 1 + (0 if course_in_grid else 1)  # + scratch (+ KD when it is no cell)
    teacher = found["teacher"]["training_flops_per_image"] * images
    student = found["kd_student"]["training_flops_per_image"] * images * students
    return {"trained_images_per_model": images, "student_models": students,
            "teacher_tflop": teacher / 1e12, "students_tflop": student / 1e12,
            "seconds_at_peak": teacher / 1e9 / peaks[DOMINANT["teacher"]]
            + student / 1e9 / peaks[DOMINANT["fused_grid"]],
            "seconds_at_achieved": teacher / 1e9 / found["teacher"]["gflops"]
            + student / 1e9 / found["fused_grid"]["gflops"]}


def main(argv=None):
    args = parse_args(argv)
    device.configure()
    tf.get_logger().setLevel("ERROR")
    about = device.describe()
    results = {"device": about, "batch": BATCH, "examples": args.examples, "epochs": args.epochs,
               "grid_cells": args.grid_cells, "environment": runs.environment(), "precisions": {}}
    for precision in args.precisions.split(","):
        keras.mixed_precision.set_global_policy(precision)
        dtype = PRECISIONS[precision]
        peaks = {name: peak_rate(kind, shape, dtype, args.seconds) for name, (kind, shape) in KERNELS.items()}
        found = {name: achieved(name, args.examples, args.epochs, args.grid_cells) for name in DOMINANT}
        for name, row in found.items():
            row["dominant_op"] = DOMINANT[name]
            row["fraction_of_peak"] = row["gflops"] / peaks[DOMINANT[name]]
        results["precisions"][precision] = {"peak_gflops": peaks, "achieved": found,
                                            "task1_core": task1_core(peaks, found)}
    keras.mixed_precision.set_global_policy("float32")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"roofline_{slug(about['name'])}.json"
    write_json_atomic(out, results)
    print(f"{about['name']} ({about['kind']}); written to {out}")
    for precision, part in results["precisions"].items():
        print(f"\n{precision}")
        for name, rate in part["peak_gflops"].items():
            print(f"  peak {name:40s} {rate:8.1f} GFLOP/s")
        for name, row in part["achieved"].items():
            print(f"  {name:45s} {row['gflops']:8.1f} GFLOP/s  {row['images_per_second']:9.0f} images/s  "
                  f"{row['fraction_of_peak']:6.1%} of its op's peak  {row['cores_busy']:.2f} cores busy")
        core = part["task1_core"]
        print(f"  Task 1 core: {core['teacher_tflop'] + core['students_tflop']:.1f} TFLOP of training, at least "
              f"{core['seconds_at_peak'] / 60:.1f} min at these peaks, {core['seconds_at_achieved'] / 60:.1f} min "
              "at the rates achieved")
    return results


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


if __name__ == "__main__":
    main()
