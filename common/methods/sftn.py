"""Student-friendly teacher networks, SFTN (Park, Cha, Jeong, Kim & Han, NeurIPS 2021).

Stage 1 trains the teacher together with student branches. Teacher and student
are split into blocks at matching cuts; at cut i the teacher's feature goes
through a transform (Dense + BatchNorm + ReLU here) into fresh copies of the
student's blocks after that cut, giving branch logits z_R,i. With y the labels,
z_T the teacher's logits and τ the branch temperature:

    L_T = λ_T · CE(y, z_T) + λ_CE · Σ_i CE(y, z_R,i) + λ_KL · Σ_i KL(softmax(z_R,i/τ) ‖ softmax(z_T/τ))

Every term's gradient reaches the teacher (that is what makes it student
friendly); the branches are trained beside it and then dropped. Stage 2
distils a fresh student from the stage-1 teacher by KD (`kd`'s loss, at
`--temperature` / `--alpha`); the teacher is cached and reused as any other.
Its run is `sftn-teacher-<stage-1 settings>-s<seed>`, trained on the task's
teacher schedule; `Recipes.sftn_teacher` gives it to any other method
(`task.chain(..., parent=task.sftn_teacher, method="dkd")`).

Sources and choices. No authors' code was found, and the paper (arXiv
2102.07650, §3) is not readable on these machines: the loss is the paper's
as the reading list states it (§3: CE of the teacher, CE of each branch, and
KL of each branch to the teacher). The weights λ_T = 1, λ_CE = 1, λ_KL = 3 and
τ = 1 are the paper's implementation details as recalled here, not checked
against its text: treat them as this toolkit's defaults and vary them with
`--sftn-*` flags. The KL term has no τ² factor (at τ = 1 it makes no difference).
The cuts and blocks of each task are stated in its `student_branches`.
"""

import dataclasses

import tensorflow as tf

from kdtoolkit import losses
from kdtoolkit.methods.base import Method, register
from kdtoolkit.methods.kd import Distillation, KDOptions


def branch_kl(branch_logits, teacher_logits, temperature):
    """Batch mean of KL(softmax(z_R/τ) ‖ softmax(z_T/τ)); gradients reach both."""
    log_branch = tf.nn.log_softmax(tf.cast(branch_logits, tf.float32) / temperature)
    log_teacher = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature)
    return tf.reduce_mean(tf.reduce_sum(tf.exp(log_branch) * (log_branch - log_teacher), axis=-1))


class SFTNTeacher(Method):
    """Stage 1. `cuts`: `x -> {"logits", "cut_1", ..., "cut_n"}` over the teacher's
    layers; `branches[i - 1]`: `cut_i -> (batch, K)` branch logits (the method's
    extra layers: trained, checkpointed, not kept). Logged terms: `ce`,
    `branch_ce` and `branch_kl`, each weighted."""

    term_names = ("ce", "branch_ce", "branch_kl")

    def __init__(self, model, cuts, branches, options):
        super().__init__(model)
        self.cuts, self.branches, self.options = cuts, tuple(branches), options
        self.extra_layers = self.branches

    def loss_terms(self, batch, training=True):
        o = self.options
        outputs = self.cuts(batch["x"], training=training)
        logits = outputs["logits"]
        branch_logits = [branch(outputs[f"cut_{i}"], training=training) for i, branch in enumerate(self.branches, 1)]
        return {
            "ce": o.teacher_weight * losses.teacher_loss(batch["y"], logits),
            "branch_ce": o.branch_ce_weight * tf.add_n([losses.teacher_loss(batch["y"], z) for z in branch_logits]),
            "branch_kl": o.branch_kl_weight * tf.add_n([branch_kl(z, logits, o.branch_temperature)
                                                        for z in branch_logits]),
        }, logits


@dataclasses.dataclass(frozen=True)
class SFTNOptions(KDOptions):
    teacher_weight: float = dataclasses.field(default=1.0, metadata={"help": "lambda_T, weight of the teacher's CE"})
    branch_ce_weight: float = dataclasses.field(default=1.0, metadata={
        "help": "lambda_CE, weight of the student branches' CE"})
    branch_kl_weight: float = dataclasses.field(default=3.0, metadata={
        "help": "lambda_KL, weight of the branches' KL to the teacher"})
    branch_temperature: float = dataclasses.field(default=1.0, metadata={
        "help": "tau, temperature of the branches' KL", "exclusive": True})


@register
class SFTN(Distillation):
    """Stage 2 is KD (its loss terms `ce` and `kd`); `teacher_objective` is stage 1."""

    name = "sftn"
    summary = ("SFTN (Park et al. 2021): a teacher trained with student branches, then KD from it "
               "(--temperature, --alpha)")
    Options = SFTNOptions
    teacher_objective = SFTNTeacher
    teacher_settings = ("teacher_weight", "branch_ce_weight", "branch_kl_weight", "branch_temperature")
