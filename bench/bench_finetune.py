"""Benchmark: Task 2 fine-tuning images/s against the hardware anchor, the model's
roofline and Keras' own fit, at each precision.

For each precision (`--precisions`, default float32 and bfloat16, all in one
process so their ratios compare) and architecture (`--architectures`), everything
trainable (the fine-tuning phase), cross-entropy, Adam, at `--batch-size` and
`--jit`:

- `anchor`: one compiled train step on a single batch that stays on the device,
  repeated: what the hardware does for this model with no input pipeline at all;
- `toolkit`: `kdtoolkit.training.fit` on Task 2's pipeline (uint8 images decoded once,
  turned into random dihedral views on the device);
- `keras_fit`: `Model.compile` + `Model.fit` on the same batches, what a user would
  write;
- `inference`: a compiled forward pass on a resident batch of `inference_batch()`
  images (what teacher-output and feature passes are bounded by);
- `roofline`: every convolution and dense layer's forward op timed alone at its
  shape and the batch size (`roofline.model_roofline`), so the model's peak
  GFLOP/s; the anchor, toolkit and Keras rates are given as a fraction of it
  (training flops: 3x the forward's).

Then the KD student (MobileNetV2 from the ResNet50V2 teacher): the toolkit with
the teacher's logits cached per view, against `keras.distillation.Distiller.fit`
with the teacher running on every step. Epoch figures are the median of the
epochs after the first (`--epochs`, default 3; the first traces the step), and
the precisions alternate within each architecture, so a drift in the machine's
speed falls on all of them alike. With MobileNetV2, ResNet50V2 and
DenseNet121 timed (toolkit and inference) at 224 px, each precision also gets an
estimate of the default course table's hours (`course_estimate`). Writes
`bench/results/finetune.json` with the device's name.

    python -m task2_mhist.synthetic --out /tmp/mhist --annotations ../shared/data/mhist/annotations.csv
    python bench/bench_finetune.py --data-dir /tmp/mhist --limit 256
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdtoolkit.runner import cli  # noqa: E402

cli.import_tensorflow_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import roofline  # noqa: E402  (bench/, beside this file)
from kdtoolkit.runner import config as cfg  # noqa: E402
from kdtoolkit import device, methods, training
from kdtoolkit.runner import runs  # noqa: E402
from kdtoolkit.data import validation_count  # noqa: E402
from kdtoolkit.files import write_json_atomic  # noqa: E402
from task2_mhist import data as mhist  # noqa: E402
from task2_mhist import models  # noqa: E402
from task2_mhist.config import Task2Config  # noqa: E402
from task2_mhist.experiments import Task2  # noqa: E402
from task2_mhist.frozen import inference_batch  # noqa: E402


PARTS = ("anchor", "toolkit", "keras_fit", "inference", "roofline", "kd")
ROOFLINE_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="MHIST-layout folder")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=256, help="first N train images (an epoch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precisions", type=cli.name_list, default=("float32", "mixed_bfloat16"),
                        help=f"comma list of {', '.join(device.PRECISION_CHOICES)}, each timed in this process")
    parser.add_argument("--jit", default="auto", choices=device.JIT)
    parser.add_argument("--weights", default="none",
                        help="none, or a folder of Keras no-top weight files (the default pretrained path)")
    parser.add_argument("--architectures", type=cli.name_list, default=(models.STUDENT, models.TEACHER))
    parser.add_argument("--anchor-steps", type=int, default=10, help="timed steps of the anchor")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of each toolkit and Keras fit; the median of those after the first is timed")
    parser.add_argument("--parts", type=cli.name_list, default=PARTS,
                        help=f"what to time, comma list of {','.join(PARTS)} (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/finetune.json"))
    args = parser.parse_args(argv)
    try:
        cfg.choices("precisions", args.precisions, device.PRECISION_CHOICES, "--precisions")
    except cfg.ConfigError as err:
        parser.error(str(err))
    return args


def main(argv=None):
    args = parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    precisions = list(dict.fromkeys(device.resolve_precision(p)[0] for p in args.precisions))
    jit = device.use_jit(args.jit)
    measured = {precision: {"fine_tuning_images_per_s": []} for precision in precisions}
    with tempfile.TemporaryDirectory() as scratch:
        config = Task2Config(data_dir=args.data_dir, out=scratch, weights=args.weights, image_size=args.image_size,
                             limit=args.limit, batch_size=args.batch_size, validation=0, quiet=True)
        task = Task2(config)
        timers = Timers(args, task, jit)
        # Precisions alternate within each architecture, so a drift in this machine's speed
        # (it moves by up to 2x from hour to hour) falls on both alike.
        for architecture in args.architectures:
            for precision in precisions:
                device.configure(precision=precision)
                measured[precision]["fine_tuning_images_per_s"].append(timers.row(architecture, precision))
        for precision in precisions:
            device.configure(precision=precision)
            measured[precision]["kd_student_images_per_s"] = timers.kd_student() if "kd" in args.parts else None
            measured[precision]["course_estimate"] = course_estimate(
                measured[precision]["fine_tuning_images_per_s"], args.image_size)
    keras.mixed_precision.set_global_policy("float32")
    result = {
        "benchmark": "Task 2 fine-tuning images/s: hardware anchor, toolkit, Keras fit, the model's roofline; "
                     "KD student vs Distiller.fit",
        "command": "python bench/bench_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device.describe(),
        "settings": {"image_size": args.image_size, "train_images": timers.n, "batch_size": args.batch_size,
                     "epochs": args.epochs, "jit": jit, "weights": args.weights, "inference_batch": inference_batch()},
        "environment": runs.environment(),
        "precisions": measured,
        "peak_rss_mib": runs.peak_rss_mib(),
    }
    write_json_atomic(args.out, result)
    print(format_table(result))
    print(f"written to {args.out}")
    return 0


class Timers:
    """The timed parts on one task's pipeline: `row(architecture, precision)` and
    `kd_student()`, each at Keras' current global precision policy."""

    def __init__(self, args, task, jit):
        self.args, self.task, self.jit = args, task, jit
        self.n = len(task.splits["train"])
        self.extra = task.train_data()

    def build(self, architecture):
        runs.set_seed(0)
        model = models.build(architecture, self.args.weights, self.args.image_size)
        models.set_base_trainable(model, True)
        return model

    def steady(self, history):
        """`(images/s of the median epoch after the first, those epochs' seconds)`."""
        seconds = [h["seconds"] for h in history[1:]]
        return self.n / statistics.median(seconds), seconds

    def toolkit(self, method, arrays):
        """`{"toolkit": steady images/s, "toolkit_epoch_s": the later epochs' seconds,
        "toolkit_first_epoch_s": trace + compile + one epoch}`."""
        history = training.fit(method, self.task.train_dataset(arrays), epochs=self.args.epochs, jit=self.jit,
                               prepare=mhist.show, optimizer=device.optimizer(keras.optimizers.Adam(1e-4)))
        rate, seconds = self.steady(history)
        return {"toolkit": rate, "toolkit_epoch_s": seconds, "toolkit_first_epoch_s": history[0]["seconds"]}

    def keras_fit(self, model_or_distiller, loss=None):
        model_or_distiller.compile(optimizer=device.optimizer(keras.optimizers.Adam(1e-4)), jit_compile=self.jit,
                                   loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        data = self.task.train_dataset(self.extra).map(lambda b: (mhist.show(b)["x"], b["y"]))
        times = EpochTimes()
        model_or_distiller.fit(data, epochs=self.args.epochs, verbose=0, callbacks=[times])
        return self.steady(times.history)[0]

    def row(self, architecture, precision):
        """One architecture's timed parts (`--parts`) at `precision` (already set)."""
        parts = {"anchor": lambda: {"anchor": anchor(self.build(architecture), self.args, self.jit)},
                 "toolkit": lambda: self.toolkit(methods.CrossEntropy(self.build(architecture)), self.extra),
                 "keras_fit": lambda: {"keras_fit": self.keras_fit(self.build(architecture))},
                 "inference": lambda: {"inference": inference(self.build(architecture), self.args)},
                 "roofline": lambda: {"roofline": roofline.model_roofline(
                     self.build(architecture), self.args.batch_size, ROOFLINE_DTYPES[precision])}}
        print(f"{architecture} at {precision}: {', '.join(p for p in self.args.parts if p in parts)} ...", flush=True)
        row = {"architecture": architecture, "toolkit_first_epoch_s": None}
        for part in (p for p in parts if p in self.args.parts):
            row.update(parts[part]())
        if "roofline" in row:  # a training step's flops: 3x the forward's
            for part in ("anchor", "toolkit", "keras_fit"):
                if part in row:
                    row[f"{part}_fraction_of_peak"] = (row[part] * 3 * row["roofline"]["forward_gflop_per_image"]
                                                       / row["roofline"]["peak_gflops"])
        print(row, flush=True)
        return row

    def kd_student(self):
        """KD student images/s: the toolkit on cached per-view teacher logits against
        `keras.distillation.Distiller.fit` with the teacher running on every step."""
        print("KD student: cached teacher logits vs Distiller.fit with a live teacher ...", flush=True)
        teacher = self.build(models.TEACHER)
        logits = self.task.frozen.per_view(teacher, "[teacher] logits")
        found = self.toolkit(methods.Distillation(self.build(models.STUDENT), temperature=4.0, alpha=0.5),
                             {**self.extra, "teacher_logits": logits})
        kd = {"toolkit_cached_logits": found["toolkit"], "toolkit_first_epoch_s": found["toolkit_first_epoch_s"]}
        teacher.trainable = False
        distiller = keras.distillation.Distiller(
            teacher=teacher, student=self.build(models.STUDENT), student_loss_weight=0.5,
            distillation_losses=keras.distillation.LogitsDistillation(temperature=4.0, loss=keras.losses.KLDivergence()))
        kd["distiller_fit"] = self.keras_fit(distiller)
        kd["speedup"] = kd["toolkit_cached_logits"] / kd["distiller_fit"]
        return kd


def course_work(config=None, train=2175, test=977):
    """The default Task 2 course table's images per architecture (`--only` the
    course's experiments at `config`, default Task2Config(); MHIST's 2,175 train
    images, `config.validation` of them held out, and 977 test):
    `{architecture: {"models", "finetune_images", "inference_images"}}`.

    Fine-tuned models: ResNet50V2 the teacher, the subclass teacher (`skd`),
    SFTN's teacher (counted as a plain one) and `pretrained`'s randomly initialised
    teacher; DenseNet121 the assistant (`takd`); MobileNetV2 the KD, scratch,
    T-curve (every T but the course's), subclass, TAKD students, one per other
    method, and `pretrained`'s random-init one. Each trains `ft_epochs` epochs and is
    evaluated on the validation and test images after each. Inference also
    covers one base-feature pass per distinct base (each view of the training set,
    then the held-out images; feature extraction then trains on them, almost free)
    and one logits pass over each view of the training set per distilled-from
    teacher (the three ResNet50V2 teachers, the assistant)."""
    config = config or Task2Config()
    held_out = validation_count(config.validation, train)
    fit, evaluated = train - held_out, held_out + test
    views = mhist.NUM_VIEWS if config.augment else 1
    random_init = config.weights != "none"
    students = 2 + (len(config.temperatures) - (config.temperature in config.temperatures)) \
        + len(methods.OTHER_METHODS) + 2 + random_init
    plan = {models.TEACHER: (3 + random_init, 1 + random_init, 3), models.ASSISTANT: (1, 1, 1),
            models.STUDENT: (students, 1 + random_init, 0)}  # fine-tuned models, distinct bases, logits passes
    work = {}
    for architecture, (fine_tuned, bases, teachers) in plan.items():
        work[architecture] = {
            "models": fine_tuned,
            "finetune_images": fine_tuned * config.ft_epochs * fit,
            "inference_images": fine_tuned * config.ft_epochs * evaluated + bases * (views * fit + evaluated)
            + teachers * views * fit}
    return work


def course_estimate(rows, image_size):
    """Hours the default course table needs at the measured toolkit (fine-tuning) and
    inference images/s of `rows` (`course_work`), or None unless every architecture
    it trains was timed at 224 px. A floor of the training and inference alone:
    LIME, occlusion, export and per-run start-up (minutes in all) are left out."""
    rates = {r["architecture"]: r for r in rows if "toolkit" in r and "inference" in r}
    work = course_work()
    if image_size != 224 or not set(work) <= set(rates):
        return None
    by = {a: {**w, "hours": (w["finetune_images"] / rates[a]["toolkit"] + w["inference_images"] / rates[a]["inference"])
              / 3600} for a, w in work.items()}
    return {"hours": sum(part["hours"] for part in by.values()), "by_architecture": by}


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

    s = result["settings"]
    lines = [f"images/s at {s['image_size']} px, batch {s['batch_size']}; peak: the model's roofline "
             "(GFLOP/s of its weight layers' forward ops at batch size); % of it: the toolkit's training rate", "",
             "| precision | architecture | anchor | toolkit | Keras fit | inference | peak GFLOP/s | toolkit % of peak | "
             "toolkit first epoch s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for precision, part in result["precisions"].items():
        for r in part["fine_tuning_images_per_s"]:
            peak = r.get("roofline", {}).get("peak_gflops")
            share = r.get("toolkit_fraction_of_peak")
            lines.append(f"| {precision} | {r['architecture']} | {cell(r.get('anchor'), 1)} | {cell(r.get('toolkit'), 1)} | "
                         f"{cell(r.get('keras_fit'), 1)} | {cell(r.get('inference'), 1)} | {cell(peak)} | "
                         f"{cell(None if share is None else 100 * share, 1)} | {cell(r['toolkit_first_epoch_s'], 1)} |")
    for precision, part in result["precisions"].items():
        kd, estimate = part["kd_student_images_per_s"], part["course_estimate"]
        if kd:
            lines.append(f"{precision}: KD student: toolkit {kd['toolkit_cached_logits']:,.1f} images/s, Distiller.fit "
                         f"{kd['distiller_fit']:,.1f}: {kd['speedup']:.2f}x")
        if estimate:
            lines.append(f"{precision}: the course table needs about {estimate['hours']:.1f} h of training and "
                         "inference at these rates (" + ", ".join(f"{a} {w['hours']:.1f} h"
                                                               for a, w in estimate["by_architecture"].items()) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
