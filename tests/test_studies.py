"""The research studies: their arithmetic against hand values, then end to end."""

import csv
import json

import numpy as np
import pytest

from kdtoolkit.runner.studies import missing_class
from task1_mnist import run as cli
from task1_mnist.experiments import run_all


def test_the_bias_shift_is_the_smallest_of_highest_accuracy():
    # Class 2 is under-predicted: its logit is 1.5 below where it would win on both of its
    # examples; a shift of 1.6 fixes both, and from 2.6 on examples 0 and 3 turn to 2.
    logits = np.array([[3.0, 0.0, 0.5], [0.0, 2.0, 0.5], [2.0, 0.0, 0.5], [0.0, 2.0, -0.5]])
    labels = np.array([0, 2, 2, 1])
    shift, accuracy = missing_class.best_shift(logits, labels, 2)
    assert shift == pytest.approx(1.6) and accuracy == 1.0
    assert missing_class.best_shift(logits, labels, 2, shifts=np.array([0.0, 3.0])) == (0.0, 0.5)  # a tie: the smaller
    shifted = missing_class.shift_class(logits, 2, 1.6)
    assert shifted[:, 2].tolist() == pytest.approx([2.1, 2.1, 2.1, 1.1]) and logits[0, 2] == 0.5  # a copy
    found = missing_class.errors(logits, labels, 2)
    assert found == {"test_errors": 2, "test_accuracy": 0.5, "class_errors": 2, "class_accuracy": 0.0,
                     "class_examples": 2}


def test_the_transfer_set_loses_exactly_the_missing_class():
    from task1_mnist.experiments import Task1

    arrays = {"x": np.arange(6) * 10, "y": np.array([0, 3, 1, 3, 2, 0]), "index": np.arange(6)}
    kept = Task1.training_subset(None, arrays, missing_class.examples_without(arrays["y"], 3))
    assert kept["y"].tolist() == [0, 1, 2, 0] and kept["index"].tolist() == [0, 2, 4, 5]  # memory banks' indices
    assert kept["x"].tolist() == [0, 20, 40, 50]


@pytest.mark.slow
def test_missing_class_study_end_to_end(tmp_path, synthetic_mnist):
    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "teacher,missing", "--missing-class", "3",
                               "--missing-teachers", "course,small", "--epochs", "2", "--batch-size", "64",
                               "--validation", "64", "-q"])
    rows = run_all(config, arrays=synthetic_mnist)[0]["missing"]
    out = tmp_path / "out"
    assert {p.parent.name for p in out.glob("*/metrics.json")} == {
        "teacher-s0", "missing3-kd-T4-a0.5-s0", "teacher-small-s0", "missing3-kd-small-T4-a0.5-s0",
        "missing3-scratch-s0"}
    kd = json.loads((out / "missing3-kd-T4-a0.5-s0" / "metrics.json").read_text())
    assert kd["identity"]["missing_class"] == 3 and kd["distilled_from"] == "teacher-s0"
    assert "teacher_preset" not in kd["identity"]  # the course teacher's student keeps its identity
    small_kd = json.loads((out / "missing3-kd-small-T4-a0.5-s0" / "metrics.json").read_text())
    assert small_kd["identity"]["teacher_preset"] == "small" and small_kd["distilled_from"] == "teacher-small-s0"
    small = json.loads((out / "teacher-small-s0" / "metrics.json").read_text())
    assert small["identity"]["preset"] == "small" and small["params"] == 108_618  # the capacity study's run
    with open(out / "missing-s0.csv") as handle:
        saved = list(csv.DictReader(handle))
    assert [r["model"] for r in saved] == [r["model"] for r in rows] and len(rows) == 10
    assert [(r["teacher"], r["model"]) for r in rows[::2]] == [
        ("course", "teacher (every class)"), ("course", "KD student, no 3s"), ("small", "teacher (every class)"),
        ("small", "KD student, no 3s"), ("", "scratch student, no 3s")]
    assert [r["bias"] for r in rows] == ["as trained", "shifted"] * 5
    threes = int(np.sum(synthetic_mnist["y_test"] == 3))
    scratch_raw = rows[-2]
    assert scratch_raw["class_examples"] == threes and scratch_raw["class_accuracy"] == 0.0  # never saw a 3
    for row in rows:  # a class's errors are among the test errors
        assert 0 <= row["class_errors"] <= row["test_errors"] <= 128
    for name, row in (("teacher-s0", rows[0]), ("teacher-small-s0", rows[4]), ("missing3-kd-small-T4-a0.5-s0", rows[6])):
        record = json.loads((out / name / "metrics.json").read_text())
        assert row["test_accuracy"] == pytest.approx(record["test_accuracy"]), name
    teacher = json.loads((out / "teacher-s0" / "metrics.json").read_text())
    assert len(teacher["test_per_class"]["recall"]) == 10  # Task 1's per-class metrics
    assert teacher["test_per_class"]["recall"][3] == pytest.approx(1 - rows[0]["class_errors"] / threes)


def test_missing_teachers_are_the_capacity_presets():
    from kdtoolkit.errors import ConfigError
    from task1_mnist import config, models

    assert tuple(models.TEACHER_PRESETS) == config.TEACHER_SIZES == cli.parse_config([]).missing_teachers
    with pytest.raises(ConfigError, match="--missing-teachers: unknown or empty selection \\['huge'\\]"):
        cli.parse_config(["--missing-teachers", "small,huge"])


@pytest.mark.slow
def test_smoothed_teacher_study_end_to_end(tmp_path, synthetic_mnist):
    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "smoothed", "--ls-epsilon", "0.2",
                               "--epochs", "2", "--batch-size", "64", "--validation", "64", "-q"])
    rows = run_all(config, arrays=synthetic_mnist)[0]["smoothed"]
    out = tmp_path / "out"
    assert {p.parent.name for p in out.glob("*/metrics.json")} == {
        "teacher-s0", "teacher-ls-e0.2-s0", "kd-T4-a0.5-s0", "lskd-e0.2-T4-a0.5-s0"}
    smoothed = json.loads((out / "teacher-ls-e0.2-s0" / "metrics.json").read_text())
    assert smoothed["identity"]["epsilon"] == 0.2 and "ls_ce" in smoothed["history"][0]
    student = json.loads((out / "lskd-e0.2-T4-a0.5-s0" / "metrics.json").read_text())
    assert student["distilled_from"] == "teacher-ls-e0.2-s0"
    assert [r["run"] for r in rows] == ["teacher-s0", "teacher-ls-e0.2-s0", "kd-T4-a0.5-s0", "lskd-e0.2-T4-a0.5-s0"]
    assert all(0 < r["soft_target_entropy_nats"] <= np.log(10) + 1e-6 for r in rows[:2])
    assert rows[3]["test_accuracy"] == student["test_accuracy"]


@pytest.mark.slow
def test_the_report_shows_each_studys_table(tmp_path, synthetic_mnist):
    from reports.make_report import make_report

    out = tmp_path / "results" / "task1"
    config = cli.parse_config(["--out", str(out), "--only", "missing,smoothed,efficiency,ensemble", "--epochs", "1",
                               "--missing-teachers", "small,course", "--per-class", "5", "--ensemble-seeds", "0,1",
                               "--batch-size", "64", "--validation", "64", "-q"])
    run_all(config, arrays=synthetic_mnist)
    text = make_report(tmp_path / "results", tmp_path / "report").path.read_text()
    table = text[text.index("### Missing-class transfer"):]
    assert "| KD student, no 3s | as trained |" in table and "| scratch student, no 3s | as trained |" in table
    assert "### KD from a label-smoothed teacher" in text and "| KD student from the smoothed teacher |" in text
    assert "| 5 | " in text[text.index("### Data efficiency"):]
    assert (tmp_path / "report" / "task1" / "data_efficiency.png").exists()
    assert "| the student distilled from the ensemble |" in text[text.index("### Ensemble teacher"):]


def test_transfer_subsets_take_the_first_of_each_class_in_order():
    from kdtoolkit.runner.studies import data_efficiency as de

    labels = np.array([0, 1, 0, 1, 0, 2])
    assert de.per_class_subset(labels, 2, np.arange(6)).tolist() == [0, 1, 2, 3, 5]  # class 2 has only one
    assert de.per_class_subset(labels, 1, np.array([4, 3, 2, 1, 0, 5])).tolist() == [3, 4, 5]
    assert de.repeated(np.array([3, 4, 5]), 7).tolist() == [3, 4, 5, 3, 4, 5, 3]
    logits = np.array([[0.0, 0.0], [10.0, 0.0]])
    np.testing.assert_allclose(de.soft_target_entropies(logits, 1.0),
                               [np.log(2), -(0.9999546 * np.log(0.9999546) + 4.5398e-5 * np.log(4.5398e-5))],
                               rtol=1e-4)
    views = np.stack([logits, logits[::-1]], axis=1)  # (2 examples, 2 views, 2 classes): each view's entropy averaged
    np.testing.assert_allclose(de.soft_target_entropies(views, 1.0), [de.soft_target_entropies(logits, 1.0).mean()] * 2)


@pytest.mark.slow
def test_data_efficiency_study_end_to_end(tmp_path, synthetic_mnist, monkeypatch):
    from task1_mnist.experiments import Task1

    seen = []  # (examples, distinct examples) of each run's training set
    original = Task1.train_dataset
    monkeypatch.setattr(Task1, "train_dataset", lambda self, arrays: (
        seen.append((len(arrays["y"]), len(np.unique(arrays["index"])))), original(self, arrays))[1])
    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "efficiency", "--per-class", "3,10",
                               "--epochs", "1", "--batch-size", "64", "--validation", "64", "-q"])
    rows = run_all(config, arrays=synthetic_mnist)[0]["efficiency"]
    assert seen == [(320, 320)] + [(320, 30)] * 3 + [(320, 100)] * 3  # the teacher, then sets repeated to 320
    assert [(r["per_class"], r["method"], r["selection"]) for r in rows] == [
        (n, m, s) for n in (3, 10) for m, s in (("kd", "random"), ("kd", "entropy"), ("scratch", "random"))]
    assert [r["examples"] for r in rows] == [30] * 3 + [100] * 3
    record = json.loads((tmp_path / "out" / "efficiency-n3-entropy-T4-a0.5-s0" / "metrics.json").read_text())
    assert record["identity"]["per_class"] == 3 and record["identity"]["selection"] == "entropy"
    assert record["distilled_from"] == "teacher-s0"


@pytest.mark.slow
def test_ensemble_study_end_to_end(tmp_path, synthetic_mnist):
    from kdtoolkit.metrics import top1_agreement
    from kdtoolkit.runner.studies.ensemble import mean_logits
    from task1_mnist.models import build_teacher

    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "ensemble", "--ensemble-seeds", "0,1",
                               "--epochs", "1", "--batch-size", "64", "--validation", "64", "--precision", "float32",
                               "-q"])  # float32: the members' mean is checked to 1e-5
    rows = run_all(config, arrays=synthetic_mnist)[0]["ensemble"]
    out = tmp_path / "out"
    assert {p.parent.name for p in out.glob("*/metrics.json")} == {"teacher-s0", "teacher-s1", "enskd-m0.1-T4-a0.5-s0",
                                                                    "kd-T4-a0.5-s0"}
    assert [r["model"] for r in rows] == ["member", "member", "ensemble", "student", "single-teacher student"]
    single = json.loads((out / "kd-T4-a0.5-s0" / "metrics.json").read_text())
    assert rows[4]["test_accuracy"] == single["test_accuracy"] and single["distilled_from"] == "teacher-s0"
    members = []
    for seed in (0, 1):
        model = build_teacher()
        model.load_weights(out / f"teacher-s{seed}" / "model.weights.h5")
        members.append(model)
        saved = json.loads((out / f"teacher-s{seed}" / "metrics.json").read_text())
        assert rows[seed]["test_accuracy"] == pytest.approx(saved["test_accuracy"])
    x = synthetic_mnist["x_test"].astype(np.float32) / 255.0
    mean = (members[0](x, training=False).numpy() + members[1](x, training=False).numpy()) / 2
    np.testing.assert_allclose(mean_logits(members)(x).numpy(), mean, rtol=1e-5, atol=1e-6)
    assert rows[2]["test_accuracy"] == pytest.approx(np.mean(mean.argmax(-1) == synthetic_mnist["y_test"]))
    with np.load(out / "enskd-m0.1-T4-a0.5-s0" / "test_outputs.npz") as student:
        assert rows[2]["student_fidelity"] == pytest.approx(top1_agreement(student["logits"], mean), abs=1e-9)
    with pytest.raises(Exception, match="--ensemble-seeds"):
        cli.parse_config(["--ensemble-seeds", "1"])


@pytest.mark.slow
def test_teacher_capacity_study_end_to_end(tmp_path, synthetic_mnist):
    from task1_mnist import models

    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "capacity", "--epochs", "1",
                               "--batch-size", "64", "--validation", "64", "-q"])
    rows = run_all(config, arrays=synthetic_mnist)[0]["capacity"]
    out = tmp_path / "out"
    assert {p.parent.name for p in out.glob("*/metrics.json")} == {
        "teacher-small-s0", "capkd-small-T4-a0.5-s0", "teacher-s0", "kd-T4-a0.5-s0", "teacher-large-s0",
        "capkd-large-T4-a0.5-s0"}
    assert [(r["preset"], r["teacher_params"]) for r in rows] == [
        (name, build().count_params()) for name, build in models.TEACHER_PRESETS.items()]
    assert [r["teacher_params"] for r in rows] == [108_618, 1_011_466, 2_058_378]
    large = json.loads((out / "capkd-large-T4-a0.5-s0" / "metrics.json").read_text())
    assert large["distilled_from"] == "teacher-large-s0" and rows[2]["student_fidelity"] == large["test_fidelity"]
    assert all(0 < r["soft_target_entropy_nats"] <= np.log(10) + 1e-6 for r in rows)
    from reports.make_report import make_report

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "task1").symlink_to(out)
    text = make_report(tmp_path / "results", tmp_path / "report").path.read_text()
    assert "| large | 2,058,378 |" in text[text.index("### Teacher capacity"):]


def test_integrated_gradients_of_a_linear_model_are_input_times_weight_and_complete():
    import keras

    from kdtoolkit.runner.studies import attributions as ig

    rng = np.random.default_rng(0)
    linear = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    x = rng.uniform(size=(5, 4, 4, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    weights, bias = linear.layers[-1].get_weights()
    baselines = ig.noise_baselines((4, 4, 1), count=3)
    mean_baseline = baselines.mean(0).reshape(-1)
    expected = (x.reshape(5, -1) - mean_baseline) * weights[:, y].T  # exact for a linear model, any steps
    np.testing.assert_allclose(ig.integrated_gradients(linear, x, y, baselines, steps=4).reshape(5, -1), expected,
                               rtol=1e-4, atol=1e-6)
    relu = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    black = np.zeros((1, 4, 4, 1), np.float32)
    found = ig.integrated_gradients(relu, x, y, black, steps=256).reshape(5, -1).sum(-1)
    logits, at_zero = relu(x).numpy(), relu(black).numpy()
    np.testing.assert_allclose(found, logits[np.arange(5), y] - at_zero[0, y], rtol=1e-2, atol=1e-3)  # complete
    noisy = ig.integrated_gradients(relu, x, y, baselines, steps=256).reshape(5, -1).sum(-1)
    at_baselines = relu(baselines).numpy()[:, y].mean(0)
    np.testing.assert_allclose(noisy, logits[np.arange(5), y] - at_baselines, rtol=1e-2, atol=1e-3)


def test_foreground_share_and_the_paired_test():
    from kdtoolkit.runner.studies import attributions as ig

    a = np.array([[[1.0, -3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = np.array([[[True, False], [False, False]], [[True, True], [True, True]]])
    assert ig.foreground_share(a, mask).tolist() == [0.25, 0.0]
    found = ig.paired_comparison(np.arange(10) + 1.0, np.zeros(10))
    assert found == {"higher": 10, "classes": 10, "wilcoxon_p": pytest.approx(2 / 2**10)}  # Thapa's 0.00195
    assert ig.paired_comparison(np.ones(3), np.ones(3))["wilcoxon_p"] is None


@pytest.mark.slow
def test_attributions_study_end_to_end(tmp_path, synthetic_mnist):
    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "attributions", "--attribution-images", "50",
                               "--epochs", "1", "--batch-size", "64", "--validation", "64", "-q"])
    result = run_all(config, arrays=synthetic_mnist)[0]["attributions"]
    assert {p.parent.name for p in (tmp_path / "out").glob("*/metrics.json")} == {
        "teacher-s0", "kd-T4-a0.5-s0", "scratch-s0"}
    counts = np.bincount(synthetic_mnist["y_test"][:50], minlength=10)
    rows = [r for r in result["rows"] if r["model"] == "kd"]
    assert [r["images"] for r in rows] == counts.tolist()
    assert all(0.0 <= r["foreground_share"] <= 1.0 for r in result["rows"])
    assert result["kd_vs_scratch"]["classes"] == 10
    with np.load(tmp_path / "out" / "attributions-s0.npz") as saved:
        assert saved["kd_mean_map"].shape == (10, 28, 28, 1) and saved["classes"].tolist() == list(range(10))
    from reports.make_report import make_report

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "task1").symlink_to(tmp_path / "out")
    text = make_report(tmp_path / "results", tmp_path / "report").path.read_text()
    assert "KD above scratch in" in text[text.index("### Gradient attributions"):]


def test_noisy_labels_flip_exactly_the_share_to_other_classes():
    from kdtoolkit.runner.studies.training_noise import noisy_labels

    labels = np.arange(1000) % 10
    noisy = noisy_labels(labels, 0.3, 10, seed=0)
    assert np.sum(noisy != labels) == 300 and noisy.dtype == labels.dtype
    assert np.array_equal(noisy, noisy_labels(labels, 0.3, 10, seed=0))  # the seed's draw
    assert not np.array_equal(noisy, noisy_labels(labels, 0.3, 10, seed=1))
    changed = noisy != labels
    assert set(np.unique((noisy[changed] - labels[changed]) % 10)) <= set(range(1, 10))  # never the same class
    assert np.array_equal(noisy_labels(labels, 0.0, 10, seed=0), labels)


@pytest.mark.slow
def test_label_noise_study_end_to_end(tmp_path, synthetic_mnist, monkeypatch):
    from task1_mnist.experiments import Task1

    wrong = []  # the share of wrong labels each run trains on
    original = Task1.train_dataset
    clean = {}

    def spy(self, arrays):
        clean.setdefault("y", dict(zip(self.train_data()["index"], self.train_data()["y"])))
        wrong.append(float(np.mean([clean["y"][i] != y for i, y in zip(arrays["index"], arrays["y"])])))
        return original(self, arrays)

    monkeypatch.setattr(Task1, "train_dataset", spy)
    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "noise", "--label-noise", "0,0.5",
                               "--epochs", "1", "--batch-size", "64", "--validation", "64", "-q"])
    rows = run_all(config, arrays=synthetic_mnist)[0]["noise"]
    assert [r["label_noise"] for r in rows] == [0.0, 0.5]
    assert wrong == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5]  # course teacher, KD, scratch; then the noisy three
    assert rows[1]["runs"] == "teacher-noise0.5-s0 noise0.5-kd-T4-a0.5-s0 noise0.5-scratch-s0"
    kd = json.loads((tmp_path / "out" / "noise0.5-kd-T4-a0.5-s0" / "metrics.json").read_text())
    assert kd["distilled_from"] == "teacher-noise0.5-s0" and kd["identity"]["label_noise"] == 0.5
    from reports.make_report import make_report

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "task1").symlink_to(tmp_path / "out")
    text = make_report(tmp_path / "results", tmp_path / "report").path.read_text()
    section = text[text.index("### Label noise"):]
    assert "| 50 | " in section
    # Default precision (auto): the table says so where that was bfloat16.
    precision = kd["identity"].get("precision", "float32")
    assert (f"*Trained in {precision}.*" in section) == (precision != "float32")
    assert "](task1/label_noise.png)" in section and (tmp_path / "report" / "task1" / "label_noise.png").exists()


def test_noisy_images_add_clipped_gaussian_noise_of_the_given_std():
    from kdtoolkit.runner.studies.training_noise import noisy_images

    flat = np.full((200, 28, 28, 1), 128, np.uint8)
    noisy = noisy_images(flat, 0.1, seed=0)
    assert noisy.dtype == np.uint8 and noisy.shape == flat.shape
    deviation = noisy.astype(np.float64) - 128
    assert abs(deviation.mean()) < 0.2 and deviation.std() == pytest.approx(25.5, rel=0.01)  # far from the clip
    assert np.array_equal(noisy, noisy_images(flat, 0.1, seed=0))  # the seed's draw
    assert not np.array_equal(noisy, noisy_images(flat, 0.1, seed=1))
    heavy = noisy_images(np.zeros((100, 8, 8), np.uint8), 1.0, seed=0).astype(np.float64)
    # |N(0, 255)| clipped at 0 and 255: half the pixels 0, the rest a folded normal.
    assert np.mean(heavy == 0) == pytest.approx(0.5, abs=0.02) and heavy.max() == 255
    assert np.array_equal(noisy_images(flat, 0.0, seed=0), flat)


@pytest.mark.slow
def test_image_noise_study_distils_from_the_teachers_outputs_on_the_noisy_images(tmp_path, synthetic_mnist, monkeypatch):
    from kdtoolkit.runner.studies.training_noise import noisy_images
    from task1_mnist.experiments import Task1

    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "corruption", "--image-noise", "0,0.5",
                               "--epochs", "1", "--batch-size", "64", "--precision", "float32", "-q"])
    clean = Task1(config, arrays=synthetic_mnist).arrays["x_train"]  # the training split, by example index
    seen = []  # per run trained: (max |x - clean x|, the teacher logits it carries or None)
    original = Task1.train_dataset

    def spy(self, arrays):
        seen.append((np.abs(arrays["x"].astype(int) - clean[arrays["index"]].astype(int)).max(),
                     arrays.get("teacher_logits")))
        return original(self, arrays)

    monkeypatch.setattr(Task1, "train_dataset", spy)
    rows = run_all(config, arrays=synthetic_mnist)[0]["corruption"]
    assert [r["image_noise"] for r in rows] == [0.0, 0.5]
    assert rows[1]["runs"] == "teacher-pixnoise0.5-s0 pixnoise0.5-kd-T4-a0.5-s0 pixnoise0.5-scratch-s0"
    assert [d == 0 for d, _ in seen] == [True] * 3 + [False] * 3  # course runs clean, then the noisy three
    # The KD student's teacher logits are the noisy teacher's outputs on the noisy images.
    from task1_mnist import data as mnist
    from task1_mnist.models import build_teacher

    teacher = build_teacher()
    teacher.load_weights(tmp_path / "out" / "teacher-pixnoise0.5-s0" / "model.weights.h5")
    noisy = noisy_images(clean, 0.5, seed=0)
    expected = teacher.predict(mnist.scale({"x": noisy})["x"].numpy(), verbose=0)
    assert np.allclose(seen[4][1], expected, atol=1e-4)
    kd = json.loads((tmp_path / "out" / "pixnoise0.5-kd-T4-a0.5-s0" / "metrics.json").read_text())
    assert kd["distilled_from"] == "teacher-pixnoise0.5-s0" and kd["identity"]["image_noise"] == 0.5
    from reports.make_report import make_report

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "task1").symlink_to(tmp_path / "out")
    text = make_report(tmp_path / "results", tmp_path / "report").path.read_text()
    assert "| 0.5 | " in text[text.index("### Image noise"):]
    assert (tmp_path / "report" / "task1" / "image_noise.png").exists()


def test_the_configs_studies_are_the_tasks():
    from task1_mnist.config import COURSE, STUDIES, Task1Config
    from task1_mnist.experiments import Task1

    assert tuple(Task1.studies) == STUDIES and set(Task1.experiments) == set(COURSE) | set(STUDIES)
    assert Task1Config().only == COURSE  # studies run only when named


@pytest.mark.slow
def test_epochs_to_reach_and_the_per_class_table(tmp_path, synthetic_mnist):
    from reports.make_report import make_report
    from reports.per_class import epochs_to_reach

    history = [{"test_accuracy": 0.95}, {"test_accuracy": 0.985}, {"test_accuracy": 0.97}]
    assert [epochs_to_reach(history, level) for level in (0.9, 0.98, 0.99)] == [1, 2, None]
    out = tmp_path / "results" / "task1"
    run_all(cli.parse_config(["--out", str(out), "--only", "teacher,kd,scratch", "--epochs", "2",
                              "--batch-size", "64", "--validation", "64", "-q"]), arrays=synthetic_mnist)
    text = make_report(tmp_path / "results", tmp_path / "report").path.read_text()
    table = text[text.index("| digit | teacher recall / F1 (%)"):]
    teacher = json.loads((out / "teacher-s0" / "metrics.json").read_text())
    recall, f1 = teacher["test_per_class"]["recall"][3], teacher["test_per_class"]["f1"][3]
    assert f"| 3 | {recall * 100:.2f} / {f1 * 100:.2f} |" in table
    assert "| model | epochs to 97% | epochs to 98% | epochs to 99% |" in table


def test_dynamics_occlusion_maps_are_the_explain_modules_per_class():
    import keras

    from kdtoolkit.deploy import explain
    from kdtoolkit.runner.studies.explanation_dynamics import occlusion

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    images = np.random.default_rng(0).random((2, 8, 8, 1), np.float32)
    maps = occlusion(model, images, [2, 0], patch=4, stride=2, fill=0.0)
    assert maps.shape == (2, 3, 3)
    softmax = lambda x: np.asarray(keras.ops.softmax(model(x)))  # noqa: E731
    for image, label, found in zip(images, [2, 0], maps):
        np.testing.assert_allclose(found, explain.occlusion_map(softmax, image, label, 4, 2, 0.0), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_pearson_rows_match_numpy_and_the_dynamics_study_end_to_end(tmp_path, synthetic_mnist):
    from kdtoolkit.runner.studies.explanation_dynamics import pearson_rows

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 3, 3)), rng.normal(size=(4, 3, 3))
    b[1] = 2 * a[1] + 1  # r = 1
    expected = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    np.testing.assert_allclose(pearson_rows(a, b), expected, rtol=1e-12)
    assert pearson_rows(np.ones((1, 4)), a[:1].reshape(1, -1)[:, :4]).tolist() == [0.0]
    config = cli.parse_config(["--out", str(tmp_path / "out"), "--only", "dynamics", "--ensemble-seeds", "0,1",
                               "--explain-images", "20", "--epochs", "2", "--batch-size", "64",
                               "--validation", "64", "-q"])
    rows = run_all(config, arrays=synthetic_mnist)[0]["dynamics"]
    assert [(r["maps"], r["epoch"]) for r in rows] == [
        ("occlusion", 1), ("occlusion", 2), ("integrated gradients", 1), ("integrated gradients", 2)]
    assert all(-1 <= r[f"{side}_target_mean_r"] <= 1 and 0 <= r[f"{side}_target_share"] <= 1
               for r in rows for side in ("on", "off"))
    assert {p.parent.name for p in (tmp_path / "out").glob("*/metrics.json")} == {"teacher-s0", "teacher-s1"}
    with np.load(tmp_path / "out" / "explanation_dynamics-s0.npz") as shown:  # the first images' on-target maps
        assert shown["epochs"].tolist() == [1, 2] and shown["occlusion_ensemble"].shape[0] == 3
        assert shown["integrated_gradients_epochs"].shape == (2, 3, 28, 28, 1)
        np.testing.assert_array_equal(shown["labels"], synthetic_mnist["y_test"][:3])
    from reports.make_report import make_report

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "task1").symlink_to(tmp_path / "out")
    text = make_report(tmp_path / "results", tmp_path / "report").path.read_text()
    assert "| occlusion | 2 | " in text[text.index("### Explanations over training"):]
    assert (tmp_path / "report" / "task1" / "explanation_dynamics.png").exists()
    assert (tmp_path / "report" / "task1" / "explanation_dynamics_maps.png").exists()

