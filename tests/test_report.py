"""The report generator on a small fabricated results folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdtoolkit.files import write_csv_atomic
from kdtoolkit.runner.results import ResultsStore
from reports.make_report import make_report

DATA = {"source": "fake/mnist.npz", "fingerprint": "0123abcd", "synthetic": False, "train": 55000,
        "validation": 5000, "test": 10000}


def fabricate(root):
    store = ResultsStore(root / "task1")
    accuracies = {}

    def save(name, experiment, accuracy, seed, **identity):
        history = [{"epoch": e, "test_accuracy": accuracy - 0.01 * (2 - e)} for e in (1, 2)]
        store.save(f"{name}-s{seed}", {
            "run": f"{name}-s{seed}", "experiment": experiment, "seed": seed, "test_accuracy": accuracy,
            "val_accuracy": accuracy - 0.001, "test_ece": 0.02, "params": 10, "flops": 20, "history": history,
            "identity": {"experiment": experiment, "seed": seed, "epochs": 2, **identity}, "data": DATA,
            "config": {"temperature": 4.0, "alpha": 0.5},
        })
        accuracies.setdefault(name, []).append(accuracy)
        return {"temperature": identity.get("temperature"), "alpha": identity.get("alpha"),
                "test_accuracy": accuracy, "val_accuracy": accuracy - 0.001}

    for seed, shift in ((0, 0.0), (1, 0.002)):
        save("teacher", "teacher", 0.990 + shift, seed)
        save("scratch", "scratch", 0.980 + shift, seed)
        cells = [save(f"kd-T{t:g}-a{a:g}", "kd", 0.985 + t / 1000 + a / 100 + shift, seed, temperature=t, alpha=a)
                 for t in (1.0, 4.0) for a in (0.2, 0.5)]
        labels = np.arange(20) % 10
        for name, disagree in (("teacher", 0), ("kd-T4-a0.5", 2), ("scratch", 4)):  # test images where it differs
            predicted = labels.copy()
            predicted[:disagree] = (predicted[:disagree] + 1) % 10
            np.savez(root / "task1" / f"{name}-s{seed}" / "test_outputs.npz", logits=5.0 * np.eye(10)[predicted],
                     labels=labels)
        best = max(cells, key=lambda c: c["val_accuracy"])
        (root / "task1" / f"grid-s{seed}.json").write_text(json.dumps({"cells": cells, "best": best,
                                                                      "chosen_by": "val_accuracy"}))
        write_csv_atomic(root / "task1" / f"eskd-s{seed}.csv",
                         [{"teacher_epoch": 1, "teacher_test_accuracy": 0.95, "student_test_accuracy": 0.97, "run": "x"}],
                         ("teacher_epoch", "teacher_test_accuracy", "student_test_accuracy", "run"))
        write_csv_atomic(root / "task1" / f"teacher_entropy-s{seed}.csv",
                         [{"temperature": t, "entropy_nats": e} for t, e in ((1, 0.1), (4, 1.0), (16, 2.2))],
                         ("temperature", "entropy_nats"))
    save("kd-T4-a0.5", "kd", 0.9, 2, temperature=4.0, alpha=0.5)  # a third seed, without a grid
    (root / "task1" / "timings.jsonl").write_text("".join(
        json.dumps({"experiment": name, "seed": seed, "seconds": seconds, "peak_rss_mib": 1536.0}) + "\n"
        for name, seed, seconds in (("teacher", 0, 100.0), ("teacher", 1, 110.0), ("kd", 0, 30.0))))
    write_csv_atomic(root / "task1" / "flops.csv", [{"model": "teacher", "params": 1011466, "flops": 22042058}],
                     ("model", "params", "flops"))
    explain_dir = root / "task1" / "explain"
    explain_dir.mkdir()
    images = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    models = ["teacher", "kd_student", "scratch_student"]
    agreement = {f"{a} vs {b}": {"pearson_mean": 0.81, "pearson_std": 0.05, "top5_overlap_mean": 0.6,
                                 "top5_overlap_std": 0.1, "images": 2}
                 for a, b in (("teacher", "kd_student"), ("teacher", "scratch_student"), ("kd_student", "scratch_student"))}
    segments = np.tile(np.arange(4).repeat(7), (28, 1))[None].repeat(2, 0)
    np.savez(explain_dir / "lime-s0.npz", images=images, labels=np.array([3, 4]), segments=segments,
             **{f"map__{m}": np.random.default_rng(1).normal(size=(2, 4)) for m in models})
    (explain_dir / "lime-s0.json").write_text(json.dumps(
        {"settings": {"kind": "lime", "models": models, "images": 2, "top_k": 5}, "agreement": agreement}))
    np.savez(explain_dir / "occlusion-s0.npz", images=images, labels=np.array([3, 4]),
             **{f"map__{m}": np.random.default_rng(2).normal(size=(2, 13, 13)) for m in models})
    (explain_dir / "occlusion-s0.json").write_text(json.dumps(
        {"settings": {"kind": "occlusion", "models": models, "images": 2, "top_k": 5, "patch": 4, "stride": 2},
         "agreement": agreement}))
    return accuracies


@pytest.mark.slow
def test_report_writes_every_figure_and_matching_numbers(tmp_path):
    accuracies = fabricate(tmp_path / "results")
    report = make_report(tmp_path / "results", tmp_path / "report")
    expected = {"t_curve", "grid_heatmap", "accuracy_bars", "learning_curves", "teacher_entropy",
                "lime_panel", "occlusion_panel", "reliability"}
    assert {p.split("/")[-1][:-4] for p in report.figures} == expected
    for figure in report.figures:
        assert (tmp_path / "report" / figure).stat().st_size > 1000
    text = (tmp_path / "report" / "REPORT.md").read_text()
    teacher = np.array(accuracies["teacher"]) * 100
    assert f"| teacher | {teacher.mean():.2f} ± {teacher.std(ddof=1):.2f} (n=2) |" in text
    best = max((k for k in accuracies if k.startswith("kd-")), key=lambda k: np.mean(accuracies[k][:2]))  # grid seeds
    assert best == "kd-T4-a0.5" and ("chosen per seed as the run saved it on the validation split; the test set "
                                     "only reports: seed 0: T=4, alpha=0.5 by val accuracy (99.30%), test accuracy 99.40%") in text
    # The seed-2 run of that cell has no grid: the grid averages the two grid seeds only.
    assert "| 4 | 99.20 ± 0.14 (n=2) | 99.50 ± 0.14 (n=2) |" in text
    assert "*Settings: epochs 2; seeds 0, 1 (n=2); data: mnist.npz (fingerprint 0123abcd), 55,000 train / " \
           "5,000 validation / 10,000 test.*" in text
    assert "Test accuracy on the 10,000 test images" in text and "SYNTHETIC" not in text
    # Fidelity from the saved outputs (2 and 4 of 20 predictions differ from the teacher's), ECE from the records.
    assert "| teacher | — | 2.00 ± 0.00 (n=2) |" in text
    assert "| KD student (T=4, alpha=0.5) | 90.00 ± 0.00 (n=2) | 2.00 ± 0.00 (n=3) |" in text
    assert "| student from scratch | 80.00 ± 0.00 (n=2) | 2.00 ± 0.00 (n=2) |" in text
    assert "| 1 | 95.00 ± 0.00 (n=2) | 97.00 ± 0.00 (n=2) |" in text  # eskd table
    assert "| teacher | 1,011,466 | 22,042,058 |" in text
    assert "teacher vs kd student: r = 0.81 ± 0.05, top-5 overlap 0.60" in text
    assert "| teacher | 3.5 | 1.5 |" in text and "| **all** | 4.0 | 1.5 |" in text  # minutes, GiB
    assert "Task 2: skipped" in text


def test_missing_results_are_notes_not_crashes(tmp_path):
    (tmp_path / "results" / "task1").mkdir(parents=True)
    report = make_report(tmp_path / "results", tmp_path / "report")
    assert report.figures == []
    assert any("Task 1" in note for note in report.notes)
    assert (tmp_path / "report" / "REPORT.md").exists()


def fabricate_task2(root, synthetic=False):
    store = ResultsStore(root / "task2")
    data = {"source": "fake/mhist", "fingerprint": "feed", "synthetic": synthetic, "train": 300, "validation": 50,
            "test": 100}
    aucs = {}
    for seed in (0, 1):
        for stem, experiment, auc, extra in (
            ("teacher-ft", "teacher", 0.90 + seed / 100, {}),
            ("scratch-ft", "scratch", 0.80 + seed / 100, {}),
            ("kd-T4-a0.5-ft", "kd", 0.85 + seed / 100, {"temperature": 4.0, "alpha": 0.5}),
            ("kd-T1-a0.5-ft", "kd", 0.83 + seed / 100, {"temperature": 1.0, "alpha": 0.5}),
        ):
            store.save(f"{stem}-s{seed}", {
                "run": f"{stem}-s{seed}", "experiment": experiment, "seed": seed, "test_auc": auc,
                "test_accuracy": 0.8, "test_f1": 0.7, "params": 5, "flops": 7,
                "confusion_matrix": [[50, 10], [5, 35]],
                "roc_curve": {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.8, 1.0], "thresholds": [1.0, 0.5, 0.0]},
                "identity": {"experiment": experiment, "seed": seed, "phase": "finetune", "epochs": 2, **extra},
                "history": [], "data": data, "config": {"temperature": 4.0, "alpha": 0.5},
            })
            store.save(f"{stem[:-3]}-fe-s{seed}", {
                "run": f"{stem[:-3]}-fe-s{seed}", "experiment": experiment, "seed": seed, "test_auc": auc - 0.05,
                "identity": {"experiment": experiment, "seed": seed, "phase": "feature-extraction", "epochs": 1,
                             **extra}, "history": [], "data": data, "params": 5, "flops": 7,
            })
            aucs.setdefault(stem, []).append(auc)
    return aucs


def test_task2_report_has_roc_confusion_and_auc_curve(tmp_path):
    aucs = fabricate_task2(tmp_path / "results")
    report = make_report(tmp_path / "results", tmp_path / "report")
    names = {p.split("/")[-1][:-4] for p in report.figures if p.startswith("task2/")}
    assert names == {"roc_curves", "confusion_matrices", "t_curve_auc"}
    text = (tmp_path / "report" / "REPORT.md").read_text()
    teacher = np.array(aucs["teacher-ft"]) * 100
    assert f"| teacher ResNet50V2 | {teacher.mean():.2f} ± {teacher.std(ddof=1):.2f} (n=2) |" in text
    assert "Task 1: skipped" in text


def test_synthetic_data_and_degenerate_explanations_are_said(tmp_path):
    fabricate_task2(tmp_path / "results", synthetic=True)
    explain_dir = tmp_path / "results" / "task2" / "explain"
    explain_dir.mkdir()
    models = ["teacher", "kd_student", "scratch_student"]
    np.savez(explain_dir / "lime-s0.npz", images=np.zeros((2, 8, 8, 3)), labels=np.array([0, 1]),
             segments=np.zeros((2, 8, 8), int), **{f"map__{m}": np.zeros((2, 1)) for m in models})
    undefined = {"pearson_mean": None, "pearson_std": None, "top5_overlap_mean": None, "images": 2,
                 "degenerate_images": 2}
    (explain_dir / "lime-s0.json").write_text(json.dumps(
        {"settings": {"kind": "lime", "models": models, "images": 2, "top_k": 5},
         "agreement": {"teacher vs kd_student": undefined}}))
    report = make_report(tmp_path / "results", tmp_path / "report")
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert text.startswith("# Knowledge distillation: results (includes SYNTHETIC data)")
    assert "## Task 2: MHIST — SYNTHETIC images" in text and "the whole SYNTHETIC MHIST test set (100 images)" in text
    assert "epochs feature-extraction 1, finetune 2" in text and "data: SYNTHETIC images, mhist" in text
    assert "lime-s0.npz: the segmentation found one superpixel per image" in text
    assert not any("lime_panel" in f for f in report.figures) and "nan" not in text


def test_noise_call_uses_two_standard_errors():
    from reports.sections import noise_call

    kd = [0.980, 0.982, 0.984]  # mean 0.982, sample var 4e-6
    # se = sqrt(4e-6/3 + 4e-6/3) = 0.001633: 2 se = 0.003266
    assert noise_call([0.983, 0.985, 0.987], kd) == "within seed noise"  # +0.003
    assert noise_call([0.984, 0.986, 0.988], kd) == "above KD"  # +0.004
    assert noise_call([0.976, 0.978, 0.980], kd) == "below KD"  # -0.004
    assert noise_call([0.99], kd) == "one seed: no call"


def test_methods_and_deployment_tables(tmp_path):
    store = ResultsStore(tmp_path / "task1")
    config = {"temperature": 4.0, "alpha": 0.5}
    for seed in (0, 1, 2):
        for name, method, accuracy, extra in (("kd-T4-a0.5", "kd", 0.98, {"temperature": 4.0, "alpha": 0.5}),
                                              ("kd-T1-a0.5", "kd", 0.50, {"temperature": 1.0, "alpha": 0.5}),
                                              ("dkd-T4-tw1-nw8", "dkd", 0.99, {"temperature": 4.0}),
                                              ("scratch", "scratch", 0.97, {}), ("teacher", "teacher", 0.995, {})):
            store.save(f"{name}-s{seed}", {
                "run": f"{name}-s{seed}", "experiment": method, "seed": seed, "test_accuracy": accuracy + seed / 1000,
                "test_ece": 0.01, "params": 10, "flops": 20, "train_seconds": 5.0, "history": [], "config": config,
                "identity": {"experiment": method, "seed": seed, "epochs": 2, **extra}, "data": DATA})
        write_csv_atomic(tmp_path / "task1" / f"export-s{seed}.csv",
                         [{"model": "kd", "variant": v, "params": 10, "flops": 20, "size_bytes": size,
                           "latency_ms_median": 0.1, "latency_ms_q1": 0.09, "latency_ms_q3": 0.12,
                           "keras_test_accuracy": 0.98, "tflite_test_accuracy": 0.98 - drop,
                           "drop": drop, "run": "kd-T4-a0.5", "runtime": "ai-edge-litert 2.3.0"}
                          for v, size, drop in (("float32", 4096, 0.0), ("int8", 1024, 0.001 * seed))],
                         ("model", "variant", "params", "flops", "size_bytes", "latency_ms_median",
                          "latency_ms_q1", "latency_ms_q3", "keras_test_accuracy", "tflite_test_accuracy", "drop", "run", "runtime"))
    text = make_report(tmp_path, tmp_path / "report").path.read_text()
    methods = text[text.index("### Distillation methods"):text.index("### Deployment")]
    assert "| KD (Hinton et al. 2015) | 98.10 ± 0.10 (n=3)" in methods  # T=1 grid cells left out
    assert "| DKD, decoupled KD (Zhao et al. 2022) | 99.10 ± 0.10 (n=3)" in methods and "above KD" in methods
    assert "| no teacher (scratch) | 97.10 ± 0.10 (n=3)" in methods and "below KD" in methods
    deployment = text[text.index("### Deployment"):]
    assert "| kd | int8 | 10 | 20 | 1 | 0.100 [0.090–0.120] | 98.00 | 97.90 | +0.10 ± 0.10 |" in deployment
    assert "ai-edge-litert 2.3.0" in deployment


@pytest.mark.slow
def test_damaged_files_are_named_and_skipped_and_the_report_still_renders(tmp_path, capsys):
    """One bad file of each kind: the report names each, leaves the folder as it is,
    still renders every figure the sound files make, and exits 0."""
    from reports.make_report import main

    results = tmp_path / "results"
    fabricate(results)
    root = results / "task1"
    (root / "scratch-s1" / "metrics.json").write_text('{"run": "scratch-s1", "identi')  # truncated
    (root / "kd-T1-a0.2-s0" / "metrics.json").write_text("{}")
    (root / "kd-T4-a0.5-s1" / "test_outputs.npz").write_bytes(b"PK\x03\x04 garbage")
    (root / "grid-s1.json").write_bytes(b"\x00garbage")
    with open(root / "timings.jsonl", "a") as handle:
        handle.write('{"experiment": "kd", "seed": 1, "seco')  # torn last line
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert main(["--results", str(results), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    damaged = [line for line in out.splitlines() if line.startswith("skipped damaged file: ")]
    assert len(damaged) == 5, out
    for name in ("scratch-s1/metrics.json", "kd-T1-a0.2-s0/metrics.json", "kd-T4-a0.5-s1/test_outputs.npz",
                 "grid-s1.json", "timings.jsonl line 4"):
        assert any(f"{root}/{name}" in line for line in damaged), (name, damaged)
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "## Damaged files skipped" in text and "grid-s1.json" in text
    assert "| teacher | 99.10 ± 0.14 (n=2) |" in text  # the sound runs, as before
    assert "| **all** | 4.0 | 1.5 |" in text  # the torn line left out, the others counted
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files  # a reader moves nothing
    figures = {p.name for p in (tmp_path / "report" / "task1").glob("*.png")}
    assert {"t_curve.png", "grid_heatmap.png", "reliability.png", "lime_panel.png"} <= figures


def test_a_missing_or_empty_results_folder_is_an_error(tmp_path, capsys):
    from reports.make_report import main

    assert main(["--results", str(tmp_path / "no-such"), "--out", str(tmp_path / "r")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty" / "task1").mkdir(parents=True)
    assert main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no finished runs" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_report_imports_neither_tensorflow_nor_keras(tmp_path):
    """The report reads results, not models: rendering one in a fresh interpreter (the
    registry's names read for the method filters) leaves TensorFlow and Keras unimported."""
    fabricate(tmp_path / "results")
    fabricate_task2(tmp_path / "results")
    argv = ["reports/make_report.py", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "report")]
    code = (f"import runpy, sys\nsys.argv = {argv!r}\ntry:\n"
            "    runpy.run_path('reports/make_report.py', run_name='__main__')\n"
            "except SystemExit as done:\n    assert done.code == 0, done.code\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "False False", done.stdout
    assert "| teacher ResNet50V2 |" in (tmp_path / "report" / "REPORT.md").read_text()


def test_the_registry_read_without_importing_it_matches_the_registry():
    """`reports.registry` reads names, summaries and option defaults from the source of
    `common/methods/`: the same as the imported registry, in its order."""
    import dataclasses

    from kdtoolkit import methods
    from reports import registry

    assert list(registry.methods()) == list(methods.REGISTRY)
    for name, cls in methods.REGISTRY.items():
        entry = registry.methods()[name]
        assert entry.summary == cls.summary and entry.module == cls.__module__.rsplit(".", 1)[-1]
        assert entry.options == {f.name: f.default for f in dataclasses.fields(cls.Options)}, name
    assert registry.shared_options() == methods.SHARED_OPTIONS
