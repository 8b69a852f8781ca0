"""A frozen model's outputs on the training set, computed once per model and targets.

Every student distilled from one teacher reads the same cached arrays (by example
index, and by view where the task augments); what a method caches is its
`teacher_targets` (logits, an embedding, attention maps).
"""

from kdtoolkit import methods


class TargetCache:
    """`{"teacher_<target>": array}` of frozen models, kept for the life of one seed's runs.

    `compute(outputs_fn, name, tag) -> {target: array}` runs `outputs_fn` (`x ->
    {target: tensor}`) over the training set (the task's `compute_targets`);
    `feature_model(model) -> (x -> {output: tensor})` exposes a model's features;
    `per_view`: the arrays have a views axis after the examples'.
    """

    def __init__(self, compute, feature_model, per_view=False):
        self.compute, self.feature_model, self.per_view = compute, feature_model, per_view
        self._arrays = {}

    def has(self, name, method_cls=methods.Distillation):
        return (name, method_cls.target_names()) in self._arrays

    def of(self, name, model, method_cls):
        """What `method_cls` reads of frozen model `name` on the training set, as
        `{"teacher_<target>": (n, ...) or (n, views, ...)}`."""
        targets = method_cls.target_names()
        key = (name, targets)
        if key not in self._arrays:
            if targets == ("logits",) and tuple(method_cls.teacher_outputs) == ("logits",):
                outputs_fn = lambda x, training=False: {"logits": model(x, training=training)}  # noqa: E731
            else:
                features = self.feature_model(model)
                outputs_fn = lambda x, training=False: method_cls.teacher_targets(features(x, training=training))  # noqa: E731
            self._arrays[key] = self.compute(outputs_fn, name, "-".join(targets))
        return {f"teacher_{target}": array for target, array in self._arrays[key].items()}

    def for_factories(self, name, model, factories):
        """The arrays every one of `factories` (`MethodFactory`) reads of model `name`;
        tells each factory its parent's name and the shapes of those targets (for
        the extra layers it builds)."""
        found_all = {}
        skip = 2 if self.per_view else 1
        for factory in factories:
            found = self.of(name, model, factory.cls)
            factory.parent_name = name
            factory.teacher_shapes = {k[len("teacher_"):]: (None, *v.shape[skip:]) for k, v in found.items()}
            found_all.update(found)
        return found_all
