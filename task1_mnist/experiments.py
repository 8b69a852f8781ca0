"""Task 1 recipes: teacher, KD, scratch, T x alpha grid, FLOPs, soft-target entropy,
subclass KD, teacher-assistant KD chains and early-stopped teachers.

Every recipe trains through `kdtoolkit.training.fit` and records through
`kdtoolkit.runner.runs.run`, so each run is resumable and carries its config, seed,
versions, history and timings. A frozen model's logits on the training set are
computed once and reused by every student distilled from it (MNIST has no
augmentation, so they never change).
"""

import numpy as np

from kdtoolkit import data as common_data
from kdtoolkit import losses, methods, training
from kdtoolkit.deploy import explain
from kdtoolkit.runner import runs
from kdtoolkit.errors import DataError
from task1_mnist.fused_runs import distil_fused
from kdtoolkit.metrics import class_metrics
from kdtoolkit.runner.recipes import Recipes
from kdtoolkit.files import save_weights, write_csv_atomic
from kdtoolkit.runner.run_spec import method_stem, run_tag
from kdtoolkit.runner.studies import (attributions, data_efficiency, ensemble, explanation_dynamics, missing_class,
                            smoothed_teacher, teacher_capacity, training_noise)
from task1_mnist import data as mnist
from task1_mnist import models
from task1_mnist.models import NUM_CLASSES, build_assistant, build_student, build_teacher

EVAL_BATCH = 1024


STUDY_RUNS = {  # `kdtoolkit.runner.studies` on Task 1, run by name (`--only`); see docs/studies.md
    "missing": lambda task: missing_class.run(task, task.config.missing_class, build_student, {
        size: teacher_capacity.preset_teacher(task, size, models.TEACHER_PRESETS[size])
        for size in task.config.missing_teachers}),
    "smoothed": lambda task: smoothed_teacher.run(task, build_teacher),
    "efficiency": lambda task: data_efficiency.run(task, task.config.per_class, build_student),
    "ensemble": lambda task: ensemble.run(task, task.config.ensemble_seeds),
    "capacity": lambda task: teacher_capacity.run(task, models.TEACHER_PRESETS),
    "attributions": lambda task: attributions.run(
        task, *(part[:task.config.attribution_images] for part in task.test_arrays()), NUM_CLASSES),
    "noise": lambda task: training_noise.run(task, training_noise.LABELS, task.config.label_noise, build_teacher,
                                             build_student),
    "corruption": lambda task: training_noise.run(task, training_noise.IMAGES, task.config.image_noise,
                                                  build_teacher, build_student),
    "dynamics": lambda task: explanation_dynamics.run(
        task, *task.explanation_images(), task.teacher_checkpoints(), task.config.ensemble_seeds),
}


class Task1(Recipes):
    """Runs Task 1 experiments for one config and one seed over one loaded dataset."""

    studies = STUDY_RUNS
    experiments = ("flops", "teacher", "kd", "scratch", "entropy", "grid", *methods.OTHER_METHODS, "skd", "takd", "eskd",
                   "export", "lime", "occlusion", *studies)
    num_classes = NUM_CLASSES

    def __init__(self, config, arrays=None, seed=None, log=None):
        super().__init__(config, config.seeds[0] if seed is None else seed, log)
        arrays = arrays if arrays is not None else self.load_data(config)
        self.data = arrays
        self.data_id = common_data.fingerprint(*(arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")))
        held_out = common_data.validation_count(config.validation, len(arrays["y_train"]))
        train, val = common_data.stratified_split(arrays["y_train"], held_out)
        self.arrays = {**arrays, "x_train": arrays["x_train"][train], "y_train": arrays["y_train"][train],
                       "x_val": arrays["x_train"][val], "y_val": arrays["y_train"][val]}
        self.eval_sets = {
            split: common_data.batched({"x": self.arrays[f"x_{split}"], "y": self.arrays[f"y_{split}"]}, EVAL_BATCH,
                                       map_fn=mnist.scale)
            for split in (("val", "test") if held_out else ("test",))
        }

    @staticmethod
    def load_data(config):
        return mnist.load_mnist(config.data_dir, config.limit)

    def data_info(self):
        return {"source": self.arrays.get("source", "arrays given by the caller"), "fingerprint": self.data_id,
                "synthetic": False, **{name: int(len(self.arrays[f"y_{split}"]))
                                       for name, split in (("train", "train"), ("validation", "val"), ("test", "test"))}}

    def base_identity(self):
        c = self.config
        return {"epochs": c.epochs, "batch_size": c.batch_size, "learning_rate": c.learning_rate,
                "data": self.data_id, "train_examples": int(len(self.arrays["y_train"])),
                "validation_examples": int(len(self.arrays["y_val"]))}

    def train_data(self, **extra_arrays):
        y = self.arrays["y_train"]
        return {"x": self.arrays["x_train"], "y": y, "index": np.arange(len(y), dtype=np.int32), **extra_arrays}

    def num_train_examples(self):
        return int(len(self.arrays["y_train"]))

    def train_labels(self):
        return self.arrays["y_train"]

    feature_model = staticmethod(models.feature_model)
    student_branches = staticmethod(models.student_branches)

    def student_builder(self):
        return build_student

    def teacher_builder(self):
        return build_teacher

    def test_arrays(self):
        return mnist.scale({"x": self.arrays["x_test"]})["x"].numpy(), self.arrays["y_test"].astype(int)

    def representative_inputs(self, count=200):
        return mnist.scale({"x": self.arrays["x_train"][:count]})["x"].numpy()

    def train_dataset(self, arrays):
        """Shuffled batches of `arrays`; built after the run's seed is set (see `runs.run`)."""
        return common_data.batched(arrays, self.config.batch_size, shuffle=True, seed=self.seed, map_fn=mnist.scale)

    def split_metrics(self, split, logits, labels, summary):
        """Accuracy; with `summary`, on the test split also the confusion matrix and
        per-class precision, recall and F1 (`kdtoolkit.metrics.class_metrics`)."""
        metrics = {f"{split}_accuracy": training.accuracy(logits, labels)}
        if summary and split == "test":
            metrics.update(class_metrics(labels, logits, NUM_CLASSES, prefix=split))
        return metrics

    def compute_targets(self, outputs_fn, name, tag):
        self.log(f"[{name}] {tag} on the training set")
        return common_data.teacher_outputs(
            outputs_fn, {"x": self.arrays["x_train"], "y": self.arrays["y_train"]}, EVAL_BATCH, map_fn=mnist.scale
        )

    def fit_model(self, name, model, make_method, arrays, resume_dir, keep_checkpoints=False):
        """Adam at the configured rate for `epochs`; with `keep_checkpoints`, the weights
        after every epoch are kept as `<run>/checkpoints/epoch-NN.weights.h5`."""

        def checkpoint(epoch, _record):
            save_weights(model, self.checkpoint_path(name, epoch))

        self.checkpoint_path(name, 1).parent.mkdir(parents=True, exist_ok=True)
        return training.fit(
            make_method(model),
            self.train_dataset(arrays),
            epochs=self.config.epochs,
            optimizer=self.adam(self.config.learning_rate),
            evaluate=self.evaluate,
            log=self.progress(name),
            strategy=self.strategy,
            on_epoch_end=checkpoint if keep_checkpoints else None,
            resume_dir=resume_dir,
            **self.step_options(),
        )

    # -- experiments -----------------------------------------------------------

    def teacher_name(self):
        return self.final_run_name("teacher")

    def teacher(self):
        """Trains (or loads) the teacher, keeping every epoch's weights; returns its record."""
        record, _ = self.train(self.spec("teacher", "teacher"), self.teacher_builder(), methods.CrossEntropy,
                               self.train_data, keep_checkpoints=True)
        return record

    def teacher_model(self):
        if not self.models.knows(self.teacher_name()):
            self.teacher()
        return self.teacher_name(), self.model_of(self.teacher_name())

    def scratch(self):
        """The student trained on hard labels only."""
        record, _ = self.train(self.spec("scratch", "scratch"), build_student, methods.CrossEntropy, self.train_data)
        return record

    def kd(self, **overrides):
        """The KD student at (T, alpha), default the course's; its record. When the
        fused grid runs in this invocation too and holds the course's cell, the
        whole grid trains first, together, and this run is its cell: one compiled
        step less to build (on an H100 a first, compiling epoch took 17 s against
        0.5 s for the next ones)."""
        if not overrides and "grid" in self.config.only and self.fuses_grid():
            cells = self.grid_cells()
            if (self.config.temperature, self.config.alpha) in cells:
                self.fuse_grid(cells)
        return super().kd(**overrides)

    def grid_cells(self):
        """The grid's (T, alpha) pairs, T-major."""
        return [(t, a) for t in self.config.temperatures for a in self.config.alphas]

    def grid(self):
        """Every (T, alpha) cell; writes `grid-s<seed>.csv` and `.json` with the best cell,
        chosen on the validation split (on the test set only with `--validation 0`)."""
        cells = self.grid_cells()
        if self.fuses_grid():
            self.fuse_grid(cells)
        rows = []
        for index, (temperature, alpha) in enumerate(cells, 1):
            self.log(f"[grid {index}/{len(cells)}] T={temperature:g} alpha={alpha:g} seed={self.seed}")
            record = self.kd(temperature=temperature, alpha=alpha)
            rows.append({"temperature": float(temperature), "alpha": float(alpha), "run": record["run"],
                         **{f"{split}_accuracy": record[f"{split}_accuracy"] for split in self.eval_sets}})
        return self.save_sweep("grid", rows, "accuracy", ("temperature", "alpha"))

    def fuses_grid(self):
        """`--fuse-grid`: `on`, `stacked`, `off`, or `auto`: on unless under
        mixed_float16, whose loss scale the cells would share. Fused cells train
        as alone (their gradients up to float rounding), and faster on a CPU too
        (1.50x for 6 cells on 2 cores; README, Benchmark); stacked ones within
        float tolerance, slower than `on` on a CPU."""
        if self.config.fuse_grid != "auto":
            return self.config.fuse_grid != "off"
        return self.config.precision != "mixed_float16"

    def fuse_grid(self, cells):
        """Trains the unfinished KD students of `cells` ((T, alpha) pairs) together
        (`distil_fused`): the same runs, names and weights as one by one. If the
        fused training diverges, the cells are left to train one at a time."""
        students = []
        for temperature, alpha in cells:
            settings = self.method_settings(methods.Distillation, temperature=temperature, alpha=alpha)
            students.append((self.spec(method_stem("kd", ["kd"], settings), "kd", **settings), build_student,
                             self.factory(methods.Distillation, settings)))
        try:
            distil_fused(self, students, self.teacher_model, stack=self.config.fuse_grid == "stacked",
                              **self.student_fit_options())
        except training.TrainingDiverged as err:
            self.log(f"[grid] fused training stopped ({err}); training the cells one at a time")

    def flops(self):
        """Parameters and FLOPs (batch 1) of each architecture; writes `flops.csv`."""
        s = self.config.subclasses
        rows = [
            {"model": label, **runs.model_size(build())}
            for label, build in (
                ("teacher", build_teacher),
                ("student (KD and scratch)", build_student),
                ("teacher assistant", build_assistant),
                (f"subclass teacher ({NUM_CLASSES}x{s} outputs)", lambda: build_teacher(NUM_CLASSES * s)),
                (f"subclass student ({NUM_CLASSES}x{s} outputs)", lambda: build_student(NUM_CLASSES * s)),
            )
        ]
        write_csv_atomic(self.store.root / "flops.csv", rows, ("model", "params", "flops"))
        for row in rows:
            self.log(f"[flops] {row['model']}: {row['params']:,} params, {row['flops']:,} FLOPs")
        return rows

    def entropy(self):
        """Mean entropy (nats) of the teacher's softened outputs on the training set
        against T; writes `teacher_entropy-s<seed>.csv` (maximum: log 10 = 2.3026)."""
        logits = self.logits_of(*self.teacher_model())
        temperatures = sorted({*self.config.temperatures, self.config.temperature})
        rows = [{"temperature": t, "entropy_nats": float(losses.soft_target_entropy(logits, t))}
                for t in temperatures]
        write_csv_atomic(self.store.root / f"teacher_entropy-s{self.seed}.csv", rows, ("temperature", "entropy_nats"))
        self.log("[entropy] " + ", ".join(f"T={r['temperature']:g}: {r['entropy_nats']:.3f}" for r in rows))
        return rows

    def skd(self):
        """Subclass distillation: a C·S-output teacher with L_aux, then a C·S student."""
        c, s = self.config, self.config.subclasses
        aux = {"subclasses": s, "aux_weight": c.aux_weight, "aux_temperature": c.aux_temperature}
        teacher_record, teacher = self.train(
            self.spec(f"skd-teacher-S{s}", "skd-teacher", **aux),
            lambda: build_teacher(NUM_CLASSES * s),
            lambda model: methods.SubclassTeacher(model, NUM_CLASSES, c.aux_weight, c.aux_temperature),
            self.train_data,
        )
        settings = self.method_settings(methods.Distillation)
        record, _ = self.distil(
            self.spec(f"skd-S{s}-{run_tag(settings)}", "skd", **settings, **aux),
            lambda: build_student(NUM_CLASSES * s),
            lambda: (teacher_record["run"], teacher),
            self.factory(methods.SubclassDistillation, settings, make=lambda student, _: methods.SubclassDistillation(
                student, NUM_CLASSES, **settings)),
        )
        return {"teacher": teacher_record, "student": record}

    def takd(self):
        """Teacher -> assistant -> student by `--chain-method` (KD by default), against
        that method straight from the teacher (BLKD)."""
        method = self.config.chain_method
        assistant, student = self.chain([("ta", build_assistant), ("takd", build_student)], method=method)
        baseline = self.distil_method(method)
        teacher = self.teacher()
        rows = [{"model": label, "run": r["run"], "test_accuracy": r["test_accuracy"]}
                for label, r in (("teacher", teacher), ("assistant (from teacher)", assistant),
                                 ("student via assistant (TAKD)", student),
                                 ("student from teacher (BLKD)", baseline))]
        write_csv_atomic(self.store.root / f"takd-s{self.seed}.csv", rows, ("model", "run", "test_accuracy"))
        return rows

    def eskd(self):
        """Students distilled (by `--chain-method`, KD by default) from the teacher's early
        checkpoints and from the final one."""
        teacher_record = self.teacher()
        name = self.teacher_name()
        method = self.config.chain_method
        rows = []
        for epoch in sorted(set(self.config.teacher_epochs) | {self.config.epochs}):
            if epoch == self.config.epochs:
                record = self.distil_method(method)
            else:
                record = self.chain(
                    [(f"eskd-e{epoch:02d}", build_student)],
                    parent=lambda epoch=epoch: self.checkpoint_model(name, epoch), method=method,
                )[-1]
            rows.append({"teacher_epoch": epoch,
                         "teacher_test_accuracy": teacher_record["history"][epoch - 1]["test_accuracy"],
                         "student_test_accuracy": record["test_accuracy"], "run": record["run"]})
        write_csv_atomic(self.store.root / f"eskd-s{self.seed}.csv", rows,
                         ("teacher_epoch", "teacher_test_accuracy", "student_test_accuracy", "run"))
        for row in rows:
            self.log(f"[eskd] teacher epoch {row['teacher_epoch']}: teacher {row['teacher_test_accuracy']:.4f}"
                     f" -> student {row['student_test_accuracy']:.4f}")
        return rows

    def teacher_checkpoints(self):
        """`[(epoch, model)]`: the seed's teacher after each of its epochs (trained if needed)."""
        self.teacher()
        return [(epoch, self.checkpoint_model(self.teacher_name(), epoch)[1])
                for epoch in range(1, self.config.epochs + 1)]

    def checkpoint_model(self, name, epoch):
        """`(label, model)` of the teacher's weights after `epoch`."""
        path = self.checkpoint_path(name, epoch)
        if not path.exists():
            raise DataError(f"{path} is missing: the teacher kept no checkpoint of epoch {epoch}; "
                            f"delete {self.store.run_dir(name)} to train it again with checkpoints")
        model = build_teacher()
        model.load_weights(path)
        return f"{name}-epoch{epoch:02d}", model

    def explanation_images(self):
        count = self.config.explain_images
        return self.arrays["x_test"][:count].astype(np.float32) / 255.0, self.arrays["y_test"][:count].astype(int)

    def lime_settings(self):
        return {"segment_fn": explain.segment_digit, "segmentation": "slic n_segments=40 compactness=0.3",
                "hide_value": 0.0}

def run_all(config, arrays=None, log=None):
    """Every selected experiment for every seed (see `Recipes.run_all`); `arrays`:
    loaded MNIST, else read from `config.data_dir`."""
    return Task1.run_all(config, arrays, log)
