"""What frozen models compute on MHIST, computed once: a teacher's outputs on every
training image in each dihedral view, and a frozen base's pooled features.

Both are kept in memory and on disk (a teacher's in its run folder,
`train_<targets>-<V>views.npz`; a base's in `<out>/cache/features-*.npz`), so a
student never runs its teacher per step and a feature-extraction phase trains
only its head.
"""

import numpy as np

from kdtoolkit import training
from kdtoolkit.files import write_arrays_atomic
from task2_mhist import data as mhist
from task2_mhist import models


def inference_batch():
    """Images per forward pass of inference-only passes (cached teacher outputs, base
    features, evaluation): 256 with a GPU, 64 on a CPU (ResNet50V2 at 224 px takes
    about 3 GiB of memory per 64 images)."""
    import tensorflow as tf

    return 256 if tf.config.list_physical_devices("GPU") else 64


class FrozenOutputs:
    """Frozen models' outputs on one seed's MHIST splits.

    `splits`: the task's `{"train", "val"?, "test"}` splits; `image_size`: pixels;
    `views`: 8 dihedral views, or 1 without augmentation; `eval_sets`: the
    held-out datasets; `data_id`: the data's fingerprint; `cache_dir`: where base
    features are saved; `log`: progress lines.
    """

    def __init__(self, splits, image_size, views, eval_sets, data_id, cache_dir, log):
        self.splits, self.image_size, self.views = splits, image_size, views
        self.eval_sets, self.data_id, self.cache_dir, self.log = eval_sets, data_id, cache_dir, log
        self._features = {}

    def per_view(self, model, label):
        """`(n_train, V, ...)` outputs of a frozen `model` (`x -> tensor`, or a dict of them:
        then a dict of arrays) on every training image in each view; `label` starts
        its progress lines."""
        predictor = training.compiled_predictor(model)
        per_view = []
        for view in range(self.views):
            self.log(f"{label} on the training set, view {view + 1}/{self.views}")
            dataset = mhist.dataset(self.splits["train"], self.image_size, inference_batch(), view=view)
            per_view.append(training.predict(predictor, dataset, mhist.show)[0])
        if isinstance(per_view[0], dict):
            return {k: np.stack([v[k] for v in per_view], axis=1).astype(np.float32) for k in per_view[0]}
        return np.stack(per_view, axis=1).astype(np.float32)

    def targets(self, outputs_fn, run_dir, label, tag):
        """`{target: (n_train, V, ...)}` of `outputs_fn`, also saved in `run_dir` (when it
        exists) as `train_<tag>-<V>views.npz`, and read from there when it is."""
        path = run_dir / f"train_{tag}-{self.views}views.npz"
        if path.exists():
            with np.load(path) as saved:
                return {k: saved[k] for k in saved.files}
        targets = self.per_view(outputs_fn, f"[{label}] {tag}")
        if run_dir.is_dir():
            write_arrays_atomic(path, targets)
        return targets

    def base_features(self, model):
        """`{"train": (n, V, D), "val"/"test": (m, 1, D)}` pooled features of `model`'s frozen base.

        Computed once per distinct base (architecture, size, weight values) and data
        (fingerprint and validation split), kept in memory and as
        `<cache_dir>/features-*.npz`: every run that starts from the same base (all
        students of one seed) shares them.
        """
        key = (f"{model.name}-{self.image_size}px-{self.views}views-data{self.data_id}-"
               f"val{len(self.splits.get('val', ()))}-{models.weights_fingerprint(models.base_of(model))}")
        if key not in self._features:
            path = self.cache_dir / f"features-{key}.npz"
            if path.exists():
                with np.load(path) as saved:
                    self._features[key] = {name: saved[name] for name in saved.files}
            else:
                extractor, _ = models.split_at_base(model)
                predictor = training.compiled_predictor(extractor)
                features = {"train": self.per_view(extractor, f"[{model.name}] base features")}
                for split, data in self.eval_sets.items():
                    features[split] = training.predict(predictor, data)[0][:, None].astype(np.float32)
                write_arrays_atomic(path, features)
                self._features[key] = features
        return self._features[key]
