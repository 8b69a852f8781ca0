"""Benchmark: what Task 2's caches save, against training without them.

On an MHIST-layout folder (the real one, or `python -m task2_mhist.synthetic`), in
one process, at one image size:

- feature extraction of the ResNet50V2 teacher (base frozen): `--epochs` epochs on
  the images (the base runs on every step) vs on cached base features (the base runs
  once per image and view; that computation is timed separately), giving the
  break-even epoch count;
- a fine-tuning KD epoch of the MobileNetV2 student: teacher logits cached once per
  image and view (`kdtoolkit.training.fit` with `"teacher_logits"` in the batches) vs a
  live teacher on every step (what `keras.distillation.Distiller` does).

Epoch seconds are steady-state (the first epoch, which traces the step, is left
out) and exclude evaluation; each figure also has its cores busy (process CPU
seconds / wall seconds), since an epoch that ran on fewer cores is not comparable.
Writes `bench/results/mhist.json`.

    python -m task2_mhist.synthetic --out /tmp/mhist --annotations ../shared/data/mhist/annotations.csv
    python bench/bench_mhist.py --data-dir /tmp/mhist --image-size 224 --limit 512
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdtoolkit.runner import cli  # noqa: E402

cli.import_tensorflow_quietly()

import keras  # noqa: E402

from kdtoolkit import methods, training
from kdtoolkit.runner import runs  # noqa: E402
from bench.run_times import later_epochs  # noqa: E402
from kdtoolkit.files import write_json_atomic  # noqa: E402
from task2_mhist import models  # noqa: E402
from task2_mhist import data as mhist  # noqa: E402
from task2_mhist.config import Task2Config  # noqa: E402
from task2_mhist.experiments import Task2  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="MHIST-layout folder")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int, help="first N train and test images only")
    parser.add_argument("--epochs", type=int, default=3, help="epochs trained each way (>= 2; the first is not timed)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/mhist.json"))
    return parser.parse_args(argv)


def timed(function):
    """`(wall seconds, cores busy, value)` of `function()`."""
    start, cpu_start = time.perf_counter(), time.process_time()
    value = function()
    seconds = time.perf_counter() - start
    return seconds, (time.process_time() - cpu_start) / seconds, value


def main(argv=None):
    args = parse_args(argv)
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2: the first epoch traces the step and is not timed")
    with tempfile.TemporaryDirectory() as scratch:
        config = Task2Config(data_dir=args.data_dir, out=scratch, weights="none", image_size=args.image_size,
                             limit=args.limit, quiet=True)
        task = Task2(config, log=print)
        n = len(task.splits["train"])
        extra = task.train_data()

        def frozen_teacher():
            runs.set_seed(0)
            model = models.build(models.TEACHER, "none", args.image_size)
            models.set_base_trainable(model, False)
            return model

        def steady_epochs(method, data):
            """Mean seconds of the epochs after the first, and their cores busy."""
            return later_epochs(training.fit(method, data, epochs=args.epochs, optimizer=keras.optimizers.Adam(1e-4),
                                             prepare=mhist.show))

        print(f"feature extraction, {args.epochs} epochs of {n} images at {args.image_size} px ...", flush=True)
        images_epoch, images_cores = steady_epochs(methods.CrossEntropy(frozen_teacher()), task.train_dataset(extra))
        teacher = frozen_teacher()
        features_seconds, features_cores, features = timed(lambda: task.frozen.base_features(teacher))
        head = models.split_at_base(teacher)[1]
        features_epoch, features_epoch_cores = steady_epochs(methods.CrossEntropy(head),
                                                             task.train_dataset(extra, features=features["train"]))

        print(f"KD student, {args.epochs} fine-tuning epochs each way ...", flush=True)
        logits_seconds, logits_cores, logits = timed(lambda: task.frozen.per_view(teacher, "[teacher] logits"))

        def kd_epoch(live_teacher):
            runs.set_seed(0)
            student = models.build(models.STUDENT, "none", args.image_size)
            method = methods.Distillation(student, temperature=4.0, alpha=0.5, teacher=teacher if live_teacher else None)
            arrays = extra if live_teacher else {**extra, "teacher_logits": logits}
            return steady_epochs(method, task.train_dataset(arrays))

        (cached_kd, cached_cores), (live_kd, live_cores) = kd_epoch(False), kd_epoch(True)

    saved_per_epoch = images_epoch - features_epoch
    result = {
        "benchmark": "Task 2 caches: frozen-base features and teacher logits (8 dihedral views)",
        "command": "python bench/bench_mhist.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {"image_size": args.image_size, "train_images": n, "views": task.views(),
                     "fe_epochs_timed": args.epochs, "batch_size": config.batch_size},
        "environment": runs.environment(),
        "feature_extraction": {
            "seconds_per_epoch_on_images": images_epoch,
            "seconds_to_cache_features": features_seconds,
            "seconds_per_epoch_on_features": features_epoch,
            "break_even_epochs": features_seconds / saved_per_epoch if saved_per_epoch > 0 else None,
            "cores_busy": {"epoch_on_images": images_cores, "caching_features": features_cores,
                           "epoch_on_features": features_epoch_cores},
        },
        "kd_student_finetune": {
            "seconds_to_cache_teacher_logits": logits_seconds,
            "seconds_per_epoch_cached_logits": cached_kd,
            "seconds_per_epoch_live_teacher": live_kd,
            "speedup_per_epoch": live_kd / cached_kd,
            "break_even_epochs": logits_seconds / (live_kd - cached_kd) if live_kd > cached_kd else None,
            "cores_busy": {"caching_teacher_logits": logits_cores, "epoch_cached_logits": cached_cores,
                           "epoch_live_teacher": live_cores},
        },
        "peak_rss_mib": runs.peak_rss_mib(),
    }
    write_json_atomic(args.out, result)
    print(format_table(result))
    print(f"written to {args.out}")
    return 0


def format_table(result):
    fe, kd = result["feature_extraction"], result["kd_student_finetune"]
    fe_cores, kd_cores = fe["cores_busy"], kd["cores_busy"]
    views = result["settings"]["views"]
    rows = [
        ("teacher FE epoch on images", fe["seconds_per_epoch_on_images"], fe_cores["epoch_on_images"]),
        (f"teacher base features, once ({views} views + test)", fe["seconds_to_cache_features"],
         fe_cores["caching_features"]),
        ("teacher FE epoch on cached features", fe["seconds_per_epoch_on_features"], fe_cores["epoch_on_features"]),
        (f"teacher logits, once ({views} views)", kd["seconds_to_cache_teacher_logits"],
         kd_cores["caching_teacher_logits"]),
        ("student KD fine-tuning epoch, cached logits", kd["seconds_per_epoch_cached_logits"],
         kd_cores["epoch_cached_logits"]),
        ("student KD fine-tuning epoch, live teacher", kd["seconds_per_epoch_live_teacher"],
         kd_cores["epoch_live_teacher"]),
    ]
    return "\n".join([
        "| | seconds | cores busy |", "|---|---:|---:|",
        *(f"| {name} | {seconds:.2f} | {cores:.2f} |" for name, seconds, cores in rows),
        "",
        f"FE break-even: {fe['break_even_epochs'] or float('nan'):.1f} epochs; KD per-epoch speed-up "
        f"{kd['speedup_per_epoch']:.2f}x, break-even {kd['break_even_epochs'] or float('nan'):.1f} epochs",
    ])


if __name__ == "__main__":
    sys.exit(main())
