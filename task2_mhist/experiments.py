"""Task 2 recipes: ResNet50V2 teacher -> MobileNetV2 student on MHIST.

Every model trains in two phases, each its own resumable run: feature extraction
(`<stem>-fe-s<seed>`: base frozen, Adam at the model's rate) and fine-tuning
(`<stem>-ft-s<seed>`: everything trainable, rate / 10, starting from the saved
feature-extraction weights). Test metrics are computed over the whole test set.

What is computed once: the decoded images (uint8, `mhist.decoded`; they travel
as uint8 and are put in their augmented views on the device, `mhist.show`), and
what frozen models compute (`task2_mhist.frozen`): a teacher's outputs that a
method reads, per training image and dihedral view, so a student never runs its
teacher per step; and for feature extraction (see `Task2Config.feature_cache`)
a frozen base's pooled features, so the phase trains only the head.
"""

import math

import numpy as np

from kdtoolkit import methods, training
from kdtoolkit.deploy import explain
from kdtoolkit.runner import runs
from task2_mhist import batchnorm
from kdtoolkit.metrics import binary_metrics
from kdtoolkit.runner.recipes import Recipes, deployable
from kdtoolkit.runner.run_spec import run_tag
from kdtoolkit.runner.studies import data_efficiency, ensemble, smoothed_teacher, teacher_capacity
from kdtoolkit.files import write_csv_atomic
from task2_mhist import data as mhist
from task2_mhist import models
from task2_mhist.frozen import FrozenOutputs, inference_batch


NUM_CLASSES = len(mhist.CLASSES)


STUDY_RUNS = {  # `kdtoolkit.runner.studies` that apply to Task 2, a binary task; see docs/studies.md
    "smoothed": lambda task: smoothed_teacher.run(task, task.builder(models.TEACHER)),
    "efficiency": lambda task: data_efficiency.run(task, task.config.per_class, task.student_builder()),
    "ensemble": lambda task: ensemble.run(task, task.config.ensemble_seeds),
    "capacity": lambda task: teacher_capacity.run(
        task, {"densenet121": task.builder(models.ASSISTANT), "course": task.builder(models.TEACHER)}),
}


class Task2(Recipes):
    """Runs Task 2 experiments for one config and one seed."""

    studies = STUDY_RUNS
    experiments = ("flops", "teacher", "kd", "scratch", "tcurve", "pretrained", *methods.OTHER_METHODS, "skd", "takd",
                   "export", "lime", "occlusion", *studies)

    def __init__(self, config, splits=None, seed=None, log=None):
        super().__init__(config, config.seeds[0] if seed is None else seed, log)
        splits = splits or self.load_data(config)
        self.data = splits
        self.data_id = mhist.fingerprint(splits)
        self.splits = mhist.hold_out(splits, config.validation)
        self.eval_sets = {name: mhist.dataset(self.splits[name], config.image_size, inference_batch())
                          for name in ("val", "test") if name in self.splits}
        self.frozen = FrozenOutputs(self.splits, config.image_size, self.views(), self.eval_sets, self.data_id,
                                    self.store.root / "cache", self.log)

    # -- the task's data and schedule -----------------------------------------

    @staticmethod
    def load_data(config):
        return mhist.load_mhist(config.data_dir, config.annotations, limit=config.limit)

    def data_info(self):
        source = str(self.config.data_dir) + (f" (first {self.config.limit} per partition)" if self.config.limit else "")
        return {"source": source, "fingerprint": self.data_id, "synthetic": mhist.is_synthetic(self.config.data_dir),
                **{name: len(self.splits.get(split, ()))
                   for name, split in (("train", "train"), ("validation", "val"), ("test", "test"))}}

    def base_identity(self):
        c = self.config
        return {"weights": str(c.weights), "image_size": c.image_size, "batch_size": c.batch_size, "augment": c.augment,
                "data": self.data_id, "train_examples": len(self.splits["train"]),
                "validation_examples": len(self.splits.get("val", ())), "test_examples": len(self.splits["test"])}

    def train_data(self, **extra_arrays):
        """The per-example arrays that ride along with the training images; `fit_model`
        turns them into the dataset of its phase."""
        return {"subclass": self.splits["train"].subclasses, **extra_arrays}

    def train_dataset(self, extra, features=None):
        c = self.config
        extra = dict(extra)
        examples = extra.pop("examples", None)  # a transfer subset (`training_subset`)
        return mhist.dataset(self.splits["train"], c.image_size, c.batch_size, shuffle=True, augment=c.augment,
                             seed=self.seed, extra=extra, features=features, examples=examples)

    def training_subset(self, arrays, examples):
        """`arrays` whole, with the `examples` to stream: the images stay decoded once."""
        return {**arrays, "examples": np.asarray(examples, np.int32)}

    def views(self):
        """Distinct inputs per training image: the 8 dihedral views, or 1 without augmentation."""
        return mhist.NUM_VIEWS if self.config.augment else 1

    def caches_features(self):
        c = self.config
        return c.feature_cache == "on" or (c.feature_cache == "auto" and self.views() <= c.fe_epochs)

    def split_metrics(self, split, logits, labels, summary):
        """AUC, F1 and accuracy over the whole split (`val_auc`, `test_auc`, ...); with
        `summary`, the test confusion matrix and ROC curve too."""
        summarised = summary and split == "test"
        metrics = binary_metrics(labels, logits, prefix=split, curve=summarised)
        if not summarised:
            del metrics["confusion_matrix"]
        return metrics

    per_view = True

    def compute_targets(self, outputs_fn, name, tag):
        """`{target: (n_train, V, ...)}`, also saved as `<run>/train_<tag>-<V>views.npz`."""
        return self.frozen.targets(outputs_fn, self.store.run_dir(name), name, tag)

    num_classes = NUM_CLASSES

    def num_train_examples(self):
        return len(self.splits["train"])

    def train_labels(self):
        return self.splits["train"].labels

    def feature_model(self, model):
        return models.feature_model(model)

    def student_builder(self):
        return self.builder(models.STUDENT)

    def student_fit_options(self):
        return {"learning_rate": self.config.student_lr}

    def teacher_fit_options(self):
        return {"learning_rate": self.config.teacher_lr}

    def student_branches(self, teacher):
        return models.student_branches(teacher, num_outputs=NUM_CLASSES)

    def teacher_builder(self):
        return self.builder(models.TEACHER)

    primary_metric = "auc"

    def final_run_name(self, stem):
        return super().final_run_name(f"{stem}-{'fe' if self.config.phase == 'feature-extraction' else 'ft'}")

    def test_arrays(self):
        return self.images("test")

    def representative_inputs(self, count=200):
        return self.images("train", count)[0]

    def images(self, split, count=None):
        """`(float32 pixels (n, S, S, 3), labels (n,))` of the first `count` images of `split`."""
        pixels = mhist.decoded(self.splits[split], self.config.image_size)[:count].numpy()
        return pixels.astype(np.float32), self.splits[split].labels[:count].astype(int)

    def fit_model(self, name, model, make_method, extra, resume_dir, phase, learning_rate):
        """One phase. Feature extraction trains the head, on cached base features when
        `caches_features()`; fine-tuning trains everything at learning rate / 10.

        A method that reads the student's features (FitNets, AT, RKD, CRD) distils
        them while fine-tuning; its feature-extraction phase trains the head with
        cross-entropy, since the frozen base's features cannot move."""
        c = self.config
        feature_extraction = phase == "fe"
        if feature_extraction and getattr(make_method, "reads_features", False):
            make_method = methods.CrossEntropy
        models.set_base_trainable(model, not feature_extraction)
        if feature_extraction and self.caches_features():
            features = self.frozen.base_features(model)
            method = make_method(models.split_at_base(model)[1])
            data = self.train_dataset(extra, features=features["train"])
            eval_sets = {split: mhist.dataset(self.splits[split], c.image_size, inference_batch(),
                                              features=features[split])
                         for split in self.eval_sets}
        else:
            method, data, eval_sets = make_method(model), self.train_dataset(extra), self.eval_sets
        epochs = c.fe_epochs if feature_extraction else c.ft_epochs
        history = training.fit(
            method,
            data,
            epochs=epochs,
            optimizer=self.adam(learning_rate if feature_extraction else learning_rate / 10),
            evaluate=lambda predictor: self.evaluate(predictor, eval_sets),
            log=self.progress(name),
            strategy=self.strategy,
            resume_dir=resume_dir,
            prepare=mhist.show,
            **self.step_options(),
        )
        steps = epochs * math.ceil(len(extra.get("examples", self.splits["train"])) / c.batch_size)
        if not feature_extraction and batchnorm.needs_recalibration(model, steps):
            moved = batchnorm.recalibrate(model, self.train_dataset(extra), prepare=mhist.show)
            self.log(f"[{name}] BatchNorm statistics of {moved} layers re-estimated over the training set: after "
                     f"{steps} steps their moving averages still weighed their start by "
                     f"{batchnorm.start_weight(steps):.0%} (task2_mhist.batchnorm)")
        return history

    def train_model(self, spec, build, make_method, train_data, learning_rate):
        """Feature extraction (run `<stem>-fe`), then (unless `--phase
        feature-extraction`) fine-tuning (`<stem>-ft`) from the saved
        feature-extraction weights. Returns the last phase's run."""
        c = self.config
        fe = spec.phase("fe", phase="feature-extraction", epochs=c.fe_epochs, learning_rate=learning_rate)
        record, model = self.train(fe, build, make_method, train_data, phase="fe", learning_rate=learning_rate)
        if c.phase == "feature-extraction":
            return record, model

        def build_finetune():
            model = build()
            model.load_weights(self.store.weights_path(fe.name))
            return model

        ft = spec.phase("ft", phase="finetune", epochs=c.ft_epochs, learning_rate=learning_rate / 10)
        return self.train(ft, deployable(make_method, build_finetune), make_method, train_data, phase="ft",
                          learning_rate=learning_rate)

    def builder(self, architecture, weights=None, outputs=NUM_CLASSES):
        c = self.config
        weights = c.weights if weights is None else weights
        return lambda: models.build(architecture, weights, c.image_size, outputs)

    # -- experiments -------------------------------------------------------------

    def teacher(self, weights=None):
        """ResNet50V2 teacher (cross-entropy); returns its record."""
        weights = self.config.weights if weights is None else weights
        stem = "teacher" if weights == self.config.weights else f"teacher-init_{weights_tag(weights)}"
        return self.train_model(self.spec(stem, "teacher", weights=str(weights)),
                                self.builder(models.TEACHER, weights), methods.CrossEntropy,
                                self.train_data, learning_rate=self.config.teacher_lr)[0]

    def teacher_model(self):
        name = self.final_run_name("teacher")
        if not self.models.knows(name):
            self.teacher()
        return name, self.model_of(name)

    def scratch(self, weights=None):
        """The student without a teacher (cross-entropy only)."""
        weights = self.config.weights if weights is None else weights
        stem = "scratch" if weights == self.config.weights else f"scratch-init_{weights_tag(weights)}"
        record, _ = self.train_model(self.spec(stem, "scratch", weights=str(weights)),
                                     self.builder(models.STUDENT, weights), methods.CrossEntropy,
                                     self.train_data, learning_rate=self.config.student_lr)
        return record

    def tcurve(self):
        """Student AUC against T at the configured alpha; writes `tcurve-s<seed>.csv` and
        `.json` with the best T, chosen on the validation split (on the test set only
        with `--validation 0`)."""
        metrics = [f"{split}_{m}" for split in self.eval_sets for m in ("auc", "accuracy")]
        rows = []
        for index, temperature in enumerate(self.config.temperatures, 1):
            self.log(f"[tcurve {index}/{len(self.config.temperatures)}] T={temperature:g}")
            record = self.kd(temperature=temperature)
            rows.append({"temperature": temperature, "alpha": self.config.alpha, "run": record["run"],
                         **{k: record[k] for k in metrics}})
        self.save_sweep("tcurve", rows, "auc", ("temperature", "alpha"))
        return rows

    def pretrained(self):
        """Teacher and scratch student with ImageNet weights (or `--weights`) and with
        random initialisation, same schedule; writes `pretrained-s<seed>.csv`."""
        rows = []
        for weights in dict.fromkeys([self.config.weights, "none"]):
            for role, record in (("teacher", self.teacher(weights)), ("student", self.scratch(weights))):
                rows.append({"model": role, "weights": weights_tag(weights), "test_auc": record["test_auc"],
                             "test_accuracy": record["test_accuracy"], "run": record["run"]})
        write_csv_atomic(self.store.root / f"pretrained-s{self.seed}.csv", rows,
                         ("model", "weights", "test_auc", "test_accuracy", "run"))
        return rows

    def skd(self):
        """Known-subclass KD: the teacher learns HP 0-1 / HP 2-3 / SSA 4-5 / SSA 6-7
        (annotator votes), the student distils that 4-way distribution and is scored on
        HP vs SSA through its logsumexp class logits."""
        c, s = self.config, mhist.SUBCLASSES_PER_CLASS
        outputs = NUM_CLASSES * s
        teacher_record, teacher = self.train_model(
            self.spec(f"skd-teacher-S{s}", "skd-teacher", subclasses=s),
            self.builder(models.TEACHER, outputs=outputs),
            lambda model: methods.KnownSubclassTeacher(model, NUM_CLASSES),
            self.train_data, learning_rate=c.teacher_lr,
        )
        settings = self.method_settings(methods.Distillation)
        record, _ = self.distil(
            self.spec(f"skd-S{s}-{run_tag(settings)}", "skd", subclasses=s, **settings),
            self.builder(models.STUDENT, outputs=outputs), lambda: (teacher_record["run"], teacher),
            self.factory(methods.SubclassDistillation, settings, make=lambda student, _: methods.SubclassDistillation(
                student, NUM_CLASSES, **settings)),
            learning_rate=c.student_lr,
        )
        return {"teacher": teacher_record, "student": record}

    def takd(self):
        """ResNet50V2 -> DenseNet121 assistant -> MobileNetV2 by `--chain-method` (KD by
        default), against that method straight from the teacher (BLKD)."""
        method = self.config.chain_method
        assistant, student = self.chain(
            [("ta", self.builder(models.ASSISTANT)), ("takd", self.builder(models.STUDENT))], method=method)
        baseline = self.distil_method(method)
        rows = [{"model": label, "run": r["run"], "test_auc": r["test_auc"], "test_accuracy": r["test_accuracy"]}
                for label, r in (("teacher", self.teacher()), ("assistant (from teacher)", assistant),
                                 ("student via assistant (TAKD)", student), ("student from teacher (BLKD)", baseline))]
        write_csv_atomic(self.store.root / f"takd-s{self.seed}.csv", rows, ("model", "run", "test_auc", "test_accuracy"))
        return rows

    def flops(self):
        """Parameters and FLOPs (batch 1, at `--image-size`) of every architecture."""
        rows = []
        for label, architecture in (("teacher ResNet50V2", models.TEACHER), ("student MobileNetV2", models.STUDENT),
                                    ("assistant DenseNet121", models.ASSISTANT)):
            model = models.build(architecture, "none", self.config.image_size)
            rows.append({"model": label, "image_size": self.config.image_size, **runs.model_size(model)})
            self.log(f"[flops] {label}: {rows[-1]['params']:,} params, {rows[-1]['flops']:,} FLOPs")
        write_csv_atomic(self.store.root / "flops.csv", rows, ("model", "image_size", "params", "flops"))
        return rows

    occlusion_fill = 127.5  # mid-grey pixels
    explain_batch = 64  # 224-px images: 1,024 at once would take ~12 GiB in ResNet50V2

    def explanation_images(self):
        return self.images("test", self.config.explain_images)

    def lime_settings(self):
        return {"segment_fn": lambda image: explain.segment_rgb(image / 255.0),
                "segmentation": "slic n_segments=50 compactness=10", "hide_value": None}

def weights_tag(weights):
    """'imagenet' | 'none' | a file path -> a short tag for run names."""
    text = str(weights)
    return text.lower() if text.lower() in ("imagenet", "none") else "file"


def run_all(config, splits=None, log=None):
    """Every selected experiment for every seed (see `Recipes.run_all`); `splits`:
    loaded MHIST, else read from `config.data_dir`."""
    return Task2.run_all(config, splits, log)
