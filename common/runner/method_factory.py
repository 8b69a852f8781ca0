"""`model -> Method`: how a run builds its training objective once its model exists."""

import dataclasses

from kdtoolkit import deployed


class MethodFactory:
    """A registered method class `cls` (or `make(model, context)`) with its `settings`
    (its `Options` as a dict: the run's identity part). `context(model, features)`
    gives the task's `kdtoolkit.methods.Context` for `model` (with its feature model
    when `features`). Its extra layers are built for the teacher's target shapes,
    `teacher_shapes`, set once the targets are computed
    (`TargetCache.for_factories`), which also sets `parent_name`: the run it
    distils from. `reads_features`: it reads more of the student than its logits."""

    def __init__(self, cls, settings, context, make=None):
        self.cls, self.settings, self.context, self.make = cls, settings, context, make
        self.reads_features = bool(set(cls.student_outputs) - {"logits"})
        self.teacher_shapes = {}
        self.parent_name = None

    def options(self):
        """The method's `Options` from `settings` (a switch left out there is at its default)."""
        return self.cls.Options(**{f.name: self.settings[f.name] for f in dataclasses.fields(self.cls.Options)
                                   if f.name in self.settings})

    def deployable(self, build):
        """`build` (`() -> student`), or, for a method with a prediction head (CID),
        `() -> the student with that head` (`kdtoolkit.deployed.with_head`)."""
        if self.make is not None or self.cls.prediction_head(self.options(), 1) is None:
            return build

        def build_with_head():
            student = build()
            context = self.context(student, True)
            head = self.cls.prediction_head(self.options(), context.num_classes)
            return deployed.with_head(student, head, lambda _: context.features)

        return build_with_head

    def __call__(self, model):
        context = self.context(model, self.reads_features)
        if self.make is not None:
            return self.make(model, context)
        method = self.cls.create(model, self.options(), context)
        method.build_extras(self.teacher_shapes)
        return method
