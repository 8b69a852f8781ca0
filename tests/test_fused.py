"""Several runs trained as one (`kdtoolkit.speed.fused`): the looped and the stacked forms."""

from functools import partial

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import data as common_data
from kdtoolkit import losses, methods, training
from kdtoolkit.speed.fused import Fused, Stacked, StackedDense, batched_products, can_stack, fuse, loss_groups
from kdtoolkit.methods.fitnets import FitNets

CELLS = [(1.0, 0.2), (4.0, 0.5), (16.0, 0.9)]
# StackedDense's two ways: one batched matrix product per layer (GPUs), one per member (CPUs).
PRODUCTS = pytest.mark.parametrize("batched", [False, True], ids=["per-member", "batched"])


def mlp(seed, flatten=True):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((3, 2))] + ([keras.layers.Flatten()] if flatten else []) + [
        keras.layers.Dense(8, activation="relu"), keras.layers.Activation("tanh"),
        keras.layers.Dense(5, use_bias=False), keras.layers.Dense(4)]
    return keras.Sequential(layers)


def examples(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 3, 2)).astype(np.float32), "y": rng.integers(0, 4, n).astype(np.int32),
            "teacher_logits": (3 * rng.normal(size=(n, 4))).astype(np.float32)}


def batches(n=96, seed=0):
    return common_data.batched(examples(n, seed), 32, shuffle=True, seed=1)  # the last batch is full: 3 steps


def kd_members(seeds=(0, 0, 0)):
    return [methods.Distillation(mlp(seed), temperature=t, alpha=a) for seed, (t, a) in zip(seeds, CELLS)]


def train(method, epochs=3, jit=False, optimizer=None):
    return training.fit(method, batches(), epochs=epochs, optimizer=optimizer or keras.optimizers.Adam(0.01),
                        jit=jit)


@PRODUCTS
def test_stacked_dense_maps_each_member_as_its_model_and_round_trips_weights(batched):
    models = [mlp(seed) for seed in (0, 1, 2)]
    stacked = StackedDense(models, batched=batched)
    x = np.random.default_rng(5).normal(size=(7, 3, 2)).astype(np.float32)
    outputs = stacked(x).numpy()
    assert outputs.shape == (3, 7, 4)
    for index, model in enumerate(models):
        np.testing.assert_allclose(outputs[index], model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert [v.name for v in stacked.trainable_variables] == [
        "dense0_kernel", "dense0_bias", "dense1_kernel", "dense2_kernel", "dense2_bias"]
    before = [model.get_weights() for model in models]
    for variable in stacked.trainable_variables:
        variable.assign(variable + 1.0)
    stacked.store(models)  # every slice back into its own member
    for model, weights in zip(models, before):
        for a, b in zip(model.get_weights(), weights):
            np.testing.assert_allclose(a, b + 1.0, rtol=1e-6)
    for model in models:  # a frozen layer stays frozen
        model.layers[1].trainable = False
    assert [v.name for v in StackedDense(models).trainable_variables] == ["dense1_kernel", "dense2_kernel",
                                                                           "dense2_bias"]


@pytest.mark.slow
@PRODUCTS
def test_stacked_and_looped_members_train_as_each_would_alone(batched):
    alone = []
    for member in kd_members():
        history = train(member)
        alone.append((member.model.get_weights(), history[-1]["loss"]))
    looped, stacked = Fused(kd_members()), Stacked(kd_members(), batched=batched)
    histories = {"looped": train(looped), "stacked": train(stacked)}
    stacked.sync_members()
    for name, method in (("looped", looped), ("stacked", stacked)):
        for index, (weights, loss) in enumerate(alone):
            member = method.member_history(histories[name], index)
            assert member[-1]["loss"] == pytest.approx(loss, rel=1e-5), name
            for a, b in zip(method.members[index].model.get_weights(), weights):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    # The cells differ (T and alpha reach each member's loss), so the test can fail.
    assert not np.allclose(alone[0][0][0], alone[2][0][0], atol=1e-3)


@pytest.mark.slow
@PRODUCTS
def test_stacked_members_of_several_methods_train_as_each_would_alone(batched):
    def members():  # KD cells in one loss group (not adjacent: gathered), a CE run in its own
        return [methods.Distillation(mlp(0), temperature=1.0, alpha=0.2), methods.CrossEntropy(mlp(1)),
                methods.Distillation(mlp(2), temperature=16.0, alpha=0.9)]

    alone = [member.model.get_weights() for member in members() if train(member)]
    stacked = Stacked(members(), batched=batched)
    assert stacked.groups == [[0, 2], [1]]
    train(stacked)
    stacked.sync_members()
    for member, weights in zip(stacked.members, alone):
        for a, b in zip(member.model.get_weights(), weights):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_each_members_record_is_its_own_loss_and_accuracy_over_the_examples():
    # With lr=0 nothing changes, so every logged number is the exact mean over the 96 examples.
    arrays = examples()
    stacked = Stacked(kd_members(seeds=(0, 1, 2)))
    history = train(stacked, epochs=1, optimizer=keras.optimizers.SGD(0.0))
    for index, (member, (temperature, alpha)) in enumerate(zip(stacked.members, CELLS)):
        record = stacked.member_history(history, index)[0]
        logits = member.model(arrays["x"]).numpy()
        ce = alpha * float(losses.teacher_loss(arrays["y"], logits))
        kd = (1 - alpha) * float(losses.distillation_loss(arrays["teacher_logits"], logits, temperature))
        assert record["ce"] == pytest.approx(ce, rel=1e-5) and record["kd"] == pytest.approx(kd, rel=1e-5)
        assert record["loss"] == pytest.approx(ce + kd, rel=1e-5)
        correct = np.mean(np.argmax(logits, axis=-1) == arrays["y"])
        assert record["train_accuracy"] == pytest.approx(correct, abs=1e-6)


def test_loss_groups_join_runs_of_one_stackable_method_and_signature():
    teacher = mlp(9)
    members = [methods.Distillation(mlp(0), temperature=1.0, alpha=0.2), methods.CrossEntropy(mlp(1)),
               methods.Distillation(mlp(2), temperature=4.0, alpha=0.5), methods.Distillation(mlp(3), temperature=4.0, alpha=0.5, teacher=teacher),
               FitNets(mlp(4), context=methods.Context(4)), FitNets(mlp(5), context=methods.Context(4)),
               methods.CrossEntropy(mlp(6))]
    # A live teacher is part of KD's signature; FitNets' loss does not broadcast over members.
    assert loss_groups(members) == [[0, 2], [1, 6], [3], [4], [5]]


@pytest.mark.slow
@PRODUCTS
def test_a_stacked_xla_step_trains_like_the_plain_one(batched):
    plain, compiled = Stacked(kd_members(), batched=batched), Stacked(kd_members(), batched=batched)
    train(plain), train(compiled, jit=True)
    for a, b in zip(plain.trainable_variables, compiled.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_only_logit_methods_on_one_dense_architecture_are_stacked():
    assert can_stack(kd_members()) and isinstance(fuse(kd_members(), stack=True), Stacked)
    assert type(fuse(kd_members())) is Fused  # stacking is asked for
    assert can_stack([methods.CrossEntropy(mlp(0)), methods.Distillation(mlp(1), temperature=4.0, alpha=0.5)])
    flat = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    assert can_stack([methods.CrossEntropy(flat), methods.CrossEntropy(keras.models.clone_model(flat))])
    wider = keras.Sequential([keras.Input((3, 2)), keras.layers.Flatten(), keras.layers.Dense(9),
                              keras.layers.Dense(4)])
    conv = keras.Sequential([keras.Input((3, 2)), keras.layers.Conv1D(4, 1), keras.layers.Flatten(),
                             keras.layers.Dense(4)])
    late_flatten = keras.Sequential([keras.Input((3, 2)), keras.layers.Dense(4), keras.layers.Flatten(),
                                     keras.layers.Dense(4)])
    refused = [
        [methods.CrossEntropy(mlp(0)), methods.CrossEntropy(wider)],  # two architectures
        [methods.CrossEntropy(conv), methods.CrossEntropy(conv)],
        [methods.CrossEntropy(late_flatten), methods.CrossEntropy(late_flatten)],
        [methods.CrossEntropy(mlp(0, flatten=False)) for _ in range(2)],  # Dense on (batch, 3, 2)
        [methods.CrossEntropy(mlp(0)), FitNets(mlp(1), context=methods.Context(4))],
    ]
    for members in refused:
        assert not can_stack(members) and type(fuse(members, stack=True)) is Fused
    with pytest.raises(ValueError, match="cannot be stacked"):
        Stacked(refused[0])


@PRODUCTS
def test_stacked_weights_follow_the_mixed_precision_policy(batched):
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        models = [mlp(0), mlp(1)]
        stacked = StackedDense(models, batched=batched)
        x = tf.ones((2, 3, 2))
        assert stacked(x).dtype == models[0](x).dtype == tf.bfloat16
        assert all(v.dtype == "float32" for v in stacked.variables)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_stacked_products_are_batched_exactly_when_a_gpu_is_visible():
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert batched_products() is gpu and StackedDense([mlp(0), mlp(1)]).batched is gpu


@pytest.mark.slow
@PRODUCTS
def test_fused_task1_students_match_their_lone_runs(batched):
    # The course's student, cells with alpha 0.8 (whose 1 - alpha rounds differently from a
    # float64 number and a float32 vector); a drift of 6e-3 was seen before alpha went float32.
    from task1_mnist.models import build_student

    cells = [(1.0, 0.2), (16.0, 0.8)]
    rng = np.random.default_rng(0)
    arrays = {"x": rng.random((512, 28, 28, 1), dtype=np.float32), "y": rng.integers(0, 10, 512).astype(np.int32),
              "teacher_logits": (3 * rng.normal(size=(512, 10))).astype(np.float32)}

    def fit(method):
        data = common_data.batched(arrays, 256, shuffle=True, seed=0)
        training.fit(method, data, epochs=2, optimizer=keras.optimizers.Adam(1e-3))

    def students():
        for _ in cells:
            keras.utils.set_random_seed(0)
            yield build_student()

    alone = []
    for student, (temperature, alpha) in zip(students(), cells):
        fit(methods.Distillation(student, temperature=temperature, alpha=alpha))
        alone.append(student.get_weights())
    for form in (Fused, partial(Stacked, batched=batched)):
        fused = form([methods.Distillation(s, temperature=t, alpha=a) for s, (t, a) in zip(students(), cells)])
        fit(fused)
        fused.sync_members()
        tolerance = 1e-5 if batched else 1e-7  # batched products sum in another order
        for member, weights in zip(fused.members, alone):
            for a, b in zip(member.model.get_weights(), weights):
                np.testing.assert_allclose(a, b, rtol=0, atol=tolerance)
