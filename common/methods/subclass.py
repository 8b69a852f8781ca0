"""Subclass distillation (Müller, Kornblith & Hinton 2020) and its known-subclass
variant; the formulas and loss functions are in `kdtoolkit.losses`.

A model with C classes and S subclasses per class outputs C·S class-major logits
and predicts classes through their logsumexp. These are task recipes (`skd`),
since each needs a teacher of its own, not the task's ordinary teacher.
"""

from kdtoolkit import losses
from kdtoolkit.methods.base import Method, SharedStep
from kdtoolkit.methods.kd import Distillation


class SubclassMethod(Method):
    """Base for models with `C·S` class-major subclass logits; predicts via logsumexp."""

    def __init__(self, model, num_classes):
        super().__init__(model)
        self.num_classes = int(num_classes)

    def forward(self, x, training=False):
        subclass_logits = self.model(x, training=training)
        return subclass_logits, losses.class_logits_from_subclass_logits(subclass_logits, self.num_classes)


class SubclassTeacher(SubclassMethod):
    """Subclass-distillation teacher: class CE through logsumexp + `beta` · L_aux.

    Logged terms: `ce` and `aux` (already multiplied by `beta`).
    """

    term_names = ("ce", "aux")
    shared_step = SharedStep(lambda method: (method.num_classes, method.aux_weight, method.aux_temperature))

    def __init__(self, model, num_classes, aux_weight=1.0, aux_temperature=1.0):
        super().__init__(model, num_classes)
        self.aux_weight = float(aux_weight)
        self.aux_temperature = losses.validate_temperature(aux_temperature)

    def loss_terms(self, batch, training=True):
        subclass_logits, logits = self.forward(batch["x"], training=training)
        return {
            "ce": losses.teacher_loss(batch["y"], logits),
            "aux": self.aux_weight * losses.subclass_auxiliary_loss(subclass_logits, self.aux_temperature),
        }, logits


class SubclassDistillation(SubclassMethod, Distillation):
    """Student of subclass distillation: `alpha` · class CE (its own logsumexp class
    logits) + `(1 - alpha)` · T² KL between teacher and student SUBCLASS distributions.

    `"teacher_logits"` in the batch are the teacher's `(batch, C·S)` subclass logits.
    """

    shared_step = SharedStep(lambda method: (method.num_classes, id(method.teacher), method.options.standardize),
                             runtime=("temperature", "alpha"))

    def __init__(self, student, num_classes, options=None, teacher=None, **values):
        Distillation.__init__(self, student, options, teacher=teacher, **values)
        self.num_classes = int(num_classes)

    # loss_terms is Distillation's: `forward` (SubclassMethod's) yields the subclass
    # logits to distil and the logsumexp class logits for the labels.


class KnownSubclassTeacher(SubclassMethod):
    """Teacher trained on KNOWN subclass labels (`batch["subclass"]`, class-major ids):
    cross-entropy over the `C·S` subclass logits; predicts classes via logsumexp."""

    term_names = ("ce",)
    shared_step = SharedStep(lambda method: (method.num_classes,))

    def loss_terms(self, batch, training=True):
        subclass_logits, logits = self.forward(batch["x"], training=training)
        return {"ce": losses.teacher_loss(batch["subclass"], subclass_logits)}, logits
