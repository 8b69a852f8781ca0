"""The course's experiments on any task: recorded runs, distillation and chains.

A task subclasses `Recipes` and defines the members of
`kdtoolkit.runner.task_interface.TaskInterface` (its data, models, metrics and schedule).
`Recipes` composes the parts that do the work: a `ResultsStore` (records), a
`ModelCache` (trained models), a `TargetCache` (frozen teachers' outputs), the
shared compiled steps (`Workspaces`), and names each run by a `RunSpec`.
"""

import keras

from kdtoolkit import deployed, device, methods, training
from kdtoolkit.runner import evaluation, runs, sessions
from kdtoolkit.distribute import make_strategy, results_root, workers_agree
from kdtoolkit.errors import DataError, UserError
from kdtoolkit.deploy.explanations import explain_seed
from kdtoolkit.methods.base import refuse_replicas
from kdtoolkit.runner.method_factory import MethodFactory
from kdtoolkit.runner.model_cache import ModelCache
from kdtoolkit.runner.results import ResultsStore
from kdtoolkit.runner.run_spec import RunSpec, method_stem, run_name, run_tag
from kdtoolkit.runner.task_interface import TaskInterface
from kdtoolkit.runner.teacher_targets import TargetCache
from kdtoolkit.speed.workspaces import Workspaces


def deployable(make_method, build):
    """`build`, or the student with its method's prediction head (`MethodFactory.deployable`)."""
    wrap = getattr(make_method, "deployable", None)
    return wrap(build) if wrap is not None else build


class Recipes(TaskInterface):
    """One task's experiments for one config and one seed (`Task1`, `Task2`)."""

    def __init_subclass__(cls, **kwargs):
        """A registered method may not share its name with a task's experiment, study
        or attribute (`--only NAME` would mean two things)."""
        super().__init_subclass__(**kwargs)
        clashes = sorted(name for name in methods.REGISTRY
                         if name != "kd" and (hasattr(cls, name) or name in cls.studies))
        if clashes:
            raise ValueError(f"registered method {', '.join(map(repr, clashes))} has the name of a {cls.__name__} "
                             "experiment or attribute; give the method another name")

    def __init__(self, config, seed, log=None):
        self.config = config
        self.seed = seed
        self.log = log or (lambda _msg: None)
        self.strategy = make_strategy(config.distribute)
        self.store = ResultsStore(results_root(config.out, getattr(self.strategy, "cluster_resolver", None)))
        if not workers_agree(self.strategy, self.store.progress):
            raise UserError(f"the workers' copies of the results are not at the chief's point in {config.out} (a "
                            "worker stopped at another run or epoch): resuming would put them out of step; start "
                            "the cluster again with a new --out")
        self.models = ModelCache(self.kept_models, self.build_in_scope, self.store.weights_path)
        self.targets = TargetCache(self.compute_targets, self.feature_model, self.per_view)
        self.workspaces = Workspaces()  # `kdtoolkit.runner.sessions.run_all` shares one across seeds

    @classmethod
    def run_all(cls, config, data=None, log=None):
        """Every selected experiment for every seed (`kdtoolkit.runner.sessions.run_all`)."""
        return sessions.run_all(cls, config, data, log)

    def run(self, only=None):
        """This seed's selected experiments, timed (`kdtoolkit.runner.sessions.run_experiments`)."""
        return sessions.run_experiments(self, only)

    def for_seed(self, seed):
        """This task at another seed, on the same data and results (its runs are that
        seed's: an ensemble's members)."""
        task = type(self)(self.config, self.data, seed=seed, log=self.log)
        task.workspaces = self.workspaces
        return task

    def experiment(self, name):
        """Runs experiment `name`: a registered method's student, except `kd` (the
        course's experiment of that name), a study of `studies`, else the task's
        method of that name."""
        if name in methods.REGISTRY and name != "kd":
            return self.distil_method(name)
        return self.studies[name](self) if name in self.studies else getattr(self, name)()

    # -- runs ------------------------------------------------------------------------

    def spec(self, stem, experiment, **settings):
        """The `RunSpec` of a run of this seed: the task's shared settings, the precision
        when it is not float32 (a bfloat16 run is not a float32 run's twin), then `settings`."""
        precision = keras.mixed_precision.global_policy().name
        shared = {**self.base_identity(), **({} if precision == "float32" else {"precision": precision})}
        return RunSpec(stem, experiment, self.seed, {**shared, **settings})

    def train(self, spec, build, make_method, train_data, **fit_options):
        """Trains `make_method(model)` on `train_data()` as run `spec` (or loads the
        finished run). Returns `(record, model)`; the model is kept for later links
        of a chain (`model_of`)."""
        name = spec.name
        if self.models.knows(name):  # done earlier in this object: no rebuild
            record = self.store.finished(name, spec.identity)
            if record is not None:
                return record, self.model_of(name)
        record, model = runs.run(
            self.store, name, identity=spec.identity, config=self.config.as_dict(),
            build=lambda: self.build_in_scope(build), data=train_data,
            train=lambda model, data: self.fit_model(name, model, make_method, data,
                                                     resume_dir=self.store.resume_dir(name, spec.identity),
                                                     **fit_options),
            evaluate=lambda model: self.final_metrics(
                name, self.held_out(self.predictor(make_method(model))), getattr(make_method, "parent_name", None)),
            log=self.log, about={"data": self.data_info()},
        )
        if model is None:
            raise DataError(f"{self.store.weights_path(name)} is missing; delete {self.store.run_dir(name)} "
                            "to train it again")
        self.keep(name, model, build)
        return record, model

    def train_model(self, spec, build, make_method, train_data, **fit_options):
        """Trains one model through the task's schedule; returns `(record, model)` of its
        final run. One run here, of the deployed student (`deployable`); a task with
        phases overrides it."""
        return self.train(spec, deployable(make_method, build), make_method, train_data, **fit_options)

    def final_run_name(self, stem):
        """The run holding the finished model of `stem` (a task with phases: its last)."""
        return run_name(stem, self.seed)

    def keep(self, name, model, build=None):
        """Holds run `name`'s model for later links of a chain (`ModelCache.keep`)."""
        self.models.keep(name, model, build)

    def model_of(self, name):
        """The trained model of run `name`, trained or loaded by this object (`ModelCache.get`)."""
        return self.models.get(name)

    def trained_model(self, label, name, precision=None):
        """The trained model of finished run `name` (`label`: "teacher" or a student):
        the one this object trained or loaded, else built and loaded from its weights.
        `precision` (e.g. "float32" for TFLite, which has no bfloat16 kernels): built
        under that dtype policy instead of the run's; a mixed-precision model keeps
        float32 variables, so its weights load unchanged."""
        if self.models.knows(name) and precision in (None, keras.mixed_precision.global_policy().name):
            return self.model_of(name)
        if label == "teacher":
            build = self.teacher_builder()
        elif label in methods.REGISTRY:
            build = deployable(self.factory(methods.get(label)), self.student_builder())
        else:
            build = self.student_builder()
        with device.dtype_policy(precision or keras.mixed_precision.global_policy().name):
            model = self.build_in_scope(build)
        model.load_weights(self.store.weights_path(name))
        return model

    # -- training and evaluation ------------------------------------------------------

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
        shared compiled steps (`kdtoolkit.speed.workspaces`)."""
        return {"jit": device.use_jit(self.config.jit), "steps_per_call": self.config.steps_per_call,
                "workspaces": self.workspaces if self.config.share_steps else None}

    def progress(self, name):
        return lambda line: self.log(f"[{name}] {line}")

    def checkpoint_path(self, name, epoch):
        return self.store.run_dir(name) / "checkpoints" / f"epoch-{epoch:02d}.weights.h5"

    def predictor(self, method):
        """The compiled `x -> class logits` of `method` for its final evaluation: traced
        once per structure with shared steps (`Workspaces.predictor`)."""
        if self.config.share_steps:
            return self.workspaces.predictor(method, self.strategy)
        return training.compiled_predictor(method.class_logits)

    def held_out(self, predictor, eval_sets=None):
        return evaluation.held_out(predictor, eval_sets or self.eval_sets)

    def evaluate(self, predictor, eval_sets=None):
        """Per-epoch held-out metrics (`kdtoolkit.runner.evaluation.epoch_metrics`)."""
        return evaluation.epoch_metrics(predictor, eval_sets or self.eval_sets, self.split_metrics)

    def final_metrics(self, name, outputs, teacher=None):
        """Run `name`'s recorded metrics (`kdtoolkit.runner.evaluation.final_metrics`); `teacher`:
        the run it was distilled from."""
        return evaluation.final_metrics(self.store.run_dir(name), outputs, self.split_metrics,
                                        self.store.run_dir(teacher) if teacher else None)

    def save_sweep(self, name, rows, metric, keys):
        """Writes sweep `name`'s rows with the best one (`kdtoolkit.runner.evaluation.save_sweep`)."""
        return evaluation.save_sweep(self.store.root, name, self.seed, rows, metric, keys, self.eval_sets, self.log)

    # -- distillation ---------------------------------------------------------------

    def method_settings(self, cls, **overrides):
        """A run of method `cls`'s settings: its `Options` as a dict, from the config
        (`--temperature`, `--alpha`, `--<method>-<option>`) and `overrides`; part of
        the run's identity and name (`methods.run_settings`: a switch such as
        `standardize` only when it is on)."""
        own = dict(self.config.method_options).get(cls.name, {}) if cls.name else {}
        shared = {"temperature": self.config.temperature, "alpha": self.config.alpha}
        return methods.run_settings(methods.make_options(cls, {**own, **overrides}, shared))

    def context(self, model, features=False):
        """The `kdtoolkit.methods.Context` of a method training `model` on this task."""
        found = None
        if features:
            found = deployed.student_features(model)
            found = self.feature_model(model) if found is None else found
        return methods.Context(num_classes=self.num_classes, num_examples=self.num_train_examples(),
                               labels=self.train_labels(), features=found)

    def factory(self, cls, settings=None, make=None):
        """A `MethodFactory` for method class `cls` with `settings` (`method_settings`)."""
        refuse_replicas(cls, cls.name, self.strategy.num_replicas_in_sync, "run it with --distribute none")
        return MethodFactory(cls, settings if settings is not None else self.method_settings(cls), self.context, make)

    def logits_of(self, name, model=None):
        """Training-set logits of a trained model, computed once per model (`model` may be
        omitted once they are, or for a model this object trained)."""
        model = model if model is not None or self.targets.has(name) else self.model_of(name)
        return self.targets.of(name, model, methods.Distillation)["teacher_logits"]

    def distil_data(self, parent, factories):
        """`() -> training arrays` carrying what each of `factories` reads of `parent()`'s
        outputs (`TargetCache.for_factories`); `parent` is `() -> (run name, model)`,
        called only if a run must train and a method reads a teacher (label smoothing
        reads none), so a finished student never makes its teacher train or predict again."""
        reading = [factory for factory in factories if factory.cls.target_names()]
        return lambda: self.train_data(**(self.targets.for_factories(*parent(), reading) if reading else {}))

    def distil(self, spec, build, parent, factory, **fit_options):
        """Trains `factory(model)` as run `spec` on batches carrying what its method
        reads of `parent()`'s outputs; returns `(record, model)`."""
        return self.train_model(spec, build, factory, self.distil_data(parent, [factory]), **fit_options)

    def chain(self, links, parent=None, method="kd", **overrides):
        """Distils along a chain: parent -> links[0] -> links[1] -> ...

        `links` is a list of `(role, build)`; link i learns by registered `method`
        (KD by default, at the config's settings with `overrides`, e.g.
        `temperature=2`) from link i-1 (from `parent() -> (name, model)` for i = 0;
        the seed's teacher by default). Names: `method_stem`, e.g. `ta-T4-a0.5-s0`
        then `ta-takd-T4-a0.5-s0`; a one-link chain `[("kd", build_student)]` is
        exactly the plain KD student. Returns the records (of each link's final run).
        """
        cls = methods.get(method)
        settings = self.method_settings(cls, **overrides)
        parent = parent or self.teacher_model
        roles, records = [], []
        for role, build in links:
            roles.append(role)
            extra = {} if method in ("kd", role) else {"method": method}
            spec = self.spec(method_stem(method, roles, settings), role, **extra, **settings)
            record, model = self.distil(spec, build, parent, self.factory(cls, settings), **self.student_fit_options())
            records.append(record)
            parent = lambda name=record["run"], model=model: (name, model)  # noqa: E731
        return records

    def student_stem(self, method):
        """The stem of the student distilled from the teacher by `method` at the config's settings."""
        return method_stem(method, [method], self.method_settings(methods.get(method)))

    def kd(self, **overrides):
        """The student distilled straight from the teacher by KD (`overrides`: e.g.
        `temperature=2`); its record."""
        return self.distil_method("kd", **overrides)

    def distil_method(self, method, **overrides):
        """The student distilled by registered `method` from the seed's teacher, or from
        the method's own teacher (`teacher_objective`: SFTN); its record."""
        cls = methods.get(method)
        parent = (lambda: self.own_teacher(cls, **overrides)) if cls.teacher_objective else None
        return self.chain([(method, self.student_builder())], parent=parent, method=method, **overrides)[-1]

    def own_teacher(self, cls, **overrides):
        """`(run name, model)` of the teacher that method `cls` trains for itself
        (`cls.teacher_objective` on the task's teacher schedule, at its
        `teacher_settings`), trained or loaded."""
        settings = self.method_settings(cls, **overrides)
        own = {key: settings[key] for key in cls.teacher_settings}
        options = methods.make_options(cls, settings)

        def make(model):
            return cls.teacher_objective(model, *self.student_branches(model), options)

        make.reads_features = True  # Task 2: its feature-extraction phase trains the head alone, by CE
        spec = self.spec(f"{cls.name}-teacher-{run_tag(own)}", f"{cls.name}-teacher", **own)
        record, model = self.train_model(spec, self.teacher_builder(), make, self.train_data,
                                         **self.teacher_fit_options())
        return record["run"], model

    def sftn_teacher(self):
        """`(run name, model)` of SFTN's student-friendly teacher at the config's settings,
        a `parent` for `chain` (any method can distil from it)."""
        return self.own_teacher(methods.get("sftn"))

    # -- deployment and explanations -------------------------------------------------

    def export(self):
        """TFLite files of the teacher and every finished student of this seed,
        measured (`kdtoolkit.runner.export_experiment.export_seed`); returns the rows."""
        from kdtoolkit.runner.export_experiment import export_seed

        return export_seed(self)

    def lime(self):
        """LIME maps of the first test images: teacher, KD student, scratch student."""
        return explain_seed(self, "lime")

    def occlusion(self):
        """Occlusion maps of the same images and models."""
        return explain_seed(self, "occlusion")
