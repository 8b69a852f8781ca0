"""The one training loop and the method classes."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import data as common_data
from kdtoolkit import losses, methods, training
from kdtoolkit.speed import step_sharing
from kdtoolkit.speed.workspaces import Workspaces


def blobs(n=256, seed=0):
    """Two Gaussian blobs in 2-D, linearly separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 2)).astype(np.float32) * 0.5 + np.where(y[:, None] == 1, 2.0, -2.0)
    return {"x": x.astype(np.float32), "y": y.astype(np.int32)}


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])


def test_fit_learns_and_records_history():
    arrays = blobs()
    data = common_data.batched(arrays, 32, shuffle=True, seed=0)
    lines = []
    history = training.fit(
        methods.CrossEntropy(tiny_model()),
        data,
        epochs=3,
        optimizer=keras.optimizers.Adam(0.05),
        evaluate=training.accuracy_on(common_data.batched(blobs(128, seed=1), 64)),
        log=lines.append,
    )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(history[0]) >= {"loss", "ce", "train_accuracy", "test_accuracy", "seconds", "cpu_seconds"}
    # The process's CPU time over each epoch's training: at most every core busy for its wall time.
    assert all(0 < h["cpu_seconds"] <= h["seconds"] * os.cpu_count() + 0.01 for h in history)
    assert history[-1]["test_accuracy"] > 0.95
    assert history[-1]["loss"] < history[0]["loss"]
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3")


def test_history_loss_is_the_mean_over_examples():
    # With lr=0 the model does not change, so the logged loss is the exact data mean.
    arrays = blobs(100)
    model = tiny_model(1)  # right on about half the examples
    history = training.fit(
        methods.CrossEntropy(model), common_data.batched(arrays, 32), epochs=1,
        optimizer=keras.optimizers.SGD(0.0),
    )
    logits = model(arrays["x"]).numpy()
    expected = float(losses.teacher_loss(arrays["y"], logits))
    assert history[0]["loss"] == history[0]["ce"] == pytest.approx(expected, rel=1e-5)
    # Batches of 32, 32, 32 and 4: the mean is over examples, not over batches.
    correct = np.argmax(logits, axis=-1) == arrays["y"]
    assert history[0]["train_accuracy"] == pytest.approx(correct.mean(), abs=1e-6)
    batch_means = [correct[i:i + 32].mean() for i in range(0, 100, 32)]
    assert abs(np.mean(batch_means) - correct.mean()) > 0.05  # a mean over batches would be wrong


def test_distillation_terms_sum_to_student_loss():
    arrays = blobs(16)
    student, teacher = tiny_model(0), tiny_model(1)
    teacher_logits = np.asarray(teacher(arrays["x"]))
    method = methods.Distillation(student, temperature=3.0, alpha=0.3)
    terms, logits = method.loss_terms({**arrays, "teacher_logits": teacher_logits}, training=False)
    expected = losses.student_loss(arrays["y"], logits, teacher_logits, 3.0, 0.3)
    assert set(terms) == {"ce", "kd"}
    assert float(terms["ce"] + terms["kd"]) == pytest.approx(float(expected), rel=1e-6)


def test_cached_teacher_logits_give_the_same_training_as_a_live_teacher():
    arrays = blobs(128)
    teacher = tiny_model(1)
    cached = common_data.teacher_outputs(teacher, arrays, 50)["logits"]
    np.testing.assert_allclose(cached, np.asarray(teacher(arrays["x"])), rtol=1e-5, atol=1e-6)
    teacher_weights = [w.copy() for w in teacher.get_weights()]

    results = []
    for batch_source in ("cached", "live"):
        student = tiny_model(2)
        extra = {"teacher_logits": cached} if batch_source == "cached" else {}
        method = methods.Distillation(student, temperature=2.0, alpha=0.5, teacher=None if extra else teacher)
        training.fit(method, common_data.batched({**arrays, **extra}, 32), epochs=2, optimizer=keras.optimizers.Adam(0.01))
        results.append(student.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for before, after in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(before, after)  # the teacher is never trained


def test_distillation_without_teacher_or_logits_is_an_error():
    method = methods.Distillation(tiny_model(), temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="teacher"):
        method.loss_terms(blobs(4))


@pytest.mark.parametrize("epochs", [0, -2])
def test_bad_epochs(epochs):
    with pytest.raises(ValueError, match="epochs"):
        training.fit(methods.CrossEntropy(tiny_model()), common_data.batched(blobs(8), 4), epochs=epochs, optimizer=keras.optimizers.Adam())


def test_accuracy_and_predict():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert training.accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    arrays = blobs(10)
    model = tiny_model()
    out, labels = training.predict(training.compiled_predictor(model), common_data.batched(arrays, 4))
    np.testing.assert_allclose(out, np.asarray(model(arrays["x"])), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, arrays["y"])


def dropout_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dropout(0.3), keras.layers.Dense(2)])


class Interrupt(Exception):
    pass


def test_an_interrupted_fit_resumes_where_it_stopped(tmp_path):
    """Stopped after epoch 2 of 4, then resumed in a fresh model and optimizer, the
    run ends with the weights and history of an uninterrupted one (same shuffles,
    same dropout masks, same Adam moments)."""
    arrays = blobs(96)

    def train(resume_dir, stop_after=None):
        def stop(epoch, _record):
            if epoch == stop_after:
                raise Interrupt
        model = dropout_model()
        data = common_data.batched(arrays, 16, shuffle=True, seed=3)
        history = training.fit(methods.CrossEntropy(model), data, epochs=4, optimizer=keras.optimizers.Adam(0.05),
                               on_epoch_end=stop, resume_dir=resume_dir)
        return model, history

    reference, reference_history = train(None)
    with pytest.raises(Interrupt):
        train(tmp_path / "resume", stop_after=2)
    assert [p.name for p in (tmp_path / "resume").iterdir()] == ["state.npz"]
    resumed, history = train(tmp_path / "resume")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference_history], rel=1e-6)
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_step_traces_once_with_a_partial_last_batch():
    data = common_data.batched(blobs(100), 32)  # batches of 32, 32, 32, 4
    counts = []
    for spec in (None, data.element_spec):
        step, _ = training.make_train_step(methods.CrossEntropy(tiny_model()), keras.optimizers.Adam(), element_spec=spec)
        for batch in data:
            step(batch)
        counts.append(step.experimental_get_tracing_count())
    assert counts == [2, 1]


def test_a_non_finite_loss_stops_training_and_saves_nothing(tmp_path):
    model = tiny_model()
    with pytest.raises(training.TrainingDiverged, match=r"loss is (nan|inf) in epoch \d/3.*lower the learning rate \(now 1e\+30\)"):
        training.fit(methods.CrossEntropy(model), common_data.batched(blobs(64), 8), epochs=3,
                     optimizer=keras.optimizers.SGD(1e30), resume_dir=tmp_path / "resume")
    assert not (tmp_path / "resume" / "state.npz").exists()


def test_epoch_state_is_saved_after_on_epoch_end(tmp_path):
    """A kill inside `on_epoch_end` (say, while writing the epoch's checkpoint) must
    not leave a resume state that skips that epoch's checkpoint for good."""
    arrays = blobs(64)
    seen = []

    def checkpoint(epoch, _record):
        seen.append(epoch)
        if epoch == 2 and len(seen) == 2:
            raise Interrupt  # killed while writing epoch 2's checkpoint

    def train():
        return training.fit(methods.CrossEntropy(dropout_model()), common_data.batched(arrays, 16, shuffle=True, seed=1),
                            epochs=3, optimizer=keras.optimizers.Adam(0.05), on_epoch_end=checkpoint,
                            resume_dir=tmp_path / "resume")

    with pytest.raises(Interrupt):
        train()
    history = train()
    assert seen == [1, 2, 2, 3]  # epoch 2 runs again, and its checkpoint is written
    assert [h.get("resumed", False) for h in history] == [True, False, False]


def test_resume_state_is_keyed_by_structure_not_by_keras_auto_names(tmp_path):
    from kdtoolkit.checkpoint import EpochCheckpoint, variable_keys

    def state(model):
        optimizer = keras.optimizers.Adam()
        optimizer.build(model.trainable_variables)
        return EpochCheckpoint(tmp_path, model, optimizer, model.trainable_variables)

    first = dropout_model(seed=0)
    checkpoint = state(first)
    for variable in checkpoint.variables.values():
        variable.assign(variable + 1.0)
    checkpoint.save([{"epoch": 1}])  # written in the background, of the values at this call
    saved = {key: np.array(variable) for key, variable in checkpoint.variables.items()}
    for variable in checkpoint.variables.values():
        variable.assign(variable * 0.0 + 7.0)  # training goes on while the file is written
    checkpoint.wait()
    tiny_model(), dropout_model()  # later models get other Keras names ("dense_7", "seed_generator_3")
    second = dropout_model(seed=5)
    assert [v.path for v in second.variables] != [v.path for v in first.variables]
    assert sorted(variable_keys(second).values()) == sorted(variable_keys(first).values())
    restored = state(second)
    assert restored.load() == [{"epoch": 1}]
    for key, variable in restored.variables.items():
        np.testing.assert_array_equal(np.asarray(variable), saved[key])
    assert "1.Dense/kernel" in restored.variables and "optimizer/1.Dense/kernel/momentum" in restored.variables

    messages = []
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    assert state(other).load(messages.append) == []  # another architecture: never loaded, not even in part
    assert "does not fit this model" in messages[0]


@pytest.mark.parametrize("steps_per_call", [3, 8])
def test_several_steps_per_call_give_the_same_updates(steps_per_call):
    """10 batches (the last partial) per epoch, in calls of 3 or 8 steps: the same
    weights and history as one step per call."""
    arrays = blobs(150)

    def train(steps):
        model = tiny_model()
        history = training.fit(methods.CrossEntropy(model), common_data.batched(arrays, 16, shuffle=True, seed=3),
                               epochs=2, optimizer=keras.optimizers.Adam(0.01), steps_per_call=steps)
        return model.get_weights(), history

    single, single_history = train(1)
    several, several_history = train(steps_per_call)
    for a, b in zip(single, several):
        np.testing.assert_array_equal(a, b)
    assert [h["loss"] for h in several_history] == [h["loss"] for h in single_history]


@pytest.mark.slow
def test_an_xla_compiled_step_trains_like_the_plain_one():
    arrays = blobs(120)  # 3 full batches and a partial one, which takes the step without XLA

    def train(jit):
        model = tiny_model()
        training.fit(methods.CrossEntropy(model), common_data.batched(arrays, 32), epochs=2,
                     optimizer=keras.optimizers.Adam(0.01), jit=jit)
        return model.get_weights()

    for a, b in zip(train(False), train(True)):  # XLA may fuse and reorder float operations
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_and_resumes(precision, tmp_path):
    """16-bit compute, float32 variables and losses; float16 scales its loss (Keras'
    LossScaleOptimizer), whose state the epoch checkpoint keeps too."""
    from kdtoolkit import device

    device.configure(precision=precision)
    try:
        arrays = blobs(128)

        def train(resume_dir, log=None, spaces=None):
            model = tiny_model()
            optimizer = device.optimizer(keras.optimizers.Adam(0.01))
            history = training.fit(methods.CrossEntropy(model), common_data.batched(arrays, 32, shuffle=True, seed=1),
                                   epochs=3, optimizer=optimizer, resume_dir=resume_dir, log=log,
                                   evaluate=training.accuracy_on(common_data.batched(arrays, 64)), workspaces=spaces)
            return model, optimizer, history

        def killed_after_epoch_2(line):
            if line.startswith("epoch 2/3"):
                raise KeyboardInterrupt

        model, optimizer, history = train(None)
        assert model.layers[0].compute_dtype == precision.split("_")[1] and model.layers[0].kernel.dtype == "float32"
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
        assert history[-1]["test_accuracy"] > 0.95 and np.isfinite(history[-1]["loss"])
        # Killed and resumed in one shared workspace (kdtoolkit.speed.workspaces), whose loss
        # scale state is copied like Adam's: the weights of the run without either.
        spaces = Workspaces()
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "resume", killed_after_epoch_2, spaces)
        resumed_model, resumed_optimizer, resumed = train(tmp_path / "resume", spaces=spaces)
        assert [h.get("resumed", False) for h in resumed] == [True, True, False] and len(spaces) == 1
        for a, b in zip(model.get_weights(), resumed_model.get_weights()):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(optimizer.variables, resumed_optimizer.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    finally:
        device.configure()  # float32 again for the tests that follow


def test_only_full_batches_take_the_xla_step():
    calls = []
    step = training.FullBatchesCompiled(lambda b: calls.append("xla"), lambda b: calls.append("plain"))
    for size in (32, 32, 24, 32, 24):
        step({"y": tf.zeros((size,))})
    assert calls == ["xla", "xla", "plain", "xla", "plain"]


def test_auto_jit_is_on_with_a_gpu_unless_deterministic(monkeypatch):
    # Seen on an H100: a deterministic XLA step fails (no deterministic MaxPool gradient).
    from kdtoolkit import device

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    monkeypatch.setitem(device._state, "deterministic", False)
    assert device.use_jit("auto") and device.use_jit("on") and not device.use_jit("off")
    monkeypatch.setitem(device._state, "deterministic", True)
    assert not device.use_jit("auto") and device.use_jit("on")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setitem(device._state, "deterministic", False)
    assert not device.use_jit("auto")


def test_xla_flag_is_added_unless_the_user_set_it(monkeypatch):
    from kdtoolkit import device

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    device.use_xla_flag(device.TRITON_GEMM_OFF)
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=2 --xla_gpu_enable_triton_gemm=true")
    device.use_xla_flag(device.TRITON_GEMM_OFF)
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=2 --xla_gpu_enable_triton_gemm=true"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=2")
    device.use_xla_flag(device.TRITON_GEMM_OFF)
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=2 --xla_gpu_enable_triton_gemm=false"


@pytest.mark.slow
def test_runs_sharing_a_workspace_train_as_alone():
    # Three KD students (different seeds, T and alpha; a Dropout layer's RNG state and
    # an odd last batch included) trained one after another in one workspace get the
    # weights, histories and optimizer states they get alone, from one traced step.
    arrays = blobs(100)
    arrays["teacher_logits"] = np.random.default_rng(3).normal(size=(100, 2)).astype(np.float32)

    def student(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="relu"),
                                 keras.layers.Dropout(0.3), keras.layers.Dense(2)])

    def train(seed, temperature, alpha, spaces):
        model = student(seed)
        optimizer = keras.optimizers.Adam(0.01 * (seed + 1))
        data = common_data.batched(arrays, 32, shuffle=True, seed=seed)
        history = training.fit(methods.Distillation(model, temperature=temperature, alpha=alpha), data, epochs=2, optimizer=optimizer,
                               evaluate=training.accuracy_on(common_data.batched(blobs(64, seed=1), 64)),
                               workspaces=spaces)
        return model, optimizer, history

    settings = [(0, 4.0, 0.5), (1, 1.0, 0.2), (2, 8.0, 0.9)]
    spaces = Workspaces()
    shared = [train(*s, spaces) for s in settings]
    assert len(spaces) == 1
    (space,) = spaces._spaces.values()
    assert space.step.experimental_get_tracing_count() == 1
    for (model, optimizer, history), s in zip(shared, settings):
        alone_model, alone_optimizer, alone_history = train(*s, None)
        for a, b in zip(model.variables, alone_model.variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        for a, b in zip(optimizer.variables, alone_optimizer.variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        for a, b in zip(history, alone_history):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["test_accuracy"] == b["test_accuracy"]
    assert shared[0][0].variables[0] is not shared[1][0].variables[0]  # each run keeps its own model


@pytest.mark.slow
def test_workspace_is_not_shared_across_structures_or_unsigned_methods():
    from kdtoolkit.speed.workspaces import structure

    class Unsigned(methods.CrossEntropy):  # a subclass may change the loss: shared only once in step_sharing
        pass

    spaces = Workspaces()
    data = common_data.batched(blobs(64), 32)
    wide = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16), keras.layers.Dense(2)])
    for method in (methods.CrossEntropy(tiny_model()), methods.CrossEntropy(wide), Unsigned(tiny_model()),
                   methods.Distillation(tiny_model(), temperature=4.0, alpha=0.5, teacher=tiny_model(1)),
                   methods.CrossEntropy(tiny_model(2))):
        training.fit(method, data, epochs=1, optimizer=keras.optimizers.Adam(0.01), workspaces=spaces)
    assert len(spaces) == 3  # the narrow and wide cross-entropy models, KD with a live teacher
    assert structure(tiny_model(0)) == structure(tiny_model(1))  # names and values do not matter
    assert structure(tiny_model(0)) != structure(wide)


@pytest.mark.slow
def test_a_run_killed_in_a_workspace_resumes_without_one(tmp_path):
    # The resume state is keyed by each variable's place in the model, so a run begun
    # with shared steps continues under --no-share-steps (and the other way round).
    arrays = blobs(128)

    def train(resume_dir, spaces=None, log=None):
        model = tiny_model()
        training.fit(methods.Distillation(model, temperature=2.0, alpha=0.5), common_data.batched(
            {**arrays, "teacher_logits": np.asarray(tiny_model(1)(arrays["x"]))}, 32, shuffle=True, seed=1),
            epochs=3, optimizer=keras.optimizers.Adam(0.01), resume_dir=resume_dir, log=log, workspaces=spaces)
        return model

    def killed_after_epoch_2(line):
        if line.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    expected = train(None)
    for first, second in ((Workspaces(), None), (None, Workspaces())):
        folder = tmp_path / ("shared-first" if first is not None else "shared-second")
        with pytest.raises(KeyboardInterrupt):
            train(folder, first, killed_after_epoch_2)
        for a, b in zip(expected.get_weights(), train(folder, second).get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_shared_predictor_gives_each_model_its_own_logits():
    # Final evaluations of runs of one structure use one traced predictor, fed each
    # run's weights; a method that cannot share gets a predictor of its own.
    spaces, strategy = Workspaces(), tf.distribute.get_strategy()
    x = blobs(16)["x"]
    models = [tiny_model(seed) for seed in (0, 1, 2)]
    predictors = []
    for model in models:
        predictor = spaces.predictor(methods.CrossEntropy(model), strategy)
        np.testing.assert_allclose(predictor(x).numpy(), model(x).numpy(), rtol=1e-6)
        predictors.append(predictor)
    assert predictors[0] is predictors[1] is predictors[2] and len(spaces) == 1
    assert predictors[0].experimental_get_tracing_count() == 1

    class Unsigned(methods.CrossEntropy):  # a subclass may change the loss: shared only once in step_sharing
        pass

    assert spaces.predictor(Unsigned(models[0]), strategy) is not predictors[0] and len(spaces) == 1
    # After a run of that structure trained in a workspace, its predictor serves instead.
    trained = tiny_model(3)
    training.fit(methods.CrossEntropy(trained), common_data.batched(blobs(64), 32), epochs=1,
                 optimizer=keras.optimizers.Adam(0.01), workspaces=spaces)
    assert len(spaces) == 2
    (space,) = [s for s in spaces._spaces.values() if not isinstance(s, tuple)]
    for model in (trained, models[1]):
        predictor = spaces.predictor(methods.CrossEntropy(model), strategy)
        assert predictor is space.predictor and len(spaces) == 2
        np.testing.assert_allclose(predictor(x).numpy(), model(x).numpy(), rtol=1e-6)


def test_kd_weights_are_the_same_for_a_number_and_a_variable():
    # 1 - 0.8 is 0.2 rounded once from a float64 number, but 0.19999999 from a float32 0.8:
    # every path takes the float32 one, so a lone run and a shared step agree (fused cells'
    # vector: test_fused.py::test_fused_task1_students_match_their_lone_runs).
    arrays = blobs(16)
    batch = {**arrays, "teacher_logits": np.asarray(tiny_model(1)(arrays["x"]))}
    student = tiny_model(0)
    number = methods.Distillation(student, temperature=3.0, alpha=0.8)
    variable = step_sharing.rebind(number, student)  # T and alpha as float32 variables (kdtoolkit.speed.workspaces)
    terms = [method.loss_terms(batch, training=False)[0] for method in (number, variable)]
    for name in ("ce", "kd"):
        assert float(terms[0][name]) == float(terms[1][name]), name


def test_every_pipeline_runs_without_tf_data_autotuning(tmp_path):
    """tf.data's autotuner made finished iterators wait out its doubling sleeps (epochs
    rounded up to 2.55, 10.24, 20.47 s ... on these machines; `kdtoolkit.data.untuned`):
    the training, held-out, image-decoding and Distiller pipelines all turn it off, and
    the batches are those of the tuned pipeline."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import make_mhist
    from kdtoolkit import fit_data
    from task2_mhist import data as mhist

    arrays = {"x": np.arange(10, dtype=np.float32), "y": np.arange(10) % 2}
    dataset = common_data.batched(arrays, 4, shuffle=True, seed=3, map_fn=lambda b: {**b, "x": b["x"] * 2})
    tuned = tf.data.Dataset.from_tensor_slices(arrays).shuffle(10, seed=3, reshuffle_each_iteration=True).batch(4)
    assert [b["x"].numpy().tolist() for b in dataset] == [(b["x"] * 2).numpy().tolist() for b in tuned]
    split = mhist.load_mhist(make_mhist(tmp_path / "mhist"))["train"]
    pipelines = [dataset, mhist.dataset(split, 32, 8, shuffle=True, augment=True)]
    epoch = tf.Variable(0, dtype=tf.int64)
    pipelines.append(fit_data.array_batches(arrays, 4, epoch))
    pipelines.append(fit_data.shuffled_stream(tf.data.Dataset.from_tensor_slices(arrays), 4, epoch))
    assert all(p.options().autotune.enabled is False for p in pipelines)
    assert mhist.decoded(split, 32).shape == (len(split), 32, 32, 3)
