"""Benchmark: Task 2 fine-tuning images/s against the hardware anchor and Keras' own fit.

For each architecture (`--architectures`), everything trainable (the fine-tuning
phase), cross-entropy, Adam, at `--precision`, `--batch-size` and `--jit`, in one
process:

- `anchor`: one compiled train step on a single batch that stays on the device,
  repeated: what the hardware does for this model with no input pipeline at all;
- `toolkit`: `common.training.fit` on Task 2's pipeline (uint8 images decoded once,
  turned into random dihedral views on the device);
- `keras_fit`: `Model.compile` + `Model.fit` on the same batches, what a user would
  write;
- `inference`: a compiled forward pass on a resident batch of `inference_batch()`
  images (what teacher-output and feature passes are bounded by).

Then the KD student (MobileNetV2 from the ResNet50V2 teacher): the toolkit with
the teacher's logits cached per view, against `keras.distillation.Distiller.fit`
with the teacher running on every step. Epoch figures are steady state (the first
epoch, which traces the step, is left out). Writes `bench/results/finetune.json`
with the device's name.

    python -m task2_mhist.synthetic --out /tmp/mhist --annotations ../shared/data/mhist/annotations.csv
    python bench/bench_finetune.py --data-dir /tmp/mhist --limit 256
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import cli  # noqa: E402

cli.import_tensorflow_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from common import device, methods, runs, training  # noqa: E402
from common.results import write_json_atomic  # noqa: E402
from task2_mhist import data as mhist  # noqa: E402
from task2_mhist import models  # noqa: E402
from task2_mhist.config import Task2Config  # noqa: E402
from task2_mhist.experiments import Task2  # noqa: E402
from task2_mhist.frozen import inference_batch  # noqa: E402


PARTS = ("anchor", "toolkit", "keras_fit", "inference", "kd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="MHIST-layout folder")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=256, help="first N train images (an epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="float32", choices=device.PRECISIONS)
    parser.add_argument("--jit", default="auto", choices=device.JIT)
    parser.add_argument("--weights", default="none",
                        help="none, or a folder of Keras no-top weight files (the default pretrained path)")
    parser.add_argument("--architectures", type=cli.name_list, default=(models.STUDENT, models.TEACHER))
    parser.add_argument("--anchor-steps", type=int, default=10, help="timed steps of the anchor")
    parser.add_argument("--parts", type=cli.name_list, default=PARTS,
                        help=f"what to time, comma list of {','.join(PARTS)} (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/finetune.json"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device.configure(precision=args.precision)
    jit = device.use_jit(args.jit)
    tf.get_logger().setLevel("ERROR")
    with tempfile.TemporaryDirectory() as scratch:
        config = Task2Config(data_dir=args.data_dir, out=scratch, weights=args.weights, image_size=args.image_size,
                             limit=args.limit, batch_size=args.batch_size, validation=0, quiet=True)
        task = Task2(config)
        n = len(task.splits["train"])
        extra = task.train_data()

        def build(architecture):
            runs.set_seed(0)
            model = models.build(architecture, args.weights, args.image_size)
            models.set_base_trainable(model, True)
            return model

        def steady(history):
            return sum(h["seconds"] for h in history[1:]) / (len(history) - 1)

        def toolkit(method, arrays):
            """`(steady images/s, first epoch's seconds: trace + compile + one epoch)`."""
            history = training.fit(method, task.train_dataset(arrays), epochs=2, jit=jit, prepare=mhist.show,
                                   optimizer=device.optimizer(keras.optimizers.Adam(1e-4)))
            return n / steady(history), history[0]["seconds"]

        def keras_fit(model_or_distiller, loss=None):
            model_or_distiller.compile(optimizer=device.optimizer(keras.optimizers.Adam(1e-4)), jit_compile=jit,
                                       loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            data = task.train_dataset(extra).map(lambda b: (mhist.show(b)["x"], b["y"]))
            times = EpochTimes()
            model_or_distiller.fit(data, epochs=2, verbose=0, callbacks=[times])
            return n / steady(times.history)

        rows = []
        timed = {"anchor": lambda a: anchor(build(a), args, jit),
                 "toolkit": lambda a: toolkit(methods.CrossEntropy(build(a)), extra),
                 "keras_fit": lambda a: keras_fit(build(a)),
                 "inference": lambda a: inference(build(a), args)}
        for architecture in args.architectures:
            print(f"{architecture}: {', '.join(p for p in args.parts if p in timed)} ...", flush=True)
            row = {"architecture": architecture, "toolkit_first_epoch_s": None}
            row.update({part: timed[part](architecture) for part in timed if part in args.parts})
            if "toolkit" in row:
                row["toolkit"], row["toolkit_first_epoch_s"] = row["toolkit"]
            print(row, flush=True)
            rows.append(row)
        kd = kd_student(args, task, build, extra, toolkit, keras_fit) if "kd" in args.parts else None

    result = {
        "benchmark": "Task 2 fine-tuning images/s: hardware anchor, toolkit, Keras fit; KD student vs Distiller.fit",
        "command": "python bench/bench_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {"image_size": args.image_size, "train_images": n, "batch_size": args.batch_size,
                     "precision": args.precision, "jit": jit, "weights": args.weights,
                     "inference_batch": inference_batch()},
        "environment": runs.environment(),
        "fine_tuning_images_per_s": rows,
        "kd_student_images_per_s": kd,
        "peak_rss_mib": runs.peak_rss_mib(),
    }
    write_json_atomic(args.out, result)
    print(format_table(result))
    print(f"written to {args.out}")
    return 0


def kd_student(args, task, build, extra, toolkit, keras_fit):
    """KD student images/s: the toolkit on cached per-view teacher logits against
    `keras.distillation.Distiller.fit` with the teacher running on every step."""
    print("KD student: cached teacher logits vs Distiller.fit with a live teacher ...", flush=True)
    teacher = build(models.TEACHER)
    logits = task.frozen.per_view(teacher, "[teacher] logits")
    kd = dict(zip(("toolkit_cached_logits", "toolkit_first_epoch_s"),
                  toolkit(methods.Distillation(build(models.STUDENT), temperature=4.0, alpha=0.5), {**extra, "teacher_logits": logits})))
    teacher.trainable = False
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=build(models.STUDENT), student_loss_weight=0.5,
        distillation_losses=keras.distillation.LogitsDistillation(temperature=4.0, loss=keras.losses.KLDivergence()))
    kd["distiller_fit"] = keras_fit(distiller)
    kd["speedup"] = kd["toolkit_cached_logits"] / kd["distiller_fit"]
    return kd


class EpochTimes(keras.callbacks.Callback):
    """Seconds of each epoch of a Keras `fit`, as `history` records."""

    def __init__(self):
        super().__init__()
        self.history = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({"seconds": time.perf_counter() - self.start})


def anchor(model, args, jit):
    """Images/s of a compiled cross-entropy step on one resident batch (no input pipeline)."""
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)),
                    tf.float32)
    y = tf.constant(np.arange(args.batch_size) % 2, tf.int32)
    optimizer = device.optimizer(keras.optimizers.Adam(1e-4))

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            scaled = optimizer.scale_loss(loss)
        optimizer.apply_gradients(zip(tape.gradient(scaled, model.trainable_variables), model.trainable_variables))
        return loss

    for _ in range(2):
        float(step())
    start = time.perf_counter()
    for _ in range(args.anchor_steps):
        loss = step()
    float(loss)
    return args.anchor_steps * args.batch_size / (time.perf_counter() - start)


def inference(model, args):
    """Images/s of a compiled forward pass on one resident batch of `inference_batch()` images."""
    batch = inference_batch()
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, args.image_size, args.image_size, 3)), tf.float32)
    predict = training.compiled_predictor(model)
    predict(x).numpy()
    start = time.perf_counter()
    for _ in range(3):
        out = predict(x)
    out.numpy()
    return 3 * batch / (time.perf_counter() - start)


def format_table(result):
    def cell(value, digits=0):
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = ["| architecture | anchor | toolkit | Keras fit | inference | toolkit first epoch s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["fine_tuning_images_per_s"]:
        lines.append(f"| {r['architecture']} | {cell(r.get('anchor'))} | {cell(r.get('toolkit'))} | "
                     f"{cell(r.get('keras_fit'))} | {cell(r.get('inference'))} | {cell(r['toolkit_first_epoch_s'], 1)} |")
    kd = result["kd_student_images_per_s"]
    s = result["settings"]
    lines += ["", f"images/s at {s['image_size']} px, batch {s['batch_size']}, {s['precision']}, XLA {s['jit']}"]
    if kd:
        lines.append(f"KD student: toolkit {kd['toolkit_cached_logits']:,.0f} images/s, Distiller.fit "
                     f"{kd['distiller_fit']:,.0f}: {kd['speedup']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
