"""Training objectives: one small class per method, one pure loss function each.

A `Method` owns the model being trained and turns a batch into named loss terms;
the training loop (`common.training.fit`) minimises their sum and logs each term
separately. A batch is a dict of tensors:

- `"x"`: model inputs, `"y"`: `(batch,)` integer labels (`"subclass"`: known
  subclass ids, for `KnownSubclassTeacher`);
- `"teacher_logits"` (optional): `(batch, classes)` logits of a frozen teacher for
  exactly these inputs, precomputed once (see `common.data.teacher_logits`).
  When absent, a distillation method runs its teacher on `"x"` instead.

A new method costs one loss function in `common.losses` and one subclass here that
lists its `term_names` and implements `loss_terms`.
"""

import tensorflow as tf

from common import losses


class Method:
    """Base class: the trained model, its variables and its class-logit prediction."""

    term_names = ()

    def __init__(self, model):
        self.model = model

    @property
    def trainable_variables(self):
        return self.model.trainable_variables

    def forward(self, x, training=False):
        """`(outputs, class_logits)`: the model's raw outputs (what is distilled) and
        the `(batch, classes)` logits used for labels, accuracy and prediction."""
        outputs = self.model(x, training=training)
        return outputs, outputs

    def class_logits(self, x, training=False):
        return self.forward(x, training=training)[1]

    def loss_terms(self, batch, training=True):
        """Returns `({term_name: scalar}, class_logits)`; the loss is the terms' sum."""
        raise NotImplementedError


class CrossEntropy(Method):
    """Supervised training on hard labels: a teacher, or a student from scratch."""

    term_names = ("ce",)

    def loss_terms(self, batch, training=True):
        _, logits = self.forward(batch["x"], training=training)
        return {"ce": losses.teacher_loss(batch["y"], logits)}, logits


class Distillation(Method):
    """Hinton KD: `alpha * CE(labels) + (1 - alpha) * T² KL(teacher_T ‖ student_T)`.

    The two weighted parts are logged as `ce` and `kd`; their sum is exactly
    `losses.student_loss`. `teacher` is only needed when batches carry no
    precomputed `"teacher_logits"`; it is never trained here.
    """

    term_names = ("ce", "kd")

    def __init__(self, student, temperature, alpha, teacher=None):
        super().__init__(student)
        self.temperature = losses.validate_temperature(temperature)
        self.alpha = losses.validate_alpha(alpha)
        self.teacher = teacher

    def teacher_logits(self, batch):
        if "teacher_logits" in batch:
            return tf.stop_gradient(batch["teacher_logits"])
        if self.teacher is None:
            raise ValueError(
                "Distillation needs batches with 'teacher_logits' or a teacher model"
            )
        return tf.stop_gradient(self.teacher(batch["x"], training=False))

    def loss_terms(self, batch, training=True):
        outputs, logits = self.forward(batch["x"], training=training)
        return {
            "ce": self.alpha * losses.teacher_loss(batch["y"], logits),
            "kd": (1.0 - self.alpha)
            * losses.distillation_loss(self.teacher_logits(batch), outputs, self.temperature),
        }, logits


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

    def __init__(self, model, num_classes, aux_weight=1.0, aux_temperature=1.0):
        super().__init__(model, num_classes)
        self.aux_weight = float(aux_weight)
        self.aux_temperature = losses.validate_temperature(aux_temperature)

    def loss_terms(self, batch, training=True):
        subclass_logits, logits = self.forward(batch["x"], training=training)
        return {
            "ce": losses.teacher_loss(batch["y"], logits),
            "aux": self.aux_weight
            * losses.subclass_auxiliary_loss(subclass_logits, self.aux_temperature),
        }, logits


class SubclassDistillation(SubclassMethod, Distillation):
    """Student of subclass distillation: `alpha` · class CE (its own logsumexp class
    logits) + `(1 - alpha)` · T² KL between teacher and student SUBCLASS distributions.

    `"teacher_logits"` in the batch are the teacher's `(batch, C·S)` subclass logits.
    """

    term_names = ("ce", "kd")

    def __init__(self, student, num_classes, temperature, alpha, teacher=None):
        Distillation.__init__(self, student, temperature, alpha, teacher=teacher)
        self.num_classes = int(num_classes)

    # loss_terms is Distillation's: `forward` (SubclassMethod's) yields the subclass
    # logits to distil and the logsumexp class logits for the labels.


class KnownSubclassTeacher(SubclassMethod):
    """Teacher trained on KNOWN subclass labels (`batch["subclass"]`, class-major ids):
    cross-entropy over the `C·S` subclass logits; predicts classes via logsumexp."""

    term_names = ("ce",)

    def loss_terms(self, batch, training=True):
        subclass_logits, logits = self.forward(batch["x"], training=training)
        return {"ce": losses.teacher_loss(batch["subclass"], subclass_logits)}, logits
