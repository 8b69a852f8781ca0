"""`model -> Method`: how a run builds its training objective once its model exists."""

import dataclasses


class MethodFactory:
    """A registered method class `cls` (or `make(model, context)`) with its `settings`
    (its `Options` as a dict: the run's identity part). `context(model, features)`
    gives the task's `common.methods.Context` for `model` (with its feature model
    when `features`). Its extra layers are built for the teacher's target shapes,
    `teacher_shapes`, set once the targets are computed
    (`TargetCache.for_factories`), which also sets `parent_name`: the run it
    distils from. `reads_features`: it reads more of the student than its logits."""

    def __init__(self, cls, settings, context, make=None):
        self.cls, self.settings, self.context, self.make = cls, settings, context, make
        self.reads_features = bool(set(cls.student_outputs) - {"logits"})
        self.teacher_shapes = {}
        self.parent_name = None

    def __call__(self, model):
        context = self.context(model, self.reads_features)
        if self.make is not None:
            return self.make(model, context)
        options = self.cls.Options(**{f.name: self.settings[f.name] for f in dataclasses.fields(self.cls.Options)})
        method = self.cls.create(model, options, context)
        method.build_extras(self.teacher_shapes)
        return method
