"""Plumbing shared by the tasks' experiment recipes (one config, one seed).

A task subclasses `Recipes` and provides its data and training schedule:
`base_identity`, `train_data`, `fit_model`, `split_metrics`, `compute_targets`,
`feature_model` and `student_builder`.
Everything else (resumable recorded runs, cached logits of frozen models,
distillation chains, explanation artefacts) is written once here.
"""

import dataclasses
import datetime
import json
import time

import keras
import numpy as np

from common import device, locks, methods, runs, training
from common.distribute import make_strategy, results_root
from common.errors import ConfigError, DataError
from common.explanations import explain_seed
from common.metrics import expected_calibration_error, top1_agreement
from common.model_cache import ModelCache
from common.results import ResultsStore, write_arrays_atomic, write_csv_atomic, write_json_atomic
from common.workspaces import Workspaces


class Recipes:
    """Base of `Task1` and `Task2`: runs, cached logits, KD chains, explanations."""

    experiments = ()  # every experiment method of the task, in the order `run` calls them

    def __init_subclass__(cls, **kwargs):
        """A registered method may not share its name with a task's experiment or
        attribute (`run` would run the method, `--only NAME` mean two things)."""
        super().__init_subclass__(**kwargs)
        clashes = sorted(name for name in methods.REGISTRY if name != "kd" and hasattr(cls, name))
        if clashes:
            raise ValueError(f"registered method {', '.join(map(repr, clashes))} has the name of a {cls.__name__} "
                             "experiment or attribute; give the method another name")

    def __init__(self, config, seed, log=None):
        self.config = config
        self.seed = seed
        self.log = log or (lambda _msg: None)
        self.strategy = make_strategy(config.distribute)
        self.store = ResultsStore(results_root(config.out, self.strategy))
        self.models = ModelCache(self.kept_models, self.build_in_scope, self.store.weights_path)
        self._targets = {}
        self.workspaces = Workspaces()  # compiled steps shared by runs of one structure; `run_all` shares it by seeds

    kept_models = 3  # trained models held in memory at once (Task 2's take hundreds of MB each)

    @staticmethod
    def load_data(config):
        """The task's data set, loaded once and shared by every seed's `Recipes`."""
        raise NotImplementedError

    @classmethod
    def run_all(cls, config, data=None, log=None):
        """Every selected experiment for every seed, then `summary.csv` (one row per
        run) and `summary_by_experiment.csv` (mean ± std over seeds). The data are
        read and checked first (nothing is written for bad data), then `--out`,
        before any model trains. Several processes may share `--out` (see
        `common.locks`): each run is trained once. Returns per-seed outcomes."""
        log = log or (lambda _msg: None)
        device.configure(config.deterministic, config.tf32, config.precision)
        data = data if data is not None else cls.load_data(config)
        ResultsStore(config.out).prepare()
        outcomes = {}
        workspaces = Workspaces()

        def run_seed(seed, note=""):
            if len(config.seeds) > 1:
                log(f"== seed {seed} ({len(outcomes) + 1}/{len(config.seeds)}){note}")
            task = cls(config, data, seed=seed, log=log)
            task.workspaces = workspaces
            outcomes[seed] = task.run()
            return task

        # Processes sharing --out split the seeds: each takes the next seed no other holds,
        # then finishes the others' (waiting on each run another process is training).
        while (claimed := claim_next_seed(config.out, [s for s in config.seeds if s not in outcomes])) is not None:
            seed, handle = claimed
            try:
                task = run_seed(seed)
            finally:
                locks.release(handle)
        for seed in config.seeds:
            if seed not in outcomes:
                task = run_seed(seed, ": another process has it; its finished runs are reused")
        task.store.write_summary()
        task.store.write_seed_summary()
        return outcomes

    # -- provided by each task -------------------------------------------------

    def base_identity(self):
        """Settings shared by every run of the task (epochs, batch size, data size...)."""
        raise NotImplementedError

    def data_info(self):
        """Where the data came from, for records and reports: `source`, `fingerprint`,
        `synthetic`, and the `train` / `validation` / `test` sizes."""
        raise NotImplementedError

    def train_data(self, **extra_arrays):
        """The per-example training arrays for `fit_model`; `extra_arrays` (e.g. a
        teacher's logits) ride along per example."""
        raise NotImplementedError

    def fit_model(self, name, model, make_method, arrays, resume_dir, **options):
        """Trains `make_method(model)` (the task may wrap part of `model`) with
        `common.training.fit` on a shuffled dataset of `arrays` that it builds (after
        the run's seed is set), saving and resuming epochs in `resume_dir`; returns
        the per-epoch history."""
        raise NotImplementedError

    eval_sets = {}  # split name ("val", "test") -> held-out data, set by the task

    def split_metrics(self, split, logits, labels, summary):
        """Metrics of one held-out split from its `(n, classes)` logits and labels, keys
        prefixed by the split (`test_accuracy`, ...); `summary`: also those only a
        run's final record keeps (e.g. a confusion matrix)."""
        raise NotImplementedError

    def train_labels(self):
        """`(n_train,)` integer class labels of the training examples, by example index."""
        raise NotImplementedError

    def compute_targets(self, outputs_fn, name, tag):
        """`{target: array}` of `outputs_fn` (`x -> {target: tensor}`, a frozen model `name`
        and what a method caches of it, `tag` naming those targets) on every training
        example, by example index: `(n, ...)`, or `(n, views, ...)` when `per_view`."""
        raise NotImplementedError

    per_view = False  # whether cached teacher outputs have a views axis (Task 2's dihedral views)

    def feature_model(self, model):
        """`x -> {"logits", "embedding", "spatial", "hint"}` sharing `model`'s layers (the task's models)."""
        raise NotImplementedError

    def student_builder(self):
        """`() -> keras.Model`: a fresh student (the architecture every method distils into)."""
        raise NotImplementedError

    def teacher_builder(self):
        """`() -> keras.Model`: a fresh teacher of the task's configuration."""
        raise NotImplementedError

    def student_fit_options(self):
        """Extra `fit_model` options of a student's run (e.g. its learning rate)."""
        return {}

    # -- shared ------------------------------------------------------------------

    def held_out(self, predictor, eval_sets=None):
        """`{split: (logits, labels)}` of a compiled `x -> class logits` on each held-out split."""
        return {split: training.predict(predictor, data) for split, data in (eval_sets or self.eval_sets).items()}

    def evaluate(self, predictor, eval_sets=None):
        """Per-epoch held-out metrics (`val_accuracy`, `test_accuracy`, ...) of a predictor;
        of each model, under its prefix (`0/test_accuracy`), when it returns a dict of
        `{prefix: logits}` (`common.fused`)."""
        metrics = {}
        for split, (outputs, labels) in self.held_out(predictor, eval_sets).items():
            for prefix, logits in (outputs.items() if isinstance(outputs, dict) else [("", outputs)]):
                metrics.update({prefix + k: v for k, v in self.split_metrics(split, logits, labels, False).items()})
        return metrics

    def final_metrics(self, name, outputs, teacher=None):
        """A run's recorded metrics from `outputs`, its `{split: (logits, labels)}` on the
        held-out splits (`held_out`): each split's `split_metrics` with the summary, and
        its expected calibration error (`val_ece`, `test_ece`); the test logits and
        labels are saved as `<run>/test_outputs.npz`, so reports compute fidelity
        between models and reliability diagrams without running any model again.
        `teacher`: the run it was distilled from; when that run saved its test
        outputs, `test_fidelity` is the fraction of test images where the two
        predict the same class (and `distilled_from` names it)."""
        metrics = {}
        for split, (logits, labels) in outputs.items():
            metrics.update(self.split_metrics(split, logits, labels, summary=True))
            metrics[f"{split}_ece"] = expected_calibration_error(logits, labels)
            if split == "test":
                write_arrays_atomic(self.store.run_dir(name) / "test_outputs.npz",
                                    {"logits": logits.astype(np.float32), "labels": labels.astype(np.int32)})
                source = self.store.run_dir(teacher) / "test_outputs.npz" if teacher else None
                if source is not None and source.exists():
                    with np.load(source) as saved:
                        metrics["test_fidelity"] = top1_agreement(logits, saved["logits"])
                    metrics["distilled_from"] = teacher
        return metrics

    def identity(self, experiment, **settings):
        return {"experiment": experiment, "seed": self.seed, **self.base_identity(), **settings}

    def selection_metric(self, metric):
        """`val_<metric>` when a validation split is held out, else `test_<metric>`:
        the number that chooses settings (T, alpha); the test set only reports."""
        return f"val_{metric}" if "val" in self.eval_sets else f"test_{metric}"

    def save_sweep(self, name, rows, metric, keys):
        """Writes a sweep's rows (one per setting, each with its `run` and held-out
        metrics) to `<name>-s<seed>.csv` and `.json` with the best row, chosen on
        `selection_metric(metric)`; logs the choice. `keys`: the swept settings,
        first columns of the CSV. Returns `{"cells", "best", "chosen_by"}`."""
        chosen_by = self.selection_metric(metric)
        best = max(rows, key=lambda row: row[chosen_by])
        measured = [k for k in rows[0] if k not in (*keys, "run")]
        stem = self.store.root / f"{name}-s{self.seed}"
        write_csv_atomic(stem.with_suffix(".csv"), rows, (*keys, *measured, "run"))
        result = {"cells": rows, "best": best, "chosen_by": chosen_by}
        write_json_atomic(stem.with_suffix(".json"), result)
        setting = " ".join(f"{k}={best[k]:g}" for k in keys)
        self.log(f"[{name}] best by {chosen_by}: {setting}, {chosen_by} {best[chosen_by]:.4f}, "
                 f"test_{metric} {best[f'test_{metric}']:.4f}")
        return result

    def kd_tag(self, temperature=None, alpha=None):
        """`T4-a0.5`: the run-name part of KD settings (`run_tag`), the config's by default."""
        return run_tag(self.method_settings(methods.Distillation, temperature, alpha))

    def run_name(self, stem):
        """Run names end in the seed (`kd-T4-a0.5-s0`), so seeds group by stripping it."""
        return f"{stem}-s{self.seed}"

    def checkpoint_path(self, name, epoch):
        return self.store.run_dir(name) / "checkpoints" / f"epoch-{epoch:02d}.weights.h5"

    def progress(self, name):
        return lambda line: self.log(f"[{name}] {line}")

    def train(self, name, identity, build, make_method, train_data, **fit_options):
        """Trains `make_method(model)` on `train_data()` (or loads the finished run).

        Returns `(record, model)`; the model is kept for later links of a chain
        (`model_of`).
        """
        if self.models.knows(name):  # done earlier in this object: no rebuild
            record = self.store.finished(name, identity)
            if record is not None:
                return record, self.model_of(name)
        record, model = runs.run(
            self.store,
            name,
            identity=identity,
            config=self.config.as_dict(),
            build=lambda: self.build_in_scope(build),
            data=train_data,
            train=lambda model, data: self.fit_model(name, model, make_method, data,
                                                     resume_dir=self.store.resume_dir(name, identity), **fit_options),
            evaluate=lambda model: self.final_metrics(
                name, self.held_out(self.predictor(make_method(model))), getattr(make_method, "parent_name", None)),
            log=self.log,
            about={"data": self.data_info()},
        )
        if model is None:
            raise DataError(
                f"{self.store.weights_path(name)} is missing; delete {self.store.run_dir(name)} to train it again"
            )
        self.keep(name, model, build)
        return record, model

    def predictor(self, method):
        """The compiled `x -> class logits` of `method` for its final evaluation: traced
        once per structure with shared steps (`Workspaces.predictor`)."""
        if self.config.share_steps:
            return self.workspaces.predictor(method, self.strategy)
        return training.compiled_predictor(method.class_logits)

    def keep(self, name, model, build=None):
        """Holds run `name`'s model for later links of a chain (`ModelCache.keep`)."""
        self.models.keep(name, model, build)

    def model_of(self, name):
        """The trained model of run `name`, trained or loaded by this object (`ModelCache.get`)."""
        return self.models.get(name)

    def train_model(self, stem, identity, build, make_method, train_data, **fit_options):
        """Trains one model through the task's schedule; returns `(record, model)` of its
        final run. One run named `<stem>-s<seed>` here; a task with phases overrides it."""
        return self.train(self.run_name(stem), identity, build, make_method, train_data, **fit_options)

    def build_in_scope(self, build):
        """Builds a model under the distribution strategy's scope (its variables mirrored)."""
        with self.strategy.scope():
            return build()

    def adam(self, learning_rate):
        """An Adam optimizer created under the strategy's scope, as `tf.distribute` needs
        (with loss scaling under `--precision mixed_float16`)."""
        with self.strategy.scope():
            return device.optimizer(keras.optimizers.Adam(learning_rate))

    def step_options(self):
        """`fit` options from the config: XLA (`--jit`), `--steps-per-call`, and the
        shared compiled steps (`common.workspaces`)."""
        return {"jit": device.use_jit(self.config.jit), "steps_per_call": self.config.steps_per_call,
                "workspaces": self.workspaces if self.config.share_steps else None}

    def targets_of(self, name, model, method_cls):
        """`{"teacher_<target>": array}`: what `method_cls` reads of frozen model `name`
        on the training set (`compute_targets`), computed once per model and targets."""
        targets = method_cls.target_names()
        key = (name, targets)
        if key not in self._targets:
            if targets == ("logits",) and tuple(method_cls.teacher_outputs) == ("logits",):
                outputs_fn = lambda x, training=False: {"logits": model(x, training=training)}  # noqa: E731
            else:
                features = self.feature_model(model)
                outputs_fn = lambda x, training=False: method_cls.teacher_targets(features(x, training=training))  # noqa: E731
            self._targets[key] = self.compute_targets(outputs_fn, name, "-".join(targets))
        return {f"teacher_{target}": array for target, array in self._targets[key].items()}

    def logits_of(self, name, model=None):
        """Training-set logits of a trained model, computed once per model (`model` may be
        omitted once they are, or for a model this object trained)."""
        cached = (name, ("logits",)) in self._targets
        model = model if model is not None or cached else self.model_of(name)
        return self.targets_of(name, model, methods.Distillation)["teacher_logits"]

    def method_options(self, name):
        """The `Options` of registered method `name` from `--<name>-<field>` flags."""
        return methods.make_options(name, dict(self.config.method_options).get(name, {}))

    def method_settings(self, cls, temperature=None, alpha=None):
        """What defines a run of method `cls`: the shared settings it uses (T, alpha)
        and its own options, in a fixed order; part of the run's identity and name."""
        shared = {"temperature": self.config.temperature if temperature is None else temperature,
                  "alpha": self.config.alpha if alpha is None else alpha}
        settings = {k: float(shared[k]) for k in ("temperature", "alpha") if k in cls.uses}
        if cls.name is not None:
            settings.update(dataclasses.asdict(self.method_options(cls.name)))
        return settings

    def distil(self, stem, identity, build, parent, factory, **fit_options):
        """Trains `factory(model)` (a `MethodFactory`) on batches carrying what its method
        reads of `parent()`'s outputs.

        `parent` is `() -> (run name, model)`, called only if this run must train,
        so a finished student never makes its teacher train or predict again.
        """
        return self.train_model(stem, identity, build, factory, self.distil_data(parent, [factory]), **fit_options)

    def distil_data(self, parent, factories):
        """`() -> training arrays` carrying what each of `factories` reads of `parent()`'s
        outputs (computed once per model and targets); it also tells each factory
        the parent's name and the shapes of those targets."""

        def data():
            parent_name, parent_model = parent()
            targets = {}
            for factory in factories:
                found = self.targets_of(parent_name, parent_model, factory.cls)
                skip = 2 if self.per_view else 1
                factory.parent_name = parent_name
                factory.teacher_shapes = {k[len("teacher_"):]: (None, *v.shape[skip:]) for k, v in found.items()}
                targets.update(found)
            return self.train_data(**targets)

        return data

    def factory(self, cls, settings=None, make=None):
        """A `MethodFactory` for method class `cls` with `settings` (`method_settings`)."""
        if getattr(cls, "single_replica", False) and self.strategy.num_replicas_in_sync > 1:
            raise ConfigError(f"{cls.name} keeps a memory bank that is not synchronised across replicas; "
                              "run it with --distribute none")
        return MethodFactory(self, cls, settings if settings is not None else self.method_settings(cls), make)

    def chain(self, links, parent=None, method="kd", temperature=None, alpha=None):
        """Distils along a chain: parent -> links[0] -> links[1] -> ...

        `links` is a list of `(role, build)`; link i learns by registered `method`
        (KD by default, at T and alpha) from link i-1 (from `parent() -> (name,
        model)` for i = 0; the seed's teacher by default). Run names join the roles,
        the method when it is not the first role or KD, and its settings, e.g.
        `ta-T4-a0.5-s0` then `ta-takd-T4-a0.5-s0`; a one-link chain
        `[("kd", build_student)]` is exactly the plain KD student. Returns the
        records (of each link's final run).
        """
        cls = methods.get(method)
        settings = self.method_settings(cls, temperature, alpha)
        parent = parent or self.teacher_model
        roles, records = [], []
        for role, build in links:
            roles.append(role)
            stem = self.method_stem(method, roles, settings)
            extra = {} if method in ("kd", role) else {"method": method}
            record, model = self.distil(stem, self.identity(role, **extra, **settings), build, parent,
                                        self.factory(cls, settings), **self.student_fit_options())
            records.append(record)
            parent = lambda name=record["run"], model=model: (name, model)  # noqa: E731
        return records

    def method_stem(self, method, roles=None, settings=None):
        """The run-name stem of a chain's link (see `chain`): roles, the method unless it
        is KD or the first role, and its settings; by default the student of `method`."""
        roles = roles or [method]
        settings = settings if settings is not None else self.method_settings(methods.get(method))
        shown = [] if method in ("kd", roles[0]) else [method]
        return "-".join([*roles, *shown, run_tag(settings)])

    def kd(self, temperature=None, alpha=None):
        """The student distilled straight from the teacher by KD at (T, alpha); its record."""
        return self.distil_method("kd", temperature, alpha)

    def distil_method(self, method, temperature=None, alpha=None):
        """The student distilled from the seed's teacher by registered `method`; its record."""
        return self.chain([(method, self.student_builder())], method=method, temperature=temperature, alpha=alpha)[-1]

    def run(self, only=None):
        """Runs the selected experiments (all by default) in `experiments` order.

        Returns `{experiment: outcome}`. Each experiment's wall time and the process's
        peak memory after it are logged and appended to `<out>/timings.jsonl`, also
        when it stops early (`"finished": false`: interrupted or failed), so the
        time of every invocation, resumed ones included, is counted.
        """
        only = tuple(only or self.config.only)
        outcomes = {}
        for name in self.experiments:
            if name not in only:
                continue
            started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            start = time.perf_counter()
            finished = False
            try:
                # A registered method runs as one, except `kd`: the course's experiment of that name.
                direct = name in methods.REGISTRY and name != "kd"
                outcomes[name] = self.distil_method(name) if direct else getattr(self, name)()
                finished = True
            finally:
                timing = {"experiment": name, "seed": self.seed, "started_at": started, "finished": finished,
                          "seconds": round(time.perf_counter() - start, 1),
                          "peak_rss_mib": round(runs.peak_rss_mib(), 1)}
                self.store.root.mkdir(parents=True, exist_ok=True)
                with open(self.store.root / "timings.jsonl", "a") as handle:
                    handle.write(json.dumps(timing) + "\n")
            self.log(f"[{name}] experiment finished in {timing['seconds']:.0f}s "
                     f"(peak memory so far {timing['peak_rss_mib']:.0f} MiB)")
        return outcomes

    # -- deployment ----------------------------------------------------------------

    primary_metric = "accuracy"  # the test metric the export table compares ("auc" in Task 2)

    def final_run_name(self, stem):
        """The run holding the finished model of `stem` (a task with phases: its last)."""
        return self.run_name(stem)

    def test_arrays(self):
        """`(images float32 in the models' input scale, labels)` of the whole test set."""
        raise NotImplementedError

    def representative_inputs(self, count=200):
        """`count` float32 training inputs that calibrate full-integer quantization."""
        raise NotImplementedError

    def export(self):
        """TFLite files of the teacher and every finished student of this seed,
        measured (`common.deployment.export_seed`); returns the rows."""
        from common.deployment import export_seed

        return export_seed(self)

    def trained_model(self, label, name):
        """The trained model of finished run `name` (`label`: "teacher" or a student):
        the one this object trained or loaded, else built and loaded from its weights."""
        if self.models.knows(name):
            return self.model_of(name)
        build = self.teacher_builder() if label == "teacher" else self.student_builder()
        model = self.build_in_scope(build)
        model.load_weights(self.store.weights_path(name))
        return model

    # -- explanations (each task provides its images and segmentation) ----------

    def explanation_images(self):
        """`(images, labels)`: the first `--explain-images` test images, in the models' input scale."""
        raise NotImplementedError

    def lime_settings(self):
        """`{"segment_fn", "segmentation" (its description), "hide_value"}` for LIME."""
        raise NotImplementedError

    occlusion_fill = 0.0
    explain_batch = 1024  # perturbed images per forward pass while explaining

    def lime(self):
        """LIME maps of the first test images: teacher, KD student, scratch student."""
        return self.explain("lime")

    def occlusion(self):
        """Occlusion maps of the same images and models."""
        return self.explain("occlusion")

    def explain(self, kind):
        """LIME or occlusion maps of teacher, KD student and scratch student
        (`common.explanations.explain_seed`)."""
        return explain_seed(self, kind)


def claim_next_seed(out, seeds):
    """`(seed, lock handle)` of the first of `seeds` that no other process holds, or None."""
    for seed in seeds:
        handle = locks.claim(out, f"seed-{seed}")
        if handle is not None:
            return seed, handle
    return None


def run_tag(settings):
    """`{"temperature": 4.0, "alpha": 0.5, "nckd_weight": 8.0}` -> `"T4-a0.5-nw8"`: a
    readable run-name part (T, alpha, then each option by its words' initials)."""
    short = {"temperature": "T", "alpha": "a"}
    parts = []
    for key, value in settings.items():
        label = short.get(key) or "".join(word[0] for word in key.split("_"))
        parts.append(f"{label}{value:g}" if isinstance(value, (int, float)) else f"{label}{value}")
    return "-".join(parts)


class MethodFactory:
    """`model -> Method`: a registered method (or `make(model, context)`) with its
    settings, the task's context and the student's feature model, its extra layers
    built for the teacher's target shapes (`teacher_shapes`, set once the targets
    are computed). `reads_features`: it reads more of the student than its logits."""

    def __init__(self, recipes, cls, settings, make=None):
        self.recipes, self.cls, self.settings, self.make = recipes, cls, settings, make
        self.reads_features = bool(set(cls.student_outputs) - {"logits"})
        self.teacher_shapes = {}
        self.parent_name = None  # the run it distils from, once known

    def __call__(self, model):
        r, s = self.recipes, self.settings
        context = methods.Context(
            num_classes=r.num_classes, num_examples=r.num_train_examples(), labels=r.train_labels(),
            temperature=s.get("temperature", r.config.temperature), alpha=s.get("alpha", r.config.alpha),
            features=r.feature_model(model) if self.reads_features else None)
        if self.make is not None:
            return self.make(model, context)
        options = self.cls.Options(**{f.name: s[f.name] for f in dataclasses.fields(self.cls.Options)})
        method = self.cls.create(model, options, context)
        method.build_extras(self.teacher_shapes)
        return method
