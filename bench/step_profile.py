"""Benchmark: where a training step's time goes on this machine, at each precision.

For the KD student (cached teacher logits) and the CNN teacher, on one batch of
256 random MNIST-shaped images held on the device, each stage a compiled
`tf.function` timed alone (median of 5 trials of at least `--seconds`, after a
warm-up), each stage containing the one before:

- `forward`: the method's loss terms (the model's forward pass and the loss);
- `gradients`: + the backward pass (`tf.GradientTape.gradient`);
- `step`: + Adam's update: `kdtoolkit.training.descend`, the toolkit's step;
- `step (XLA)`: the same step XLA-compiled;
- `fit`: the toolkit's whole loop per step (`kdtoolkit.training.fit` over a
  `tf.data` pipeline of 32 batches, its metrics and per-call Python), the last
  of 3 epochs.

Differences between stages give the backward pass, the optimizer and the loop's
overhead. For the student, `matmuls only` times just the matrix products its
step performs (each Dense layer's forward product, its weight gradient and,
past the first layer, its input gradient), in the policy's compute dtype: the
arithmetic floor of the step; the rest of `step` is what is not arithmetic
(casts, bias, ReLU, softmax, the loss, Adam's float32 update). Each row records
the cores kept busy (process CPU seconds / wall seconds).

Writes `bench/results/step_profile_<device>.json` and prints a table.

    python bench/step_profile.py
"""

import argparse
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
from kdtoolkit.files import write_json_atomic  # noqa: E402
from task1_mnist.models import build_student, build_teacher  # noqa: E402

BATCH = 256
FIT_BATCHES = 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum time of each trial")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--out", help="default: bench/results/step_profile_<device>.json")
    return parser.parse_args(argv)


def timed(fn, seconds):
    """`(median ms per call, cores busy)` of compiled `fn` over 5 trials of >= `seconds`."""
    for _ in range(3):
        fn()
    rates, busy = [], []
    for _ in range(5):
        calls, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            fn()
            calls += 1
        wall = time.perf_counter() - start
        rates.append(1000 * wall / calls)
        busy.append((time.process_time() - cpu) / wall)
    return statistics.median(rates), statistics.median(busy)


def batch_arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(0, 1, (n, 28, 28, 1)).astype(np.float32),
            "y": rng.integers(0, 10, n).astype(np.int32),
            "teacher_logits": rng.normal(0, 3, (n, 10)).astype(np.float32)}


def make_method(name):
    runs.set_seed(0)
    if name == "teacher":
        return methods.CrossEntropy(build_teacher())
    return methods.Distillation(build_student(), temperature=4.0, alpha=0.5)


def stages(name, seconds):
    """`{stage: {"ms", "cores_busy"}}` of model `name` under the current dtype policy."""
    method = make_method(name)
    optimizer = keras.optimizers.Adam(1e-3)
    variables = method.trainable_variables
    optimizer.build(variables)
    batch = {k: tf.constant(v) for k, v in batch_arrays(BATCH).items()}

    def forward():
        terms, _ = method.loss_terms(batch, training=True)
        return tf.add_n([tf.cast(t, tf.float32) for t in terms.values()])

    def gradients():
        with tf.GradientTape() as tape:
            loss = forward()
        return tape.gradient(loss, variables)

    def step():
        return training.descend(method, optimizer, batch, variables)[1]

    found = {}
    for stage, fn in (("forward", tf.function(forward)), ("gradients", tf.function(gradients)),
                      ("step", tf.function(step)), ("step (XLA)", tf.function(step, jit_compile=True))):
        ms, busy = timed(fn, seconds)
        found[stage] = {"ms": ms, "cores_busy": busy}
    data = common_data.batched(batch_arrays(BATCH * FIT_BATCHES, seed=1), BATCH, shuffle=True, seed=0)
    last = training.fit(make_method(name), data, epochs=3, optimizer=keras.optimizers.Adam(1e-3))[-1]
    found["fit"] = {"ms": 1000 * last["seconds"] / FIT_BATCHES, "cores_busy": last["cpu_seconds"] / last["seconds"]}
    if name == "kd_student":
        found["matmuls only"] = dict(zip(("ms", "cores_busy"), timed(student_matmuls(method.model), seconds)))
    return found


def student_matmuls(model):
    """A compiled function doing just the matrix products of one training step of the
    MLP `model` at batch `BATCH`, in the policy's compute dtype."""
    dtype = keras.mixed_precision.global_policy().compute_dtype
    rng = np.random.default_rng(0)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    shapes = [(int(layer.kernel.shape[0]), int(layer.kernel.shape[1])) for layer in dense]
    weights = [tf.constant(rng.normal(size=s), dtype) for s in shapes]
    inputs = [tf.constant(rng.normal(size=(BATCH, n_in)), dtype) for n_in, _ in shapes]
    upstream = [tf.constant(rng.normal(size=(BATCH, n_out)), dtype) for _, n_out in shapes]

    @tf.function
    def products():
        total = tf.constant(0.0, dtype)
        for i, (w, x, g) in enumerate(zip(weights, inputs, upstream)):
            total += tf.reduce_sum(tf.matmul(x, w))  # forward
            total += tf.reduce_sum(tf.matmul(x, g, transpose_a=True))  # weight gradient
            if i:
                total += tf.reduce_sum(tf.matmul(g, w, transpose_b=True))  # input gradient
        return total

    return products


def main(argv=None):
    args = parse_args(argv)
    device.configure()
    tf.get_logger().setLevel("ERROR")
    about = device.describe()
    results = {"device": about, "batch": BATCH, "environment": runs.environment(), "precisions": {}}
    for precision in args.precisions.split(","):
        keras.mixed_precision.set_global_policy(precision)
        results["precisions"][precision] = {name: stages(name, args.seconds) for name in ("kd_student", "teacher")}
    keras.mixed_precision.set_global_policy("float32")
    from roofline import slug

    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"step_profile_{slug(about['name'])}.json"
    write_json_atomic(out, results)
    print(f"{about['name']} ({about['kind']}); written to {out}")
    for precision, models in results["precisions"].items():
        for name, found in models.items():
            print(f"\n{precision}, {name} (ms per step of {BATCH}, cores busy)")
            for stage, row in found.items():
                print(f"  {stage:14s} {row['ms']:8.2f} ms  {row['cores_busy']:.2f}")
    return results


if __name__ == "__main__":
    main()
