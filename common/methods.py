"""Training objectives: one small class per method, one pure loss function each.

A `Method` owns the model being trained and turns a batch into named loss terms;
the training loop (`common.training.fit`) minimises their sum and logs each term
separately. A batch is a dict of tensors:

- `"x"`: model inputs, `"y"`: `(batch,)` integer labels;
- `"teacher_logits"` (optional): `(batch, classes)` logits of a frozen teacher for
  exactly these inputs, precomputed once (see `common.data.with_teacher_logits`).
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

    def class_logits(self, x, training=False):
        """`(batch, classes)` logits used for accuracy and prediction."""
        return self.model(x, training=training)

    def loss_terms(self, batch, training=True):
        """Returns `({term_name: scalar}, class_logits)`; the loss is the terms' sum."""
        raise NotImplementedError


class CrossEntropy(Method):
    """Supervised training on hard labels: a teacher, or a student from scratch."""

    term_names = ("ce",)

    def loss_terms(self, batch, training=True):
        logits = self.class_logits(batch["x"], training=training)
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
        logits = self.class_logits(batch["x"], training=training)
        teacher_logits = self.teacher_logits(batch)
        return {
            "ce": self.alpha * losses.teacher_loss(batch["y"], logits),
            "kd": (1.0 - self.alpha)
            * losses.distillation_loss(teacher_logits, logits, self.temperature),
        }, logits
