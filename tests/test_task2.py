"""Task 2 end to end at a tiny image size on a synthetic MHIST folder."""

import csv
import json

import keras
import numpy as np
import pytest

from task2_mhist import models
from task2_mhist import run as cli
from task2_mhist.config import COURSE, EXPERIMENTS, STUDIES, Task2Config
from task2_mhist.experiments import Task2, run_all


@pytest.mark.parametrize("mode, reference", [("tf", keras.applications.resnet_v2.preprocess_input),
                                             ("torch", keras.applications.densenet.preprocess_input)])
def test_in_model_preprocessing_matches_keras_applications(mode, reference):
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    x = pixels
    for layer in models.preprocessing(mode):
        x = layer(x)
    np.testing.assert_allclose(np.asarray(x), reference(pixels.copy()), rtol=1e-5, atol=1e-5)


METHOD_STEMS = ["dkd-T4-tw1-nw8-w0.0833333", "fitnets-w100", "at-w1000", "rkd-dw25-aw50", "crd-w0.8-t0.07-d128-n4096",
                "ls-e0.1", "cid-T4-kw1-sw33-cw0.1-ie1-dm0", "extractive-T4-st4-e0-a0.5",
                "sftn-T4-a0.5-tw1-bcw1-bkw3-bt1", "dist-T4-b1-g1-w2", "nst-w50", "pkt-w30000", "sp-w3000",
                "tfkd-cp0.99-rt40-ra0.95-m1", "vid-w1-ipv5"]
SFTN_STEM = METHOD_STEMS[8]
FEATURE_STEMS = [*METHOD_STEMS[1:5], METHOD_STEMS[6], *METHOD_STEMS[10:13], METHOD_STEMS[14]]  # read student features
OWN_TEACHERS = ["sftn-teacher-tw1-bcw1-bkw3-bt1"]  # trained by a method for itself


def tiny_config(tmp_path, data_dir, **overrides):
    settings = dict(data_dir=str(data_dir), out=str(tmp_path / "out"), weights="none", image_size=32, batch_size=8,
                    fe_epochs=1, ft_epochs=1, temperatures=(1.0, 4.0), explain_images=2, lime_samples=40,
                    occlusion_patch=16, occlusion_stride=16, quiet=True)
    settings.update(overrides)
    return Task2Config(**settings)


@pytest.mark.slow
def test_every_experiment_end_to_end_then_resume(tmp_path, mhist_dir, tiny_architectures):
    config = tiny_config(tmp_path, mhist_dir)
    results = run_all(config)[0]
    out = tmp_path / "out"
    stems = ["teacher", "kd-T4-a0.5", "kd-T1-a0.5", "scratch", "skd-teacher-S2", "skd-S2-T4-a0.5",
             "ta-T4-a0.5", "ta-takd-T4-a0.5", *METHOD_STEMS, *OWN_TEACHERS]
    expected = {f"{stem}-{phase}-s0" for stem in stems for phase in ("fe", "ft")}
    assert {p.parent.name for p in out.glob("*/metrics.json")} == expected
    for name in expected:
        record = json.loads((out / name / "metrics.json").read_text())
        for key in ("test_auc", "test_accuracy", "test_f1", "val_auc", "val_accuracy", "val_f1"):
            assert 0.0 <= record[key] <= 1.0
        assert np.array(record["confusion_matrix"]).sum() == 12
        assert record["roc_curve"]["tpr"][-1] == 1.0
        assert record["identity"]["phase"] in ("feature-extraction", "finetune")
        assert "test_auc" in record["history"][0]
        assert record["peak_rss_mib"] > 0
    ft = json.loads((out / "teacher-ft-s0" / "metrics.json").read_text())
    assert ft["identity"]["learning_rate"] == pytest.approx(1e-5)  # teacher 1e-4 / 10
    assert np.load(out / "teacher-ft-s0" / "train_logits-8views.npz")["logits"].shape == (20, 8, 2)
    assert np.load(out / "skd-teacher-S2-ft-s0" / "train_logits-8views.npz")["logits"].shape == (20, 8, 4)
    # feature methods cache what they read of the teacher per view: attention maps, embeddings
    assert np.load(out / "teacher-ft-s0" / "train_attention-8views.npz")["attention"].shape == (20, 8, 15, 15)
    assert np.load(out / "teacher-ft-s0" / "train_embedding-8views.npz")["embedding"].shape == (20, 8, 4)
    for stem in METHOD_STEMS:  # a feature method's feature-extraction phase trains the head by cross-entropy
        fe = json.loads((out / f"{stem}-fe-s0" / "metrics.json").read_text())
        ft = json.loads((out / f"{stem}-ft-s0" / "metrics.json").read_text())
        reads_features = stem in FEATURE_STEMS
        assert ("ls_ce" if stem.startswith("ls") else "ce") in fe["history"][0]
        assert (len(ft["history"][0]) > len(fe["history"][0])) == reads_features
    sftn_teacher = [json.loads((out / f"{OWN_TEACHERS[0]}-{phase}-s0" / "metrics.json").read_text())
                    for phase in ("fe", "ft")]
    assert "branch_kl" not in sftn_teacher[0]["history"][0]  # the frozen base's phase: the head by CE
    assert {"ce", "branch_ce", "branch_kl"} <= set(sftn_teacher[1]["history"][0])
    sftn_student = json.loads((out / f"{SFTN_STEM}-ft-s0" / "metrics.json").read_text())
    assert sftn_student["distilled_from"] == f"{OWN_TEACHERS[0]}-ft-s0"
    cid_student = json.loads((out / f"{METHOD_STEMS[6]}-ft-s0" / "metrics.json").read_text())
    assert cid_student["params"] > json.loads((out / "scratch-ft-s0" / "metrics.json").read_text())["params"]
    export = list(csv.DictReader(open(out / "export-s0.csv")))
    assert {r["model"] for r in export} == {"teacher", "scratch", "kd", *(s.split("-")[0] for s in METHOD_STEMS)}
    assert {r["variant"] for r in export} == {"float32", "dynamic_int8", "int8"}
    assert [r["temperature"] for r in results["tcurve"]] == [1.0, 4.0]
    assert json.loads((out / "tcurve-s0.json").read_text())["chosen_by"] == "val_auc"
    assert record["identity"]["validation_examples"] == 4  # 15% of 24, stratified: 3 HP + 1 SSA
    assert {r["weights"] for r in results["pretrained"]} == {"none"}
    assert [r["model"] for r in results["takd"]][-1] == "student from teacher (BLKD)"
    flops = list(csv.DictReader(open(out / "flops.csv")))
    assert [int(r["params"]) > 0 for r in flops] == [True, True, True]
    for kind in ("lime", "occlusion"):
        assert (out / "explain" / f"{kind}-s0.npz").exists()
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert [t["experiment"] for t in timings] == [e for e in Task2.experiments if e in COURSE]  # run order
    assert sorted(Task2.experiments) == sorted(EXPERIMENTS) and tuple(Task2.studies) == STUDIES
    assert all(t["seconds"] > 0 and t["peak_rss_mib"] > 0 for t in timings)

    messages = []
    run_all(config, log=messages.append)
    assert not any("epoch 1/" in m for m in messages)
    assert not any("logits on the training set" in m for m in messages)


def fe_head_weights(out):
    model = models.build(models.TEACHER, "none", 32)
    model.load_weights(out / "teacher-fe-s0" / "model.weights.h5")
    return model.get_layer("logits").get_weights()


@pytest.mark.slow
def test_feature_extraction_on_cached_features_equals_training_on_images(tmp_path, mhist_dir, tiny_architectures):
    """Same examples, views, dropout and updates: only the frozen base's work is saved."""
    settings = dict(phase="feature-extraction", only=("teacher",), fe_epochs=2)
    messages = []
    run_all(tiny_config(tmp_path / "cached", mhist_dir, feature_cache="on", **settings), log=messages.append)
    run_all(tiny_config(tmp_path / "direct", mhist_dir, feature_cache="off", **settings))
    for a, b in zip(fe_head_weights(tmp_path / "cached" / "out"), fe_head_weights(tmp_path / "direct" / "out")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert sum("base features on the training set" in m for m in messages) == 8  # one pass per view
    assert len(list((tmp_path / "cached" / "out" / "cache").glob("features-*.npz"))) == 1
    assert not (tmp_path / "direct" / "out" / "cache").exists()


@pytest.mark.slow
def test_students_from_one_base_share_its_features(tmp_path, mhist_dir, tiny_architectures):
    messages = []
    config = tiny_config(tmp_path, mhist_dir, phase="feature-extraction", only=("kd", "scratch"), feature_cache="on")
    run_all(config, log=messages.append)
    computed = [m for m in messages if "base features on the training set, view 1/" in m]
    assert len(computed) == 2  # the teacher's base, then one student base for kd and scratch
    auto = lambda **o: Task2(tiny_config(tmp_path, mhist_dir, feature_cache="auto", **o)).caches_features()  # noqa: E731
    assert (auto(fe_epochs=1), auto(fe_epochs=8), auto(fe_epochs=1, augment=False)) == (False, True, True)


@pytest.mark.slow
def test_feature_extraction_phase_only_then_finetune_resumes(tmp_path, mhist_dir):
    config = tiny_config(tmp_path, mhist_dir, phase="feature-extraction", only=("teacher",))
    run_all(config)
    assert {p.parent.name for p in (tmp_path / "out").glob("*/metrics.json")} == {"teacher-fe-s0"}
    messages = []
    run_all(tiny_config(tmp_path, mhist_dir, phase="finetune", only=("teacher",)), log=messages.append)
    assert any("[teacher-fe-s0] finished earlier" in m for m in messages)
    assert (tmp_path / "out" / "teacher-ft-s0" / "metrics.json").exists()


def test_cli_errors(tmp_path, mhist_dir, capsys):
    assert cli.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["--data-dir", str(mhist_dir), "--image-size", "16", "-q"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert cli.main(["--data-dir", str(mhist_dir), "--alpha", "-1", "-q"]) == 2
    assert "alpha" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_alone_equals_the_same_run_after_others(tmp_path, mhist_dir, tiny_architectures):
    from tests.test_task1 import disturb_random_state

    disturb_random_state(123)
    alone = run_all(tiny_config(tmp_path / "alone", mhist_dir, only=("scratch",)))[0]["scratch"]
    disturb_random_state(7)
    after = run_all(tiny_config(tmp_path / "after", mhist_dir, only=("teacher", "kd", "scratch")))[0]["scratch"]
    assert [h["loss"] for h in alone["history"]] == [h["loss"] for h in after["history"]]
    assert (alone["test_auc"], alone["test_accuracy"]) == (after["test_auc"], after["test_accuracy"])


@pytest.mark.slow
def test_every_experiment_end_to_end_with_a_pretrained_weights_folder(tmp_path, mhist_dir, tiny_architectures):
    """The default path: pretrained bases (here a --weights folder of Keras-named files
    with random values), every experiment in one invocation, then a report."""
    from tests.conftest import write_keras_weights

    from reports.make_report import make_report

    weights = tmp_path / "weights"
    write_keras_weights(weights, models.ARCHITECTURES, 32)
    out = tmp_path / "results" / "task2"
    config = tiny_config(tmp_path, mhist_dir, weights=str(weights), out=str(out))
    results = run_all(config)[0]
    stems = ["teacher", "kd-T4-a0.5", "kd-T1-a0.5", "scratch", "skd-teacher-S2", "skd-S2-T4-a0.5",
             "ta-T4-a0.5", "ta-takd-T4-a0.5", "teacher-init_none", "scratch-init_none", *METHOD_STEMS, *OWN_TEACHERS]
    assert {p.parent.name for p in out.glob("*/metrics.json")} == {
        f"{stem}-{phase}-s0" for stem in stems for phase in ("fe", "ft")}
    assert {r["weights"] for r in results["pretrained"]} == {"file", "none"}
    teacher = json.loads((out / "teacher-ft-s0" / "metrics.json").read_text())
    assert teacher["identity"]["weights"] == str(weights) and teacher["params"] > 0 and teacher["flops"] > 0
    assert isinstance(models.build(models.TEACHER, str(weights), 32).get_layer(models.BASE_NAME), models.InferenceMode)
    assert teacher["data"]["synthetic"] and teacher["data"]["validation"] == 4
    make_report(tmp_path / "results", tmp_path / "report")
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "## Task 2: MHIST — SYNTHETIC images" in text
    assert f"weights {weights} / none" in text  # the table holds pretrained and random-init rows
    assert "epochs feature-extraction 1, finetune 1" in text and "image px 32" in text


@pytest.mark.slow
def test_cli_with_a_real_mobilenetv2_weights_folder(tmp_path, mhist_dir, capsys):
    """The issue's command: a real MobileNetV2 no-top file, `--only scratch`, finishes."""
    from tests.conftest import write_keras_weights

    write_keras_weights(tmp_path / "w", (models.STUDENT,), 32)
    argv = ["--data-dir", str(mhist_dir), "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "w"),
            "--image-size", "32", "--batch-size", "8", "--fe-epochs", "1", "--ft-epochs", "1", "--only", "scratch", "-q"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "o" / "scratch-ft-s0" / "metrics.json").read_text())
    assert record["params"] == models.build(models.STUDENT, "none", 32).count_params() and record["flops"] > 0


@pytest.mark.slow
def test_only_the_last_few_trained_models_stay_in_memory(tmp_path, mhist_dir, tiny_architectures):
    task = Task2(tiny_config(tmp_path, mhist_dir, only=("teacher", "kd", "scratch", "lime")))
    task.run()
    assert len(task.models.in_memory()) <= task.kept_models
    assert "teacher-fe-s0" not in task.models.in_memory()
    reloaded = task.model_of("teacher-fe-s0")  # dropped, then rebuilt from its saved weights
    saved = models.build(models.TEACHER, "none", 32)
    saved.load_weights(tmp_path / "out" / "teacher-fe-s0" / "model.weights.h5")
    for a, b in zip(reloaded.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pretrained", [True, False])
def test_two_builds_of_a_model_share_compiled_steps(tmp_path, tiny_architectures, pretrained):
    # The default path wraps a pretrained base (InferenceMode), whose config embeds the
    # base's own with Keras' per-process layer names: those must not tell builds apart.
    from tests.conftest import write_keras_weights

    from kdtoolkit.speed.workspaces import structure

    weights = "none"
    if pretrained:
        weights = str(tmp_path / "weights")
        write_keras_weights(tmp_path / "weights", [models.STUDENT], 32)
    first, second = (models.build(models.STUDENT, weights, 32) for _ in range(2))
    assert structure(first) == structure(second)
    assert structure(first) != structure(models.build(models.STUDENT, weights, 32, num_outputs=4))


@pytest.mark.slow
def test_data_efficiency_streams_the_chosen_examples(tmp_path, mhist_dir, tiny_architectures, monkeypatch):
    """Task 2's transfer subsets: each run streams N examples of each class, repeated to
    the training set's size, through both phases (feature extraction on cached
    features), the images and cached arrays read by index, not copied."""
    from task2_mhist import data as mhist

    streamed = []  # (examples streamed, their distinct indices) of each shuffled training dataset
    original = mhist.dataset
    monkeypatch.setattr(mhist, "dataset", lambda split, *a, examples=None, **k: (
        k.get("shuffle") and streamed.append(np.arange(len(split)) if examples is None else np.asarray(examples)),
        original(split, *a, examples=examples, **k))[1])
    config = tiny_config(tmp_path, mhist_dir, only=("efficiency",), per_class=(2,), feature_cache="on")
    rows = run_all(config)[0]["efficiency"]
    task = Task2(config)
    labels, n = task.train_labels(), len(task.train_labels())
    assert [(r["per_class"], r["method"], r["selection"]) for r in rows] == [
        (2, "kd", "random"), (2, "kd", "entropy"), (2, "scratch", "random")]
    assert all(0 <= r["test_auc"] <= 1 and r["examples"] == 4 for r in rows)
    # The teacher's phases (and BatchNorm re-estimation) stream every example, then each
    # student's phases its subset: 2 of each class, repeated to the training set's size.
    distinct = [len(np.unique(s)) for s in streamed]
    teacher = distinct.index(4)
    assert teacher >= 2 and distinct == [n] * teacher + [4] * (len(streamed) - teacher)
    assert all(len(s) == n for s in streamed) and len(streamed) - teacher >= 6  # three students, two phases
    for chosen in streamed[teacher:]:
        assert np.bincount(labels[np.unique(chosen)], minlength=2).tolist() == [2, 2]
    assert streamed[teacher].tolist() == streamed[teacher + 1].tolist()  # both phases, the same examples
    assert set(streamed[teacher]) == set(streamed[-1])  # the scratch student's are KD's random ones
    out = tmp_path / "out"
    record = json.loads((out / "efficiency-n2-entropy-T4-a0.5-ft-s0" / "metrics.json").read_text())
    assert record["identity"]["per_class"] == 2 and record["identity"]["selection"] == "entropy"
    assert record["distilled_from"] == "teacher-ft-s0" and rows[1]["test_auc"] == record["test_auc"]


@pytest.mark.slow
def test_the_studies_that_apply_run_end_to_end(tmp_path, mhist_dir, tiny_architectures):
    """KD from a label-smoothed teacher, from an ensemble of two seeds' teachers and
    from a DenseNet121 teacher, each through both phases (`docs/studies.md`)."""
    results = run_all(tiny_config(tmp_path, mhist_dir, only=("smoothed", "ensemble", "capacity"),
                                  ensemble_seeds=(0, 1)))[0]
    out = tmp_path / "out"
    finished = {p.parent.name for p in out.glob("*/metrics.json")}
    assert {"teacher-ls-e0.1-ft-s0", "lskd-e0.1-T4-a0.5-ft-s0", "teacher-ft-s1", "enskd-m0.1-T4-a0.5-ft-s0"} <= finished
    smoothed = json.loads((out / "teacher-ls-e0.1-ft-s0" / "metrics.json").read_text())
    assert smoothed["identity"]["learning_rate"] == pytest.approx(1e-5) and "ls_ce" in smoothed["history"][0]
    assert [r["model"] for r in results["ensemble"]] == ["member", "member", "ensemble", "student",
                                                         "single-teacher student"]
    assert results["smoothed"][3]["run"] == "lskd-e0.1-T4-a0.5-ft-s0" and "test_auc" in results["smoothed"][3]
    capacity = {r["preset"]: r for r in results["capacity"]}
    assert list(capacity) == ["densenet121", "course"]
    assert capacity["densenet121"]["student_run"] == "capkd-densenet121-T4-a0.5-ft-s0"
    assert capacity["course"]["teacher_run"] == "teacher-ft-s0" and "teacher_test_auc" in capacity["course"]
    densenet = json.loads((out / "teacher-densenet121-ft-s0" / "metrics.json").read_text())
    assert densenet["identity"]["learning_rate"] == pytest.approx(1e-5)  # the teacher's schedule
    assert densenet["identity"]["preset"] == "densenet121"
    from reports.make_report import make_report

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "task2").symlink_to(out)
    text = make_report(tmp_path / "results", tmp_path / "report").path.read_text()
    assert "| model | test auc (%) | the student agrees with it (%) |" in text[text.index("## Task 2"):]
    assert "| KD student from the smoothed teacher |" in text[text.index("## Task 2"):]
    assert "| teacher | params | teacher test AUC (%) |" in text[text.index("## Task 2"):]
    assert (tmp_path / "report" / "task2" / "teacher_capacity.png").exists()
