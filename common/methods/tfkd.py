"""Teacher-free KD, manually designed regularisation Tf-KD_reg (Yuan, Tay, Li,
Wang & Feng, CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing
Regularization").

A virtual teacher replaces the trained one: with K classes and label y it puts
probability a on the correct class and spreads the rest uniformly,

    p^d_k = a if k = y, else (1 − a) / (K − 1)

and that distribution, read as logits, is softened by T into the target
q = softmax(p^d / T). The student's own probabilities p = softmax(z_s) (at
temperature 1, not softened) are pulled towards it:

    reg = (1 / (B · K)) Σ_i Σ_k q_ik (log q_ik − log p_ik)
    L   = (1 − α) · CE(y, softmax(z_s)) + α · m · reg

The reference is the authors' code, yuanli2333/Teacher-free-Knowledge-Distillation,
`my_loss_function.py` `loss_kd_regularization` (run by `main.py --regularization`).
Its KL is PyTorch 1.2's `nn.KLDivLoss()` with the default reduction, the mean
over all B·K elements (not the per-example sum averaged over the batch), kept
here: hence the 1/(B·K). a = 0.99 (`--tfkd-correct-prob`) is the value fixed in
that function; T = 40 (`--tfkd-reg-temperature`), α = 0.95 (`--tfkd-reg-alpha`)
and m = 1 (`--tfkd-multiplier`) are its CIFAR-100 parameters for MobileNetV2
(`experiments/base_experiments/base_mobilenetv2/params.json`), Task 2's
student. Its other students use (T, α, m) = (10, 0.95, 1) for ShuffleNetV2,
(20, 0.1, 100) for ResNet18 and (40, 0.1, 50) for GoogLeNet; its ImageNet
script's defaults are T = 20, α = 0.1. The options are the method's own, not the
shared `--temperature` / `--alpha`: T softens a probability vector (not logits),
without KD's T², and α weights the regulariser where `--alpha` weights the
cross-entropy, so the task's KD defaults (T = 4, α = 0.5) would not be this
method's.

It reads no teacher (like `ls`): its run trains the student alone, and a
teacher given to `kdtoolkit.distiller.Distiller` is not used. With K = 2 (Task 2)
the target is nearly uniform, softmax([0.99, 0.01] / 40) ≈ [0.506, 0.494].

Not built: Tf-KD_self (`loss_kd_self`, `main.py --self_training`), KD from a
pre-trained copy of the student itself, (1 − α) CE + α m T² KL(softmax(z_t/T) ‖
softmax(z_s/T)) with the same element mean. A registered method cannot ask the
task runners for that teacher (a run distils from the seed's teacher, and
`teacher_objective` trains a teacher of the teacher's architecture); from
Python it is `Distiller(trained_student_copy, student, method="kd",
temperature=T, alpha=1 - α)`, except that KD averages its KL per example, a
factor K above the reference's element mean, and weights it by 1 − α without m.
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Distiller, register


def virtual_teacher(labels, classes, correct_prob, temperature):
    """`(batch, K)` log-probabilities of the softened virtual teacher
    log softmax(p^d / T)."""
    target = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), classes)
    designed = correct_prob * target + (1.0 - correct_prob) / (classes - 1) * (1.0 - target)
    return tf.nn.log_softmax(designed / temperature, axis=-1)


def regularization_loss(labels, logits, correct_prob, temperature):
    """KL(q ‖ softmax(z_s)) summed over the batch and classes, divided by B · K
    (`nn.KLDivLoss()`'s element mean); the student's logits are not softened."""
    logits = tf.cast(logits, tf.float32)
    classes = int(logits.shape[-1])
    if classes < 2:
        raise ValueError(f"tfkd: the virtual teacher needs at least 2 classes, got {classes}")
    log_q = virtual_teacher(labels, classes, correct_prob, temperature)
    kl = tf.reduce_sum(tf.exp(log_q) * (log_q - tf.nn.log_softmax(logits, axis=-1)), axis=-1)
    return tf.reduce_mean(kl) / classes


@dataclasses.dataclass(frozen=True)
class TfKDOptions:
    correct_prob: float = dataclasses.field(default=0.99, metadata={
        "help": "a, the virtual teacher's probability of the correct class", "maximum": 1.0})
    reg_temperature: float = dataclasses.field(default=40.0, metadata={
        "help": "T softening the virtual teacher's distribution (read as logits)", "exclusive": True})
    reg_alpha: float = dataclasses.field(default=0.95, metadata={
        "help": "weight of the regulariser; 1 - reg_alpha weights the cross-entropy", "maximum": 1.0})
    multiplier: float = dataclasses.field(default=1.0, metadata={"help": "m, multiplier of the regulariser"})


@register
class TeacherFreeKD(Distiller):
    """Logged terms: `ce` ((1 − α) CE) and `reg` (α m times the element-mean KL)."""

    name = "tfkd"
    summary = ("Tf-KD_reg, teacher-free KD (Yuan et al. 2020): (1 - alpha) CE + alpha m KL(virtual teacher || student), "
               "no teacher")
    Options = TfKDOptions
    term_names = ("ce", "reg")
    teacher_outputs = ()

    def loss_terms(self, batch, training=True):
        logits = self.student(batch["x"], training)["logits"]
        options = self.options
        reg = regularization_loss(batch["y"], logits, options.correct_prob, options.reg_temperature)
        return {"ce": (1.0 - options.reg_alpha) * losses.teacher_loss(batch["y"], logits),
                "reg": options.reg_alpha * options.multiplier * reg}, logits
