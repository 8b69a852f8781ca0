"""CID, extractive KD and SFTN: each weighted loss term (what a training step
minimises) against an independent float64 NumPy translation (of the authors' code
for CID, Xiang-Deng-DL/CID; of the formulas in the module docstrings for the
other two), CID's dictionary against the reference's sequential running mean, and
the parts of the toolkit each method changes: CID's deployed student, SFTN's own
teacher, resuming both."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import deployed, methods, training
from kdtoolkit import data as common_data
from kdtoolkit.methods import cid, extractive, sftn
from tests.test_reference import (CLASSES, RTOL, context, feature_model, np_cross_entropy, np_kd, np_log_softmax,
                                  student_model)

pytestmark = pytest.mark.usefixtures("exact_float32")


@pytest.fixture
def batch():
    rng = np.random.default_rng(1)
    return {"x": rng.uniform(0, 1, (8, 6, 6, 1)).astype(np.float32),
            "y": np.array([0, 1, 2, 0, 1, 0, 2, 1], np.int32),
            "teacher_logits": rng.normal(0, 2, (8, CLASSES)).astype(np.float32),
            "teacher_embedding": rng.normal(0, 1, (8, 5)).astype(np.float32)}


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_softmax(z):
    return np.exp(np_log_softmax(z))


class Stop(Exception):
    pass


def interrupted_then_resumed(tmp_path, make, arrays):
    """`make() -> (method, models)` trained for 3 epochs: uninterrupted, then stopped after
    epoch 2 and resumed in fresh objects. Asserts both end with the same weights of
    every one of `models`; returns the resumed models."""
    def train(resume_dir, stop_after=None):
        def stop(epoch, _record):
            if epoch == stop_after:
                raise Stop
        method, models = make()
        training.fit(method, common_data.batched(arrays, 16, shuffle=True, seed=3), epochs=3,
                     optimizer=keras.optimizers.Adam(0.01), on_epoch_end=stop, resume_dir=resume_dir)
        return models

    reference = train(None)
    with pytest.raises(Stop):
        train(tmp_path / "resume", stop_after=2)
    resumed = train(tmp_path / "resume")
    for model, twin in zip(resumed, reference):
        for a, b in zip(model.get_weights(), twin.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    return resumed


# -- CID ----------------------------------------------------------------------------------


def np_norm_mse(output, target):  # distiller_zoo/mse_norm.py NORM_MSE
    return np.sum((output - target) ** 2 / (np.linalg.norm(target, axis=1) ** 2)[:, None]) / len(target)


def np_class_term(f_s, f_t, labels, classes):  # helper/loops.py: cluster + Cosine per class with >= 2 rows
    total, involved = 0.0, 0
    for k in range(classes):
        rows = labels == k
        if rows.sum() >= 2:
            s, t = np_normalize(f_s[rows]), np_normalize(f_t[rows])
            total += np.sum((t @ t.T - s @ s.T) ** 2) / rows.sum() ** 2
            involved += 1
    return total / involved if involved else 0.0


def np_dictionary(batches, classes, temperature):  # helper/loops.py: the per-example running mean
    context_new, current = np.zeros((classes, batches[0][0].shape[1])), np.zeros(classes)
    for features, teacher_logits, labels in batches:
        soft = np_softmax(teacher_logits / temperature)
        for i, y in enumerate(labels):
            w = soft[i, y]
            context_new[y] = context_new[y] * (current[y] / (current[y] + w)) + features[i] * (w / (current[y] + w))
            current[y] += w
    return context_new


def make_cid(**options):
    model = student_model()
    opts = methods.make_options("cid", options)
    student = deployed.with_head(model, cid.CID.prediction_head(opts, CLASSES), feature_model)
    method = cid.CID.create(student, opts, dataclasses.replace(context(), features=deployed.student_features(student)))
    method.build_extras({"logits": (None, CLASSES), "embedding": (None, 5)})
    return student, method


def test_cid_terms_match_the_authors_code(batch):
    student, method = make_cid(temperature=2.0, kd_weight=0.7, sample_weight=33.0, class_weight=0.1)
    rng = np.random.default_rng(2)
    dictionary = rng.normal(0, 1, (CLASSES, 8))
    method.intervention.dictionary.assign(dictionary.astype(np.float32))
    method.intervention.active.assign(1.0)
    terms, logits = method.loss_terms(batch)
    out = {k: v.numpy().astype(np.float64) for k, v in deployed.student_features(student)(batch["x"]).items()}
    z_s, f_s, y = out["logits"], out["embedding"], batch["y"]
    z_t, f_t = batch["teacher_logits"].astype(np.float64), batch["teacher_embedding"].astype(np.float64)
    kernel, bias = (w.numpy().astype(np.float64) for w in method.regressor.weights)
    g_kernel, g_bias = (w.numpy().astype(np.float64) for w in method.intervention.head.weights)
    head = np.concatenate([f_s, np_softmax(z_s / 2.0) @ dictionary], axis=1) @ g_kernel + g_bias
    np.testing.assert_allclose(float(terms["kd"]), 0.7 * np_kd(z_s, z_t, 2.0), rtol=RTOL)
    np.testing.assert_allclose(float(terms["ce"]), 0.7 * np_cross_entropy(head, y), rtol=RTOL)
    np.testing.assert_allclose(float(terms["sample"]), 33.0 * np_norm_mse(f_s @ kernel + bias, f_t), rtol=RTOL)
    np.testing.assert_allclose(float(terms["class"]), 0.1 * np_class_term(f_s, f_t, y, CLASSES), rtol=RTOL)
    np.testing.assert_allclose(logits.numpy(), head, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(student(batch["x"]).numpy(), head, rtol=1e-5, atol=1e-6)  # the deployed prediction


def test_cid_class_term_skips_classes_with_one_example():
    features = tf.constant(np.random.default_rng(0).normal(0, 1, (4, 3)), tf.float32)
    teacher = tf.constant(np.random.default_rng(1).normal(0, 1, (4, 5)), tf.float32)
    for labels in ([0, 1, 2, 3], [0, 0, 1, 2], [1, 1, 1, 0]):  # e.g. a batch of 32 with one SSA image
        expected = np_class_term(features.numpy().astype(np.float64), teacher.numpy().astype(np.float64),
                                 np.array(labels), 4)
        assert float(cid.class_similarity_loss(features, teacher, tf.constant(labels))) == pytest.approx(
            expected, rel=1e-5, abs=1e-9)
    assert float(cid.class_similarity_loss(features, teacher, tf.constant([0, 1, 2, 3]))) == 0.0


def test_cid_dictionary_is_the_references_running_mean_and_folds_once(batch):
    student, method = make_cid(temperature=4.0, init_epochs=2, dictionary_momentum=0.25)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    features = deployed.student_features(student)

    def epoch(number):
        method.begin_epoch(number, 4)
        seen = []
        for part in halves:
            method.loss_terms(part)
            f = features(part["x"])["embedding"].numpy().astype(np.float64)
            seen.append((f, part["teacher_logits"].astype(np.float64), part["y"]))
        return seen

    epoch(1)
    assert float(method.dictionary.weights_sum.numpy().sum()) == 0.0  # epoch 1 < init_epochs: nothing yet
    assert float(method.intervention.active.numpy()) == 0.0
    first = np_dictionary(epoch(2), CLASSES, 4.0)
    np.testing.assert_allclose(method.dictionary.means().numpy(), first, rtol=1e-5)
    second = np_dictionary(epoch(3), CLASSES, 4.0)  # epoch 3 folds epoch 2's dictionary in, whole
    np.testing.assert_allclose(method.intervention.dictionary.numpy(), first, rtol=1e-5)
    assert float(method.intervention.active.numpy()) == 1.0
    method.begin_epoch(4, 4)
    np.testing.assert_allclose(method.intervention.dictionary.numpy(), 0.25 * first + 0.75 * second, rtol=1e-5)
    method.begin_epoch(4, 4)  # a second call in the same epoch (a resumed one) does not fold again
    np.testing.assert_allclose(method.intervention.dictionary.numpy(), 0.25 * first + 0.75 * second, rtol=1e-5)


@pytest.mark.slow
def test_cid_student_resumes_with_its_dictionary(tmp_path):
    """Stopped after epoch 2 of 3 and resumed in fresh objects, a CID run ends with the
    weights (head and dictionary included) of an uninterrupted one."""
    rng = np.random.default_rng(0)
    arrays = {"x": rng.uniform(0, 1, (48, 6, 6, 1)).astype(np.float32), "y": np.arange(48, dtype=np.int32) % 3,
              "index": np.arange(48, dtype=np.int32),
              "teacher_logits": rng.normal(0, 2, (48, CLASSES)).astype(np.float32),
              "teacher_embedding": rng.normal(0, 1, (48, 5)).astype(np.float32)}

    def make():
        student, method = make_cid(init_epochs=1)
        return method, [student]

    resumed = interrupted_then_resumed(tmp_path, make, arrays)[0]
    assert float(resumed.get_layer("cid_intervention").active.numpy()) == 1.0
    assert np.abs(resumed.get_layer("cid_intervention").dictionary.numpy()).sum() > 0


@pytest.mark.slow
def test_cid_through_the_keras_distiller_predicts_with_its_head():
    from kdtoolkit.distiller import Distiller

    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (64, 6, 6, 1)).astype(np.float32), np.arange(64) % 3
    distiller = Distiller(student_model(1), student_model(2), "cid", init_epochs=1)
    distiller.compile(optimizer="adam", metrics=["accuracy"])
    history = distiller.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert {"kd", "ce", "sample", "class"} <= set(history.history)
    assert history.history["ce"][0] == 0.0 and history.history["ce"][1] > 0.0  # the head trains from epoch 2
    head = distiller.student.get_layer("cid_intervention")
    assert float(head.active.numpy()) == 1.0
    np.testing.assert_allclose(distiller.predict(x, verbose=0), distiller.student(x).numpy(), rtol=1e-5)


# -- extractive KD ----------------------------------------------------------------------------


def np_extractive(z_s, z_t, labels, t_teacher, t_student, epsilon, alpha):
    p = np_softmax(z_t / t_teacher)
    classes = p.shape[1]
    excess = np.maximum(p - 1.0 / classes, 0.0)
    q = excess / excess.sum(axis=1, keepdims=True)
    q = (1 - epsilon) * q + epsilon / classes
    log_s = np_log_softmax(z_s / t_student)
    kl = np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0) - q * log_s, axis=1)
    return alpha * np_cross_entropy(z_s, labels), (1 - alpha) * t_student**2 * kl.mean()


@pytest.mark.parametrize("t_teacher, t_student, epsilon", [(4.0, 4.0, 0.0), (2.0, 1.0, 0.1), (1.0, 3.0, 0.5)])
def test_extractive_terms_match_the_formula(batch, t_teacher, t_student, epsilon):
    model = student_model()
    method = extractive.ExtractiveKD(model, temperature=t_teacher, student_temperature=t_student, epsilon=epsilon,
                                     alpha=0.3)
    terms, _ = method.loss_terms(batch)
    z_s = model(batch["x"]).numpy().astype(np.float64)
    ce, term = np_extractive(z_s, batch["teacher_logits"].astype(np.float64), batch["y"], t_teacher, t_student,
                             epsilon, 0.3)
    np.testing.assert_allclose(float(terms["ce"]), ce, rtol=RTOL)
    np.testing.assert_allclose(float(terms["extractive"]), term, rtol=RTOL)


def test_extractive_target_on_two_classes_is_the_teachers_smoothed_label():
    logits = tf.constant([[2.0, -1.0], [-0.5, 0.3], [0.0, 0.0]])
    target = extractive.distinctive_target(logits, 4.0, 0.2).numpy()
    np.testing.assert_allclose(target, [[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]], rtol=1e-6)  # a tie: uniform


# -- SFTN ---------------------------------------------------------------------------------------


def sftn_parts(teacher):
    """Cuts after the teacher's "hidden" and "embedding" layers; branches Dense+BN+ReLU then a fresh head."""
    cuts = keras.Model(teacher.inputs[0], {"logits": teacher.outputs[0], "cut_1": teacher.get_layer("hidden").output,
                                           "cut_2": teacher.get_layer("embedding").output})
    branches = [keras.Sequential([keras.Input((width,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                  keras.layers.ReLU(), keras.layers.Dense(CLASSES)]) for width in (36, 8)]
    return cuts, branches


def test_sftn_teacher_terms_match_the_formula(batch):
    teacher = student_model(3)
    options = methods.make_options("sftn", {"teacher_weight": 0.5, "branch_ce_weight": 2.0, "branch_kl_weight": 3.0,
                                            "branch_temperature": 2.0})
    cuts, branches = sftn_parts(teacher)
    method = sftn.SFTNTeacher(teacher, cuts, branches, options)
    assert method.extra_layers == tuple(branches)
    terms, logits = method.loss_terms(batch)
    outputs = cuts(batch["x"], training=True)
    z_t = outputs["logits"].numpy().astype(np.float64)
    z_r = [b(outputs[f"cut_{i}"], training=True).numpy().astype(np.float64) for i, b in enumerate(branches, 1)]
    y = batch["y"]

    def np_kl(z_b):  # KL(softmax(z_R/tau) || softmax(z_T/tau)), batch mean
        log_r, log_t = np_log_softmax(z_b / 2.0), np_log_softmax(z_t / 2.0)
        return np.mean(np.sum(np.exp(log_r) * (log_r - log_t), axis=1))

    np.testing.assert_allclose(float(terms["ce"]), 0.5 * np_cross_entropy(z_t, y), rtol=RTOL)
    np.testing.assert_allclose(float(terms["branch_ce"]), 2.0 * sum(np_cross_entropy(z, y) for z in z_r), rtol=RTOL)
    np.testing.assert_allclose(float(terms["branch_kl"]), 3.0 * sum(np_kl(z) for z in z_r), rtol=RTOL)
    with tf.GradientTape() as tape:
        kl = method.loss_terms(batch)[0]["branch_kl"]
    gradients = tape.gradient(kl, teacher.trainable_variables)
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in gradients[:2])  # it shapes the teacher


def test_sftn_student_distils_by_kd():
    assert issubclass(sftn.SFTN, methods.Distillation) and sftn.SFTN.teacher_objective is sftn.SFTNTeacher
    options = methods.make_options("sftn", {}, {"temperature": 2.0, "alpha": 0.25})
    assert (options.temperature, options.alpha, options.branch_kl_weight) == (2.0, 0.25, 3.0)
    with pytest.raises(ValueError, match="--sftn-branch-temperature must be a number > 0"):
        methods.make_options("sftn", {"branch_temperature": 0.0})


@pytest.mark.slow
def test_sftn_teacher_resumes_with_its_branches(tmp_path):
    """Stopped after epoch 2 of 3 and resumed in fresh objects, the SFTN teacher and its
    branches (the method's extra layers, in the resume state) end as an uninterrupted run's."""
    rng = np.random.default_rng(0)
    arrays = {"x": rng.uniform(0, 1, (48, 6, 6, 1)).astype(np.float32), "y": np.arange(48, dtype=np.int32) % 3}

    def make():
        teacher = student_model(3)
        cuts, branches = sftn_parts(teacher)
        return sftn.SFTNTeacher(teacher, cuts, branches, methods.make_options("sftn", {})), [teacher, *branches]

    interrupted_then_resumed(tmp_path, make, arrays)


def test_the_keras_distiller_refuses_sftn_with_the_way_out():
    from kdtoolkit.distiller import Distiller
    from kdtoolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="trains its own teacher.*SFTNTeacher.*method='kd'"):
        Distiller(student_model(1), student_model(2), "sftn")
