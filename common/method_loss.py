"""Registered methods' distillation terms as `keras.distillation` losses, for users
of Keras' own `keras.distillation.Distiller`:

    keras.distillation.Distiller(teacher, student, [MethodLoss("rkd")], student_loss_weight=0.5)

Keras passes a distillation loss the teacher's and student's outputs (the final
logits, or the layers named by `teacher_layer_name` / `student_layer_name`) and no
labels, so only the terms that need neither labels nor trained layers of their own
fit: each method that declares a `LabelFreeTerm` (`label_free_methods()`: `kd`, its
T² KL term, Keras weighing the student's loss itself, so KD's `alpha` is Keras'
`student_loss_weight` and not an option here; `at`, `nst`, `sp` on feature maps;
`pkt`, `rkd` on embeddings). Each takes only the options its term uses.
"""

import keras
import tensorflow as tf

from kdtoolkit import methods
from kdtoolkit.errors import ConfigError

PACKAGE = "kd_toolkit"


def label_free_term(method):
    """The `LabelFreeTerm` that registered `method` declares itself (not inherited: SFTN
    is KD from a teacher it trains), or None."""
    return vars(methods.REGISTRY[method]).get("label_free_term") if method in methods.REGISTRY else None


def label_free_methods():
    """The registered methods that declare a `label_free_term` (at, kd, nst, pkt, rkd, sp)."""
    return tuple(name for name in methods.REGISTRY if label_free_term(name) is not None)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MethodLoss(keras.distillation.DistillationLoss):
    """Registered `method`'s label-free distillation term (see the module docstring);
    options by name as `kdtoolkit.distiller.Distiller` takes them, checked."""

    def __init__(self, method="kd", teacher_layer_name=None, student_layer_name=None, **options):
        if method not in label_free_methods():
            raise ConfigError(f"{method!r} needs labels or trained layers that keras.distillation does not give a "
                              f"loss; use kdtoolkit.distiller.Distiller, or one of {', '.join(label_free_methods())}")
        term, uses = label_free_term(method).function, label_free_term(method).options
        unused = sorted(set(options) - set(uses))
        if unused:
            raise ConfigError(f"MethodLoss({method!r}) takes {', '.join(uses)}, not {', '.join(unused)}"
                              + ("; KD's alpha is keras.distillation.Distiller's student_loss_weight"
                                 if "alpha" in unused else ""))
        try:
            self.options = methods.make_options(method, options, naming=methods.argument_name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.method, self.term = method, term
        self.teacher_layer_name, self.student_layer_name = teacher_layer_name, student_layer_name

    def validate_outputs(self, teacher_outputs, student_outputs):
        """Teacher and student may differ in width (RKD) or map size (AT); each must be one tensor."""
        for role, output in (("teacher", teacher_outputs), ("student", student_outputs)):
            if isinstance(output, (dict, list, tuple)):
                raise ValueError(f"MethodLoss({self.method!r}) takes one {role} output tensor, got "
                                 f"{type(output).__name__}")

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return self.term(self.options, tf.stop_gradient(teacher_outputs), student_outputs)

    def get_config(self):
        used = label_free_term(self.method).options
        return {"method": self.method, "teacher_layer_name": self.teacher_layer_name,
                "student_layer_name": self.student_layer_name,
                **{k: v for k, v in methods.options_dict(self.options).items() if k in used}}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
