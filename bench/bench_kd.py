"""Benchmark: KD-student training on MNIST, this toolkit vs what a user would write.

Three ways to train the same MLP student from the same CNN teacher on the same
data, in one process, at the same T, alpha, batch size, optimizer and epochs:

- `toolkit`: `kdtoolkit.training.fit` with the teacher's logits computed once
  (the precomputation is included in the timing);
- `library`: the toolkit's own `kdtoolkit.distiller.Distiller` + `compile` + `fit`
  (Keras' loop over the toolkit's step, teacher logits cached once, included);
- `keras_distiller`: `keras.distillation.Distiller` + `compile` + `fit`, which runs
  the teacher on every step;
- `eager_loop`: a plain `tf.GradientTape` loop without `tf.function`, teacher on
  every step (the notebook way).

The toolkit also runs with several steps per compiled call and with an XLA-compiled
step (`--steps-per-call`, `--jit on` of the task commands). Then the T x alpha
grid (scaled down: `--grid-cells` cells of `--epochs` epochs): the toolkit cell by
cell, the toolkit with the cells fused in one step in both forms of `kdtoolkit.speed.fused`
(looped: one model per cell, `--fuse-grid on`; stacked: the cells' weights stacked,
`--fuse-grid stacked`), and Distiller. Writes `bench/results/kd_mnist.json`
and prints a table.

    python bench/bench_kd.py --data-dir ../shared/data/mnist
"""

import argparse
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
from kdtoolkit import device, losses, methods, training
from kdtoolkit.runner import runs  # noqa: E402
from kdtoolkit.distiller import Distiller  # noqa: E402
from kdtoolkit.speed.fused import Fused, Stacked  # noqa: E402
from kdtoolkit.files import write_json_atomic  # noqa: E402
from task1_mnist import data as mnist  # noqa: E402
from task1_mnist.models import build_student, build_teacher  # noqa: E402

GRID = [(1.0, 0.2), (4.0, 0.5), (16.0, 0.8), (2.0, 0.5), (32.0, 0.2), (64.0, 0.8)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--epochs", type=int, default=2, help="epochs per KD run (default 2)")
    parser.add_argument("--eager-steps", type=int, default=60, help="steps timed for the eager loop")
    parser.add_argument("--grid-cells", type=int, default=3, help="grid cells timed (<= 6)")
    parser.add_argument("--teacher-weights", default=str(ROOT / "results/task1/teacher-s0/model.weights.h5"),
                        help="trained teacher; trained for 1 epoch when the file is missing")
    parser.add_argument("--limit", type=int, help="use the first N images only (smoke test)")
    parser.add_argument("--steps-per-call", type=int, default=8, help="steps per compiled call of the extra row")
    parser.add_argument("--library-rounds", type=int, default=0,
                        help="only compare the library's Distiller.fit with the toolkit's loop, in this many "
                             "interleaved rounds (written to bench/results/library_vs_loop.json)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/kd_mnist.json"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device.configure()  # memory growth, as the task commands set it
    tf.get_logger().setLevel("ERROR")  # Keras' predict retracing notices
    arrays = mnist.load_mnist(args.data_dir, args.limit)
    x_train = arrays["x_train"].astype(np.float32) / 255.0
    x_test = arrays["x_test"].astype(np.float32) / 255.0
    y_train, y_test = arrays["y_train"].astype(np.int32), arrays["y_test"].astype(np.int32)
    n = len(y_train)
    batch, lr = 256, 1e-3

    teacher = load_or_train_teacher(args.teacher_weights, arrays, batch, lr)
    teacher.trainable = False

    def test_accuracy(model):
        return float(np.mean(np.argmax(model.predict(x_test, batch_size=1024, verbose=0), -1) == y_test))

    def toolkit(temperature, alpha, epochs, logits=None, **step_options):
        """Returns (seconds, student); `logits` reuses a precomputation (grid);
        `step_options`: `jit`, `steps_per_call` of `training.fit`."""
        runs.set_seed(0)
        start = time.perf_counter()
        if logits is None:
            logits = common_data.teacher_outputs(teacher, {"x": x_train, "y": y_train}, 1024)["logits"]
        student = build_student()
        data = common_data.batched({"x": x_train, "y": y_train, "teacher_logits": logits}, batch, shuffle=True, seed=0)
        training.fit(methods.Distillation(student, temperature=temperature, alpha=alpha), data, epochs=epochs,
                     optimizer=keras.optimizers.Adam(lr), **step_options)
        return time.perf_counter() - start, student

    def toolkit_fused(cells, epochs, logits, form):
        """The cells' students in one compiled step (`kdtoolkit.speed.fused`; `form` is `Fused`
        or `Stacked`); returns (students, seconds of the first epoch, which traces the
        step, and of the last)."""
        students = []
        for _ in cells:
            runs.set_seed(0)
            with keras.name_scope(f"fused{len(students)}"):
                students.append(build_student())
        fused = form([methods.Distillation(s, temperature=tc, alpha=ac) for s, (tc, ac) in zip(students, cells)])
        data = common_data.batched({"x": x_train, "y": y_train, "teacher_logits": logits}, batch, shuffle=True, seed=0)
        history = training.fit(fused, data, epochs=epochs, optimizer=keras.optimizers.Adam(lr))
        fused.sync_members()
        return students, history[0]["seconds"], history[-1]["seconds"]

    def library(temperature, alpha, epochs):
        runs.set_seed(0)
        start = time.perf_counter()
        student = build_student()
        distiller = Distiller(teacher, student, "kd", temperature=temperature, alpha=alpha)
        distiller.compile(optimizer=keras.optimizers.Adam(lr))
        distiller.fit(x_train, y_train, batch_size=batch, epochs=epochs, verbose=0)
        return time.perf_counter() - start, student

    def keras_distiller(temperature, alpha, epochs):
        runs.set_seed(0)
        start = time.perf_counter()
        student = build_student()
        distiller = keras.distillation.Distiller(
            teacher=teacher, student=student,
            # An explicit KLDivergence instance: with the default loss="kl_divergence" string,
            # Keras 3.15.1 resolves a plain function, skips its softmax + T^2 branch and
            # computes KL on raw logits / T, which is not Hinton's loss.
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=temperature, loss=keras.losses.KLDivergence()),
            student_loss_weight=alpha,
        )
        distiller.compile(optimizer=keras.optimizers.Adam(lr),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        distiller.fit(x_train, y_train, batch_size=batch, epochs=epochs, shuffle=True, verbose=0)
        return time.perf_counter() - start, student

    def eager_loop(temperature, alpha, steps):
        runs.set_seed(0)
        student = build_student()
        optimizer = keras.optimizers.Adam(lr)
        data = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(n, seed=0).batch(batch).repeat()
        start = time.perf_counter()
        for x, y in data.take(steps):
            teacher_logits = teacher(x, training=False)
            with tf.GradientTape() as tape:
                logits = student(x, training=True)
                loss = losses.student_loss(y, logits, teacher_logits, temperature, alpha)
            grads = tape.gradient(loss, student.trainable_variables)
            optimizer.apply_gradients(zip(grads, student.trainable_variables))
        return time.perf_counter() - start

    t, alpha, epochs = 4.0, 0.5, args.epochs
    if args.library_rounds:
        return library_against_loop(args, toolkit, library, test_accuracy, t, alpha, epochs, n)
    rows = []
    print(f"KD student, T={t:g} alpha={alpha:g}, {epochs} epochs of {n} images ...", flush=True)
    seconds, student = toolkit(t, alpha, epochs)
    rows.append(row("toolkit (cached teacher logits, compiled step)", seconds, epochs * n, test_accuracy(student)))
    for label, options in ((f"toolkit, {args.steps_per_call} steps per call", {"steps_per_call": args.steps_per_call}),
                           ("toolkit, XLA-compiled step", {"jit": True})):
        seconds, student = toolkit(t, alpha, epochs, **options)
        rows.append(row(label, seconds, epochs * n, test_accuracy(student)))
    seconds, student = library(t, alpha, epochs)
    rows.append(row("kdtoolkit.distiller.Distiller.fit (cached teacher logits)", seconds, epochs * n,
                    test_accuracy(student)))
    seconds, student = keras_distiller(t, alpha, epochs)
    rows.append(row("keras.distillation.Distiller.fit", seconds, epochs * n, test_accuracy(student)))
    seconds = eager_loop(t, alpha, args.eager_steps)
    rows.append(row(f"plain eager GradientTape loop ({args.eager_steps} steps)", seconds, args.eager_steps * batch, None))

    cells = GRID[: args.grid_cells]
    print(f"Grid of {len(cells)} cells x {epochs} epochs ...", flush=True)
    start = time.perf_counter()
    logits = common_data.teacher_outputs(teacher, {"x": x_train, "y": y_train}, 1024)["logits"]
    grid_ours = [test_accuracy(toolkit(tc, ac, epochs, logits)[1]) for tc, ac in cells]
    grid_ours_s = time.perf_counter() - start
    fused = {}
    for form in (Fused, Stacked):
        start = time.perf_counter()
        logits = common_data.teacher_outputs(teacher, {"x": x_train, "y": y_train}, 1024)["logits"]
        students, first_epoch_s, last_epoch_s = toolkit_fused(cells, epochs, logits, form)
        fused[form.form] = {"seconds": time.perf_counter() - start, "first_epoch_seconds": first_epoch_s,
                            "last_epoch_seconds": last_epoch_s,
                            "accuracies": [test_accuracy(student) for student in students]}
    start = time.perf_counter()
    grid_keras = [test_accuracy(keras_distiller(tc, ac, epochs)[1]) for tc, ac in cells]
    grid_keras_s = time.perf_counter() - start

    by = {r["method"].split(" ")[0]: r for r in reversed(rows)}  # "toolkit": its first, plain row
    result = {
        "benchmark": "KD student training on MNIST (MLP student, CNN teacher)",
        "command": "python bench/bench_kd.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {"temperature": t, "alpha": alpha, "epochs": epochs, "batch_size": batch,
                     "train_images": n, "grid_cells": cells},
        "environment": runs.environment(),
        "cpu_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "kd_student": rows,
        "speedup_vs_distiller": by["toolkit"]["images_per_s"] / by["keras.distillation.Distiller.fit"]["images_per_s"],
        "speedup_vs_eager": by["toolkit"]["images_per_s"] / by["plain"]["images_per_s"],
        "library_speedup_vs_distiller": (by["kdtoolkit.distiller.Distiller.fit"]["images_per_s"]
                                         / by["keras.distillation.Distiller.fit"]["images_per_s"]),
        "grid": {
            "toolkit_seconds": grid_ours_s, "distiller_seconds": grid_keras_s, "speedup": grid_keras_s / grid_ours_s,
            "toolkit_accuracies": grid_ours, "distiller_accuracies": grid_keras,
            **{f"{form}_{key}": value for form, figures in fused.items() for key, value in figures.items()},
            **{f"{form}_speedup": grid_keras_s / figures["seconds"] for form, figures in fused.items()},
        },
        "peak_rss_mib": runs.peak_rss_mib(),
    }
    write_json_atomic(args.out, result)
    print(format_table(result))
    print(f"written to {args.out}")
    return 0


def library_against_loop(args, toolkit, library, test_accuracy, t, alpha, epochs, n):
    """The library's `Distiller.fit` against the toolkit's compiled loop on the same KD
    student, in `--library-rounds` interleaved rounds (each round runs both, so a
    slower moment of the machine costs both); medians written to
    `bench/results/library_vs_loop.json`."""
    import statistics

    times = {"toolkit": [], "library": []}
    accuracy = {}
    for round_ in range(args.library_rounds):
        for name, train in (("toolkit", toolkit), ("library", library)):
            seconds, student = train(t, alpha, epochs)
            times[name].append(seconds)
            accuracy[name] = test_accuracy(student)
            print(f"round {round_ + 1}: {name} {seconds:.1f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "benchmark": "KD student on MNIST: kdtoolkit.distiller.Distiller.fit against kdtoolkit.training.fit",
        "command": "python bench/bench_kd.py " + " ".join(sys.argv[1:]),
        "settings": {"temperature": t, "alpha": alpha, "epochs": epochs, "batch_size": 256, "train_images": n},
        "environment": runs.environment(),
        "seconds": times, "median_seconds": median,
        "images_per_s": {name: epochs * n / seconds for name, seconds in median.items()},
        "library_relative_speed": median["toolkit"] / median["library"],
        "test_accuracy_last_round": accuracy,
    }
    out = ROOT / "bench/results/library_vs_loop.json"
    write_json_atomic(out, result)
    print(f"library / toolkit speed: {result['library_relative_speed']:.3f} "
          f"({result['images_per_s']['library']:,.0f} against {result['images_per_s']['toolkit']:,.0f} images/s)")
    print(f"written to {out}")
    return 0


def row(method, seconds, images, accuracy):
    return {"method": method, "seconds": seconds, "images": images,
            "images_per_s": images / seconds, "test_accuracy": accuracy}


def load_or_train_teacher(path, arrays, batch, lr):
    teacher = build_teacher()
    if Path(path).exists():
        teacher.load_weights(path)
        print(f"teacher: weights from {path}")
        return teacher
    print("teacher: no saved weights, training 1 epoch", flush=True)
    runs.set_seed(0)
    data = common_data.batched({"x": arrays["x_train"], "y": arrays["y_train"]}, batch, shuffle=True, seed=0,
                               map_fn=mnist.scale)
    training.fit(methods.CrossEntropy(teacher), data, epochs=1, optimizer=keras.optimizers.Adam(lr))
    return teacher


def format_table(result):
    lines = ["| method | images/s | seconds | test accuracy |", "|---|---:|---:|---:|"]
    for r in result["kd_student"]:
        acc = "—" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        lines.append(f"| {r['method']} | {r['images_per_s']:,.0f} | {r['seconds']:.1f} | {acc} |")
    g = result["grid"]
    lines += [
        "",
        f"KD student speed-up: {result['speedup_vs_distiller']:.2f}x vs Distiller.fit, "
        f"{result['speedup_vs_eager']:.2f}x vs eager loop; the toolkit's Distiller.fit "
        f"{result['library_speedup_vs_distiller']:.2f}x vs Keras' Distiller.fit",
        f"Grid ({len(result['settings']['grid_cells'])} cells x {result['settings']['epochs']} epochs): "
        f"toolkit {g['toolkit_seconds']:.1f}s, fused looped {g['looped_seconds']:.1f}s "
        f"(first epoch {g['looped_first_epoch_seconds']:.1f}s, last {g['looped_last_epoch_seconds']:.1f}s), "
        f"fused stacked {g['stacked_seconds']:.1f}s (first epoch {g['stacked_first_epoch_seconds']:.1f}s, "
        f"last {g['stacked_last_epoch_seconds']:.1f}s), Distiller.fit {g['distiller_seconds']:.1f}s; "
        f"speed-up {g['speedup']:.2f}x (looped {g['looped_speedup']:.2f}x, stacked {g['stacked_speedup']:.2f}x)",
        "grid accuracies toolkit:   " + ", ".join(f"{a:.4f}" for a in g["toolkit_accuracies"]),
        "grid accuracies looped:    " + ", ".join(f"{a:.4f}" for a in g["looped_accuracies"]),
        "grid accuracies stacked:   " + ", ".join(f"{a:.4f}" for a in g["stacked_accuracies"]),
        "grid accuracies Distiller: " + ", ".join(f"{a:.4f}" for a in g["distiller_accuracies"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
