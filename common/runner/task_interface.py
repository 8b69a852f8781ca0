"""What a course task provides to the shared recipes (`kdtoolkit.runner.recipes.Recipes`).

A task is its data, its held-out sets, its model builders, its metrics and its
training schedule; everything else (recorded runs, cached teacher outputs,
chains, sweeps, export, explanations) is written once on top of these members.
"""


class TaskInterface:
    """The members a task defines (Task 1: `task1_mnist.experiments.Task1`)."""

    experiments = ()  # every experiment of the task, in the order `run` calls them
    studies = {}  # name -> `task -> outcome`: the research studies among the experiments (`kdtoolkit.runner.studies`)
    num_classes = None  # classes of the labels
    eval_sets = {}  # split name ("val", "test") -> held-out dataset of {"x", "y"} batches
    per_view = False  # whether cached teacher outputs have a views axis (Task 2's dihedral views)
    kept_models = 3  # trained models held in memory at once (Task 2's take hundreds of MB each)
    primary_metric = "accuracy"  # the test metric the export table compares ("auc" in Task 2)
    occlusion_fill = 0.0  # pixel value of an occluding patch
    explain_batch = 1024  # perturbed images per forward pass while explaining

    data = None  # what `load_data` returned, as the task object was given it

    @staticmethod
    def load_data(config):
        """The task's data set, loaded once and shared by every seed's task object."""
        raise NotImplementedError

    # -- data ---------------------------------------------------------------------

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

    def training_subset(self, arrays, examples):
        """The training `arrays` (of `train_data`) restricted to the training examples
        `examples` (indices, in their order; repeats allowed): what `fit_model` then
        trains on. By default every array is indexed, its `"index"` values (the
        examples' own indices, which memory banks use) kept."""
        return {name: value[examples] for name, value in arrays.items()}

    def num_train_examples(self):
        raise NotImplementedError

    def train_labels(self):
        """`(n_train,)` integer class labels of the training examples, by example index."""
        raise NotImplementedError

    def compute_targets(self, outputs_fn, name, tag):
        """`{target: array}` of `outputs_fn` (`x -> {target: tensor}`, a frozen model `name`
        and what a method caches of it, `tag` naming those targets) on every training
        example, by example index: `(n, ...)`, or `(n, views, ...)` when `per_view`."""
        raise NotImplementedError

    # -- models and schedule ------------------------------------------------------

    def feature_model(self, model):
        """`x -> {"logits", "embedding", "spatial", "hint"}` sharing `model`'s layers."""
        raise NotImplementedError

    def student_builder(self):
        """`() -> keras.Model`: a fresh student (the architecture every method distils into)."""
        raise NotImplementedError

    def teacher_builder(self):
        """`() -> keras.Model`: a fresh teacher of the task's configuration."""
        raise NotImplementedError

    def teacher_model(self):
        """`(run name, model)` of the seed's trained teacher (training it if needed)."""
        raise NotImplementedError

    def fit_model(self, name, model, make_method, arrays, resume_dir, **options):
        """Trains `make_method(model)` (the task may wrap part of `model`) with
        `kdtoolkit.training.fit` on a shuffled dataset of `arrays` that it builds (after
        the run's seed is set), saving and resuming epochs in `resume_dir`; returns
        the per-epoch history."""
        raise NotImplementedError

    def student_fit_options(self):
        """Extra `fit_model` options of a student's run (e.g. its learning rate)."""
        return {}

    def teacher_fit_options(self):
        """Extra `fit_model` options of a teacher's run (e.g. its learning rate)."""
        return {}

    def student_branches(self, teacher):
        """`(cuts, branches)` for SFTN (`kdtoolkit.methods.sftn`): `cuts` is `x -> {"logits",
        "cut_1", ...}` over `teacher`'s layers, `branches[i - 1]` a new model from cut i
        through a transform into fresh copies of the student's blocks after that cut,
        to `(batch, classes)` logits."""
        raise NotImplementedError

    def split_metrics(self, split, logits, labels, summary):
        """Metrics of one held-out split from its `(n, classes)` logits and labels, keys
        prefixed by the split (`test_accuracy`, ...); `summary`: also those only a
        run's final record keeps (e.g. a confusion matrix)."""
        raise NotImplementedError

    # -- deployment and explanations ----------------------------------------------

    def test_arrays(self):
        """`(images float32 in the models' input scale, labels)` of the whole test set."""
        raise NotImplementedError

    def representative_inputs(self, count=200):
        """`count` float32 training inputs that calibrate full-integer quantization."""
        raise NotImplementedError

    def explanation_images(self):
        """`(images, labels)`: the first `--explain-images` test images, in the models' input scale."""
        raise NotImplementedError

    def lime_settings(self):
        """`{"segment_fn", "segmentation" (its description), "hide_value"}` for LIME."""
        raise NotImplementedError
