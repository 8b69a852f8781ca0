"""Task 1 end to end: synthetic data, a slice of real MNIST, resume, CLI errors."""

import csv
import json

import numpy as np
import pytest

from kdtoolkit import device, methods, training
from kdtoolkit.speed.fused import batched_products
from kdtoolkit.metrics import expected_calibration_error
from task1_mnist import data as mnist
from task1_mnist import run as cli
from task1_mnist.config import Task1Config
from task1_mnist.experiments import Task1, run_all


def small_config(tmp_path, **overrides):
    settings = dict(out=str(tmp_path / "out"), epochs=2, batch_size=64, temperatures=(1.0, 4.0), alphas=(0.5,),
                    teacher_epochs=(1,), explain_images=2, lime_samples=100, validation=64, quiet=True)
    settings.update(overrides)
    return Task1Config(**settings)


@pytest.mark.slow
def test_all_experiments_on_synthetic_data_then_resume(tmp_path, synthetic_mnist):
    config = small_config(tmp_path)
    results = run_all(config, arrays=synthetic_mnist)[0]
    out = tmp_path / "out"
    expected_runs = {
        "teacher-s0", "kd-T4-a0.5-s0", "kd-T1-a0.5-s0", "scratch-s0",
        "skd-teacher-S4-s0", "skd-S4-T4-a0.5-s0", "ta-T4-a0.5-s0", "ta-takd-T4-a0.5-s0",
        "eskd-e01-T4-a0.5-s0", "dkd-T4-tw1-nw8-w0.0833333-s0", "fitnets-w100-s0", "at-w1000-s0", "rkd-dw25-aw50-s0",
        "crd-w0.8-t0.07-d128-n4096-s0", "ls-e0.1-s0", "cid-T4-kw1-sw33-cw0.1-ie1-dm0-s0",
        "extractive-T4-st4-e0-a0.5-s0", "sftn-teacher-tw1-bcw1-bkw3-bt1-s0", "sftn-T4-a0.5-tw1-bcw1-bkw3-bt1-s0",
        "dist-T4-b1-g1-w2-s0", "nst-w50-s0", "pkt-w30000-s0", "sp-w3000-s0", "tfkd-cp0.99-rt40-ra0.95-m1-s0",
        "vid-w1-ipv5-s0",
    }
    assert {p.parent.name for p in out.glob("*/metrics.json")} == expected_runs
    for name in expected_runs:
        record = json.loads((out / name / "metrics.json").read_text())
        assert 0.0 <= record["test_accuracy"] <= 1.0
        assert record["params"] > 0 and record["flops"] > 0
        assert record["config"]["epochs"] == 2 and record["seed"] == 0
        assert len(record["history"]) == 2 and "tensorflow" in record["environment"]
        assert (out / name / "model.weights.h5").exists()
    kd = json.loads((out / "kd-T4-a0.5-s0" / "metrics.json").read_text())
    assert set(kd["history"][0]) >= {"ce", "kd", "loss", "test_accuracy"}
    assert 0.0 <= kd["test_ece"] <= 1.0 and 0.0 <= kd["val_ece"] <= 1.0
    with np.load(out / "kd-T4-a0.5-s0" / "test_outputs.npz") as saved:
        assert saved["logits"].shape == (128, 10)
        assert training.accuracy(saved["logits"], saved["labels"]) == kd["test_accuracy"]
        assert expected_calibration_error(saved["logits"], saved["labels"]) == pytest.approx(kd["test_ece"])
    assert kd["params"] == 1_238_730
    with np.load(out / "kd-T4-a0.5-s0" / "test_outputs.npz") as mine, np.load(out / "teacher-s0" / "test_outputs.npz") as t:
        agree = np.mean(np.argmax(mine["logits"], 1) == np.argmax(t["logits"], 1))
    assert kd["distilled_from"] == "teacher-s0" and kd["test_fidelity"] == pytest.approx(agree)
    takd = json.loads((out / "ta-takd-T4-a0.5-s0" / "metrics.json").read_text())
    assert takd["distilled_from"] == "ta-T4-a0.5-s0"  # its own teacher: the assistant
    sftn = json.loads((out / "sftn-T4-a0.5-tw1-bcw1-bkw3-bt1-s0" / "metrics.json").read_text())
    assert sftn["distilled_from"] == "sftn-teacher-tw1-bcw1-bkw3-bt1-s0"  # its student-friendly teacher
    sftn_teacher = json.loads((out / "sftn-teacher-tw1-bcw1-bkw3-bt1-s0" / "metrics.json").read_text())
    assert {"ce", "branch_ce", "branch_kl"} <= set(sftn_teacher["history"][0])
    assert sftn_teacher["params"] == 1_011_466  # the branches are dropped
    cid = json.loads((out / "cid-T4-kw1-sw33-cw0.1-ie1-dm0-s0" / "metrics.json").read_text())
    assert cid["params"] == 1_238_730 + (2 * 784 + 1) * 10 + 10 * 784 + 1  # + the head g, D and "active"
    assert cid["history"][0]["ce"] == 0.0 and cid["history"][1]["ce"] > 0.0  # g trains after init_epochs
    exported = {(r["model"], r["variant"]) for r in csv.DictReader(open(out / "export-s0.csv"))}
    assert {("cid", "float32"), ("extractive", "int8"), ("sftn", "dynamic_int8")} <= exported
    skd_teacher = json.loads((out / "skd-teacher-S4-s0" / "metrics.json").read_text())
    assert set(skd_teacher["history"][0]) >= {"ce", "aux"} and skd_teacher["params"] == 1_011_466 + 30 * 129
    assert results["teacher"]["test_accuracy"] > 0.9  # the synthetic task is learnable
    assert results["skd"]["teacher"]["test_accuracy"] > 0.9  # accuracy uses logsumexp class logits
    # The grid reuses the KD cell (same T, alpha, seed) instead of training it again.
    assert len(results["grid"]["cells"]) == 2
    assert results["grid"]["best"]["test_accuracy"] == max(c["test_accuracy"] for c in results["grid"]["cells"])
    # TAKD compares against BLKD, which is the plain KD run.
    takd = {r["model"]: r for r in results["takd"]}
    assert takd["student from teacher (BLKD)"]["run"] == "kd-T4-a0.5-s0"
    # ESKD: the epoch-1 checkpoint and the final teacher.
    assert [r["teacher_epoch"] for r in results["eskd"]] == [1, 2]
    assert results["eskd"][1]["run"] == "kd-T4-a0.5-s0"
    assert (out / "teacher-s0" / "checkpoints" / "epoch-01.weights.h5").exists()
    entropy = [r["entropy_nats"] for r in results["entropy"]]
    assert entropy == sorted(entropy) and entropy[-1] <= np.log(10) + 1e-6
    for kind in ("lime", "occlusion"):
        record = json.loads((out / "explain" / f"{kind}-s0.json").read_text())
        assert set(record["agreement"]) == {"teacher vs kd_student", "teacher vs scratch_student",
                                            "kd_student vs scratch_student"}
        saved = np.load(out / "explain" / f"{kind}-s0.npz")
        assert saved["images"].shape == (2, 28, 28, 1) and saved["map__teacher"].shape[0] == 2
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert sorted(r["run"] for r in rows) == sorted(expected_runs)
    flops = list(csv.DictReader(open(out / "flops.csv")))
    assert [int(r["params"]) for r in flops][:3] == [1_011_466, 1_238_730, 108_618]

    # Resume: a second invocation skips every finished run and changes nothing.
    stamps = {name: (out / name / "metrics.json").stat().st_mtime_ns for name in expected_runs}
    messages = []
    run_all(config, arrays=synthetic_mnist, log=messages.append)
    assert {name: (out / name / "metrics.json").stat().st_mtime_ns for name in expected_runs} == stamps
    # Every run is found finished (the SFTN teacher is not even loaded: its student is finished too).
    assert sum("finished earlier, skipping" in m for m in messages) >= len(expected_runs) + 1
    assert not any("[sftn-teacher" in m for m in messages)
    assert not any("LIME image" in m for m in messages)
    assert not any("epoch 1/" in m for m in messages)


@pytest.mark.slow
def test_eskd_uses_the_checkpoint_of_the_requested_epoch(tmp_path, synthetic_mnist):
    config = small_config(tmp_path, epochs=3, teacher_epochs=(1,), only=("eskd",))
    task = Task1(config, arrays=synthetic_mnist)
    task.eskd()
    name, final = task.teacher_model()
    label, early = task.checkpoint_model(name, 1)
    assert label == "teacher-s0-epoch01"
    assert not all(np.array_equal(a, b) for a, b in zip(early.get_weights(), final.get_weights()))
    # The student of the epoch-1 run was trained on exactly the epoch-1 teacher's logits.
    np.testing.assert_allclose(task.logits_of(label), task.logits_of(label, early), rtol=1e-6)
    assert not np.allclose(task.logits_of(label), task.logits_of(name))
    with pytest.raises(mnist.DataError, match="no checkpoint of epoch 2"):
        (tmp_path / "out" / "teacher-s0" / "checkpoints" / "epoch-02.weights.h5").unlink()
        task.checkpoint_model(name, 2)


@pytest.mark.slow
def test_chain_of_one_link_is_plain_kd(tmp_path, synthetic_mnist):
    from task1_mnist.models import build_student

    config = small_config(tmp_path, only=("kd",))
    task = Task1(config, arrays=synthetic_mnist)
    (record,) = task.chain([("kd", build_student)])
    assert record["run"] == "kd-T4-a0.5-s0"
    assert task.kd() == record  # the same finished run, not a second training
    # ...and it equals KD done by hand with the same seed, data order and loss.
    import keras

    from kdtoolkit import methods, training
    from kdtoolkit.runner import runs

    logits = task.logits_of(*task.teacher_model())
    runs.set_seed(0)
    student = build_student()
    training.fit(methods.Distillation(student, temperature=4.0, alpha=0.5), task.train_dataset(task.train_data(teacher_logits=logits)),
                 epochs=2, optimizer=keras.optimizers.Adam(1e-3))
    assert task.evaluate(student)["test_accuracy"] == record["test_accuracy"]


@pytest.mark.slow
def test_seeds_give_mean_and_std(tmp_path, synthetic_mnist):
    config = small_config(tmp_path, seeds=(0, 1), only=("scratch",))
    run_all(config, arrays=synthetic_mnist)
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary_by_experiment.csv")))
    (row,) = rows
    accs = [json.loads((tmp_path / "out" / f"scratch-s{s}" / "metrics.json").read_text())["test_accuracy"] for s in (0, 1)]
    assert row["group"] == "scratch" and row["n_seeds"] == "2" and row["seeds"] == "0 1"
    assert float(row["test_accuracy_mean"]) == pytest.approx(np.mean(accs), abs=1e-6)
    assert float(row["test_accuracy_std"]) == pytest.approx(np.std(accs, ddof=1), abs=1e-6)


@pytest.mark.slow
def test_interrupted_grid_resumes_only_missing_cells(tmp_path, synthetic_mnist):
    config = small_config(tmp_path, temperatures=(2.0, 8.0), only=("grid",))
    Task1(config, arrays=synthetic_mnist).run()
    (tmp_path / "out" / "kd-T8-a0.5-s0" / "metrics.json").unlink()  # as if killed mid-run
    messages = []
    Task1(config, arrays=synthetic_mnist, log=messages.append).run()
    trained = [m for m in messages if "] training:" in m]
    assert len(trained) == 1 and "kd-T8-a0.5-s0" in trained[0]


def weights_of(path):
    from task1_mnist.models import build_student

    model = build_student()
    model.load_weights(path)
    return model.get_weights()


@pytest.mark.slow
@pytest.mark.parametrize("fuse_grid, form", [("on", "looped"), ("stacked", "stacked")])
def test_a_fused_grid_trains_each_cell_as_it_would_alone(tmp_path, synthetic_mnist, fuse_grid, form):
    # Looped cells run alone's very ops; stacked ones on a CPU run alone's matrix products
    # (one per cell) with the cells' losses computed together. On a GPU they take one batched
    # product and sum their bias gradients in another order; Adam divides each update by the
    # gradient's running size, so where gradients are near 0 a few weights move by a fraction
    # of one step (lr 1e-3): with batched products on a CPU, 2e-5 at most, on 3 of 614,656.
    tolerance = 1e-4 if form == "stacked" and batched_products() else 1e-6
    grid = dict(temperatures=(1.0, 4.0), alphas=(0.2, 0.8), only=("grid",))  # 1 - 0.8: see test_training
    messages = []
    fused = Task1(small_config(tmp_path / "fused", fuse_grid=fuse_grid, **grid), arrays=synthetic_mnist,
                  log=messages.append).run()["grid"]
    alone = Task1(small_config(tmp_path / "alone", fuse_grid="off", **grid), arrays=synthetic_mnist).run()["grid"]
    assert sum(f"training 4 runs in one {form} step" in m for m in messages) == 1
    assert not any("] training:" in m and "kd-" in m for m in messages)  # no cell trained on its own
    assert [c["run"] for c in fused["cells"]] == [c["run"] for c in alone["cells"]]
    for cell in fused["cells"]:
        name = cell["run"]
        records = [json.loads((tmp_path / d / "out" / name / "metrics.json").read_text()) for d in ("fused", "alone")]
        assert records[0]["identity"] == records[1]["identity"]
        assert records[0]["fused"]["runs"] == 4 and records[0]["fused"]["form"] == form
        assert "fused" not in records[1]
        for a, b in zip(*(weights_of(tmp_path / d / "out" / name / "model.weights.h5") for d in ("fused", "alone"))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=tolerance)
        for key in ("loss", "ce", "kd", "train_accuracy", "val_accuracy", "test_accuracy"):
            assert [h[key] for h in records[0]["history"]] == pytest.approx([h[key] for h in records[1]["history"]],
                                                                            rel=1e-5, abs=1e-6), key
        assert records[0]["test_fidelity"] == records[1]["test_fidelity"]
    assert not list((tmp_path / "fused" / "out").glob("fused-*"))  # the group's resume state is gone
    # Finished cells are not trained again; one missing cell trains alone.
    (tmp_path / "fused" / "out" / "kd-T4-a0.2-s0" / "metrics.json").unlink()
    messages = []
    Task1(small_config(tmp_path / "fused", fuse_grid=fuse_grid, **grid), arrays=synthetic_mnist,
          log=messages.append).run()
    assert [m for m in messages if "] training" in m] == [next(m for m in messages if "] training:" in m)]
    assert "kd-T4-a0.2-s0" in next(m for m in messages if "] training:" in m)


@pytest.mark.slow
def test_the_course_kd_run_trains_as_a_cell_of_the_fused_grid(tmp_path, synthetic_mnist):
    messages = []
    config = small_config(tmp_path, fuse_grid="on", temperatures=(1.0, 4.0), alphas=(0.2, 0.5), only=("kd", "grid"))
    outcome = Task1(config, arrays=synthetic_mnist, log=messages.append).run()
    assert sum("training 4 runs in one looped step" in m for m in messages) == 1
    assert not any("] training:" in m and "kd-" in m for m in messages)  # no student alone, kd included
    assert outcome["kd"]["run"] == "kd-T4-a0.5-s0" and outcome["kd"]["fused"]["runs"] == 4
    assert "kd-T4-a0.5-s0" in [c["run"] for c in outcome["grid"]["cells"]]


@pytest.mark.slow
@pytest.mark.parametrize("fuse_grid", ["on", "stacked"])
def test_a_fused_grid_killed_mid_training_resumes(tmp_path, synthetic_mnist, fuse_grid):
    def killed_after_epoch_2(message):
        if "[fused-" in message and "] epoch 2/3" in message:
            raise KeyboardInterrupt

    grid = dict(temperatures=(1.0, 4.0), alphas=(0.5,), only=("grid",), epochs=3, fuse_grid=fuse_grid)
    with pytest.raises(KeyboardInterrupt):
        Task1(small_config(tmp_path / "killed", **grid), arrays=synthetic_mnist, log=killed_after_epoch_2).run()
    messages = []
    Task1(small_config(tmp_path / "killed", **grid), arrays=synthetic_mnist, log=messages.append).run()
    assert any("resuming after epoch 2/3" in m for m in messages)
    Task1(small_config(tmp_path / "whole", **grid), arrays=synthetic_mnist).run()
    for name in ("kd-T1-a0.5-s0", "kd-T4-a0.5-s0"):
        resumed, whole = (json.loads((tmp_path / d / "out" / name / "metrics.json").read_text())
                          for d in ("killed", "whole"))
        assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in whole["history"]],
                                                                        rel=1e-6)
        assert [h.get("resumed", False) for h in resumed["history"]] == [True, True, False]


@pytest.mark.slow
def test_a_fused_grid_stopped_while_recording_records_the_rest_as_the_same_group(tmp_path, synthetic_mnist,
                                                                                monkeypatch):
    """Killed after 2 of its 4 cells were recorded, the group is resumed as the group of
    4 it was (its members kept in its folder; a group of the 2 left would round
    otherwise) and records only the 2, as the uninterrupted group did; the 2 recorded
    are not written again."""
    from kdtoolkit.runner import runs

    grid = dict(temperatures=(1.0, 4.0), alphas=(0.2, 0.8), only=("grid",), epochs=2, fuse_grid="on")
    finish, calls = runs.finish, []

    def killed_after_two_records(*args, **kwargs):
        if args[1].startswith("kd-"):  # the grid's cells (the teacher is recorded first)
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(args[1])
        return finish(*args, **kwargs)

    monkeypatch.setattr(runs, "finish", killed_after_two_records)
    with pytest.raises(KeyboardInterrupt):
        Task1(small_config(tmp_path / "killed", **grid), arrays=synthetic_mnist).run()
    monkeypatch.setattr(runs, "finish", finish)
    out = tmp_path / "killed" / "out"
    first = {name: (out / name / "metrics.json").read_bytes() for name in calls}
    (group,) = out.glob("fused-*")
    assert json.loads((group / "members.json").read_text()) == [f"kd-T{t}-a{a}-s0" for t in (1, 4) for a in (0.2, 0.8)]
    messages = []
    Task1(small_config(tmp_path / "killed", **grid), arrays=synthetic_mnist, log=messages.append).run()
    assert any("training 4 runs in one looped step" in m for m in messages)
    assert any("recorded 2 of its 4 runs" in m for m in messages)
    assert {name: (out / name / "metrics.json").read_bytes() for name in calls} == first
    Task1(small_config(tmp_path / "whole", **grid), arrays=synthetic_mnist).run()
    for name in (f"kd-T{t}-a{a}-s0" for t in (1, 4) for a in (0.2, 0.8)):
        resumed, whole = (json.loads((tmp_path / d / "out" / name / "metrics.json").read_text())
                          for d in ("killed", "whole"))
        assert resumed["fused"]["runs"] == whole["fused"]["runs"] == 4
        assert resumed["test_accuracy"] == whole["test_accuracy"]
        assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in whole["history"]],
                                                                        rel=1e-6)
        for a, b in zip(*(weights_of(tmp_path / d / "out" / name / "model.weights.h5") for d in ("killed", "whole"))):
            np.testing.assert_array_equal(a, b)
    assert not list(out.glob("fused-*"))


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_from_its_last_epoch(tmp_path, synthetic_mnist):
    def killed_after_epoch_2(message):
        if "[scratch-s0] epoch 2/3" in message:
            raise KeyboardInterrupt

    config = small_config(tmp_path / "killed", epochs=3, only=("scratch",))
    with pytest.raises(KeyboardInterrupt):
        run_all(config, arrays=synthetic_mnist, log=killed_after_epoch_2)
    messages = []
    run_all(config, arrays=synthetic_mnist, log=messages.append)
    assert any("resuming after epoch 2/3" in m for m in messages)
    assert [m.split("] ")[1][:9] for m in messages if "] epoch " in m] == ["epoch 3/3"]
    run_all(small_config(tmp_path / "whole", epochs=3, only=("scratch",)), arrays=synthetic_mnist)
    resumed, whole = (json.loads((tmp_path / d / "out" / "scratch-s0" / "metrics.json").read_text())
                      for d in ("killed", "whole"))
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in whole["history"]], rel=1e-6)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert not (tmp_path / "killed" / "out" / "scratch-s0" / "resume").exists()  # dropped once finished
    # The first invocation's two epochs count in the run's time.
    earlier = sum(h["seconds"] + h["eval_seconds"] for h in resumed["history"][:2])
    assert resumed["resumed_seconds"] == pytest.approx(earlier) and resumed["wall_seconds"] > earlier
    assert [h.get("resumed", False) for h in resumed["history"]] == [True, True, False]
    timings = [json.loads(line) for line in (tmp_path / "killed" / "out" / "timings.jsonl").read_text().splitlines()]
    assert [t["finished"] for t in timings] == [False, True]  # the killed invocation is counted too


@pytest.mark.slow
@pytest.mark.parametrize("method", list(methods.REGISTRY))
def test_each_method_killed_mid_run_resumes_with_its_extra_variables(method, tmp_path, synthetic_mnist):
    """Every registered method: killed after epoch 2 of 3, the rerun continues from the
    saved epoch (model, optimizer and the method's regressor, heads, memory banks and
    random state) and ends exactly where an uninterrupted run ends."""
    def killed_after_epoch_2(message):
        if f"[{method}-" in message and "] epoch 2/3" in message:
            raise KeyboardInterrupt

    config = small_config(tmp_path / "killed", epochs=3, only=(method,), method_options={"crd": {"negatives": 64}})
    with pytest.raises(KeyboardInterrupt):
        run_all(config, arrays=synthetic_mnist, log=killed_after_epoch_2)
    state = next((tmp_path / "killed" / "out").glob(f"{method}-*/resume/state.npz"))
    with np.load(state) as saved:
        extra = [k for k in saved.files if k.startswith("var:extra/")]
    # Their regressor / heads and memory, CID's regressor and dictionary sums, SFTN's teacher's branches.
    assert bool(extra) == (method in ("fitnets", "crd", "cid", "sftn", "vid"))
    messages = []
    run_all(config, arrays=synthetic_mnist, log=messages.append)
    assert any("resuming after epoch 2/3" in m for m in messages)
    run_all(small_config(tmp_path / "whole", epochs=3, only=(method,), method_options={"crd": {"negatives": 64}}),
            arrays=synthetic_mnist)
    # The student (SFTN's sorts before its teacher, "sftn-T4-..." < "sftn-teacher-...").
    resumed, whole = (sorted((tmp_path / d / "out").glob(f"{method}-*/metrics.json"))[0] for d in ("killed", "whole"))
    resumed, whole = json.loads(resumed.read_text()), json.loads(whole.read_text())
    terms = methods.get(method).term_names
    assert set(terms) <= set(whole["history"][0])  # each named loss term is logged
    for name in ("loss", *terms):
        assert [h[name] for h in resumed["history"]] == pytest.approx([h[name] for h in whole["history"]], rel=1e-6)
    assert resumed["test_accuracy"] == whole["test_accuracy"]


@pytest.mark.slow
def test_export_measures_each_tflite_file_against_its_keras_model(tmp_path, synthetic_mnist):
    config = small_config(tmp_path, only=("teacher", "kd", "scratch", "dkd", "export"))
    rows = run_all(config, arrays=synthetic_mnist)[0]["export"]
    out = tmp_path / "out"
    assert {(r["model"], r["variant"]) for r in rows} == {
        (m, v) for m in ("teacher", "kd", "scratch", "dkd") for v in ("float32", "dynamic_int8", "int8")}
    task = Task1(config, arrays=synthetic_mnist)
    images, labels = task.test_arrays()
    from kdtoolkit.deploy import export
    from task1_mnist.models import build_student

    with device.dtype_policy("float32"):  # as exported, whatever precision the run trained at (default: auto)
        student = build_student()
    student.load_weights(out / "kd-T4-a0.5-s0" / "model.weights.h5")
    keras_logits = student.predict(images, verbose=0)
    for variant, tolerance in (("float32", 1e-4), ("dynamic_int8", 0.3), ("int8", 0.3)):
        content = (out / "export" / "kd-T4-a0.5-s0" / f"{variant}.tflite").read_bytes()
        logits = export.LiteModel(content).logits(images)
        assert np.max(np.abs(logits - keras_logits)) < tolerance * max(1.0, np.abs(keras_logits).max())
        row = next(r for r in rows if r["model"] == "kd" and r["variant"] == variant)
        assert row["tflite_test_accuracy"] == training.accuracy(logits, labels)
        assert row["size_bytes"] == len(content)
        assert 0 < row["latency_ms_q1"] <= row["latency_ms_median"] <= row["latency_ms_q3"]
        assert row["drop"] == pytest.approx(row["keras_test_accuracy"] - row["tflite_test_accuracy"])
    sizes = {r["variant"]: r["size_bytes"] for r in rows if r["model"] == "kd"}
    assert sizes["dynamic_int8"] < sizes["float32"] / 3  # int8 weights: about a quarter of the bytes
    assert list(csv.DictReader(open(out / "export-s0.csv")))[0]["runtime"].startswith(("ai-edge-litert", "tf.lite"))
    # A second invocation reuses the files and their measurements.
    messages = []
    run_all(config, arrays=synthetic_mnist, log=messages.append)
    assert any("[export kd-T4-a0.5-s0] int8:" in m for m in messages)
    assert not any(word in m for m in messages for word in ("scoring", "converting", "timing"))
    # A new file has every file timed again, together: one table, one timing session.
    for stale in (out / "export" / "scratch-s0").glob("*"):
        stale.unlink()
    messages = []
    again = run_all(config, arrays=synthetic_mnist, log=messages.append)[0]["export"]
    assert sum("converting" in m for m in messages) == 3 and sum("timing 12 files" in m for m in messages) == 1
    assert {r["latency_ms_median"] for r in again}.isdisjoint(r["latency_ms_median"] for r in rows)


@pytest.mark.slow
def test_same_seed_repeats_a_run_exactly(tmp_path, synthetic_mnist, repeatable_gpu):
    records = []
    for folder in ("a", "b"):
        config = small_config(tmp_path / folder, only=("kd",))
        records.append(Task1(config, arrays=synthetic_mnist).kd())
    assert records[0]["history"][-1]["loss"] == records[1]["history"][-1]["loss"]
    assert records[0]["test_accuracy"] == records[1]["test_accuracy"]


@pytest.mark.slow
def test_mirrored_strategy_recipe_matches_default(tmp_path, synthetic_mnist, repeatable_gpu):
    records = []
    for strategy in ("none", "mirrored"):
        config = small_config(tmp_path / strategy, only=("kd",), distribute=strategy)
        records.append(Task1(config, arrays=synthetic_mnist).kd())
    assert records[1]["config"]["distribute"] == "mirrored"
    assert records[1]["history"][-1]["loss"] == pytest.approx(records[0]["history"][-1]["loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fuse_grid", ["on", "stacked"])
def test_a_fused_grid_under_a_mirrored_strategy_matches_default(tmp_path, synthetic_mnist, repeatable_gpu, fuse_grid):
    for strategy in ("none", "mirrored"):
        config = small_config(tmp_path / strategy, only=("grid",), temperatures=(1.0, 4.0), alphas=(0.5,),
                              fuse_grid=fuse_grid, distribute=strategy)
        cells = Task1(config, arrays=synthetic_mnist).grid()["cells"]
    for cell in cells:
        records = [json.loads((tmp_path / d / "out" / cell["run"] / "metrics.json").read_text())
                   for d in ("none", "mirrored")]
        assert records[1]["config"]["distribute"] == "mirrored" and records[1]["fused"]["runs"] == 2
        assert records[1]["history"][-1]["loss"] == pytest.approx(records[0]["history"][-1]["loss"], rel=1e-4)


@pytest.mark.slow
def test_real_mnist_slice_end_to_end(tmp_path, real_mnist_dir, capsys):
    status = cli.main(
        ["--data-dir", str(real_mnist_dir), "--out", str(tmp_path / "r"), "--limit", "1024", "--validation", "100",
         "--epochs", "1", "--only", "teacher,kd,scratch", "--quiet"]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "teacher-s0" in printed and "kd-T4-a0.5-s0" in printed
    record = json.loads((tmp_path / "r" / "teacher-s0" / "metrics.json").read_text())
    assert record["identity"]["train_examples"] == 924 and record["identity"]["validation_examples"] == 100
    assert record["test_accuracy"] > 0.5


def test_load_real_mnist_shapes(real_mnist_dir):
    arrays = mnist.load_mnist(real_mnist_dir)
    assert arrays["x_train"].shape == (60000, 28, 28, 1) and arrays["x_train"].dtype == np.uint8
    assert arrays["x_test"].shape == (10000, 28, 28, 1) and arrays["y_test"].shape == (10000,)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "0"], "temperature"),
        (["--temperatures", "1,-2"], "temperature"),
        (["--alpha", "1.5"], "alpha"),
        (["--alphas", "0.5,-0.1"], "alpha"),
        (["--epochs", "0"], "--epochs"),
        (["--seeds", "0,0"], "--seeds"),
        (["--epochs", "3", "--teacher-epochs", "5"], "--teacher-epochs"),
        (["--aux-temperature", "0"], "temperature"),
        (["--only", "teacher,nonsense"], "--only"),
        (["--data-dir", "/no/such/folder"], "--data-dir"),
        (["--deterministic", "--jit", "on"], "--jit off"),
        (["--fuse-grid", "stacked", "--precision", "mixed_float16"], "one loss scale"),
        (["--temperature", "1e9"], "--temperature 1e+09 is above 7.3e+08"),
        (["--temperatures", "1,4,1e12"], "--temperatures 1e+12 is above 7.3e+08"),
        (["--temperature", "1e-30"], "--temperature 1e-30 is below 1.1e-19"),
        (["--aux-temperature", "1e10"], "--aux-temperature 1e+10 is above"),
        (["--alpha", "1e-9"], "--alpha 1e-09 weights the hard-label term"),
        (["--alphas", "0.5,0.9999999999"], "--alphas 0.9999999999 weights the distillation term"),
    ],
)
def test_cli_bad_input_is_one_line_error(argv, message, tmp_path, capsys):
    status = cli.main([*argv, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_missing_data_dir_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    with pytest.raises(mnist.DataError, match="--data-dir"):
        mnist.load_mnist(tmp_path)  # a folder with no mnist.npz


def test_offline_download_failure_names_data_dir(monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(mnist.DataError, match="could not download MNIST.*--data-dir"):
        mnist.load_mnist()


def test_env_var_and_file_path_locate_the_data(tmp_path, monkeypatch):
    x = np.zeros((4, 28, 28), np.uint8)
    y = np.arange(4, dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path))
    assert mnist.load_mnist()["x_train"].shape == (4, 28, 28, 1)
    monkeypatch.delenv(mnist.ENV_VAR)
    assert mnist.load_mnist(tmp_path / "mnist.npz", limit=2)["y_test"].tolist() == [0, 1]


def test_npz_with_wrong_layout_is_rejected(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((4, 28, 28)), y_train=np.zeros(3))
    with pytest.raises(mnist.DataError, match="missing array"):
        mnist.load_mnist(tmp_path)
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((4, 28, 28)), y_train=np.zeros(3),
             x_test=np.zeros((2, 28, 28)), y_test=np.zeros(2))
    with pytest.raises(mnist.DataError, match="x_train has shape"):
        mnist.load_mnist(tmp_path)


def write_npz(folder, **changes):
    """A small valid `mnist.npz` in `folder` with arrays replaced by `changes`."""
    x = (np.arange(6 * 28 * 28) % 256).astype(np.uint8).reshape(6, 28, 28)
    arrays = {"x_train": x, "y_train": np.arange(6, dtype=np.uint8), "x_test": x[:4], "y_test": np.arange(4)}
    arrays.update(changes)
    np.savez(folder / "mnist.npz", **arrays)
    return arrays


def test_float_images_in_either_scale_are_scaled_to_uint8(tmp_path):
    x = write_npz(tmp_path)["x_train"]
    for stored in (x / 255.0, x.astype(np.float32) / 255, x.astype(np.float64), x.astype(np.int16)):
        write_npz(tmp_path, x_train=stored, x_test=stored[:4])
        loaded = mnist.load_mnist(tmp_path)
        assert loaded["x_train"].dtype == np.uint8 and np.array_equal(loaded["x_train"][..., 0], x)
        assert np.array_equal(loaded["x_test"][..., 0], x[:4])


@pytest.mark.parametrize("changes, message", [
    ({"x_train": np.full((6, 28, 28), 0.5) * np.array([1, 1, np.nan, 1, 1, np.inf])[:, None, None]},
     r"x_train: 1568 pixel values are NaN or infinite \(e.g. nan at index \(2, 0, 0\)\)"),
    ({"x_test": np.full((4, 28, 28), -0.5)}, r"x_test: float pixels span \[-0.5, -0.5\]"),
    ({"x_train": np.full((6, 28, 28), 300.0)}, "x_train: float pixels span"),
    ({"x_train": np.full((6, 28, 28), 256, np.int32)}, "x_train: 4704 pixel values outside 0..255"),
    ({"x_train": np.full((6, 28, 28), "a")}, "x_train: images of dtype <U1"),
    ({"y_train": np.array([0, 1, 2, 10, 4, 5])}, r"y_train: 1 labels outside 0..9 \(e.g. 10 at index 3\)"),
    ({"y_test": np.array([0, -1, 2, 3])}, "y_test: 1 labels outside 0..9"),
    ({"y_test": np.array([0, 1.5, 2, 3])}, "y_test: 1 labels are not whole numbers"),
    ({"y_test": np.eye(10)[:4]}, r"y_test: labels of shape \(4, 10\)"),
])
def test_npz_with_bad_values_is_one_line_naming_the_file(tmp_path, changes, message):
    write_npz(tmp_path, **changes)
    with pytest.raises(mnist.DataError, match=message) as err:
        mnist.load_mnist(tmp_path)
    assert str(tmp_path / "mnist.npz") in str(err.value) and "\n" not in str(err.value)


def test_image_and_label_checks_are_pure_and_copy_nothing_valid():
    from kdtoolkit.data import check_images, check_labels

    x = np.zeros((3, 28, 28, 1), np.uint8)
    assert check_images(x, "x", shape=(28, 28, 1)) is x
    assert check_images(np.full((2, 2), 1.0), "x", to="float").tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert check_images(np.full((2, 2), 255.0), "x", to="float").dtype == np.float32
    with pytest.raises(mnist.DataError, match=r"x: images of shape \(28, 28, 1\), expected \(32, 32, 3\)"):
        check_images(x, "x", shape=(32, 32, 3))
    y = np.array([0, 9, 3], np.uint8)
    assert check_labels(y, 10, "y") is y
    assert check_labels(np.array([[1.0], [2.0]]), 3, "y").tolist() == [1, 2]
    with pytest.raises(mnist.DataError, match="y: 1 labels outside 0..1"):
        check_labels(np.array([0, 1, 2]), 2, "y")


def disturb_random_state(seed):
    """Leaves every global generator (Python, NumPy, TensorFlow, Keras) in another state,
    as runs before it in the same process would."""
    import keras

    keras.utils.set_random_seed(seed)
    np.random.default_rng(seed).random(seed % 7 + 1)


@pytest.mark.slow
def test_a_run_alone_equals_the_same_run_after_others(tmp_path, synthetic_mnist):
    disturb_random_state(123)
    alone = Task1(small_config(tmp_path / "alone", only=("scratch",)), arrays=synthetic_mnist).run()["scratch"]
    disturb_random_state(7)
    after = Task1(small_config(tmp_path / "after", only=("teacher", "kd", "scratch")),
                  arrays=synthetic_mnist).run()["scratch"]
    assert [h["loss"] for h in alone["history"]] == [h["loss"] for h in after["history"]]
    assert alone["test_accuracy"] == after["test_accuracy"]


def test_bad_files_and_folders_are_one_line_errors_before_any_training(tmp_path, real_mnist_dir, capsys):
    truncated = tmp_path / "mnist.npz"
    truncated.write_bytes((real_mnist_dir / "mnist.npz").read_bytes()[:3_000_000])
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [
        (["--data-dir", str(truncated), "--out", str(tmp_path / "o")], "truncated or corrupt"),
        (["--data-dir", str(real_mnist_dir), "--out", str(a_file)], "is a file, not a folder"),
        (["--data-dir", str(real_mnist_dir), "--out", "/proc/kd-results"], "cannot write results there"),
    ]
    for argv, message in cases:
        status = cli.main([*argv, "--only", "scratch", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert status == 2 and err.startswith("error:") and message in err and "\n" not in err, err
    assert a_file.read_text() == "not a folder"
    assert not any((tmp_path / "o").glob("*/metrics.json"))


def test_a_diverging_run_is_an_error_and_is_not_recorded(tmp_path, synthetic_mnist, capsys):
    np.savez(tmp_path / "mnist.npz", **{k: v[..., 0] if k.startswith("x") else v for k, v in synthetic_mnist.items()})
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--learning-rate", "1e30", "--epochs", "2",
            "--validation", "0", "--only", "scratch", "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "[scratch-s0] training diverged" in err and "lower the learning rate" in err and "\n" not in err
    assert not (tmp_path / "o" / "scratch-s0" / "metrics.json").exists()
    assert cli.main(argv) == 2  # a rerun trains (and fails) again: nothing was marked finished


@pytest.mark.slow
def test_explanations_belong_to_the_runs_they_explain(tmp_path, synthetic_mnist):
    config = small_config(tmp_path, only=("occlusion",), explain_images=1)
    run_all(config, arrays=synthetic_mnist)
    saved = json.loads((tmp_path / "out" / "explain" / "occlusion-s0.json").read_text())
    assert saved["settings"]["runs"]["kd_student"].startswith("kd-T4-a0.5-s0@")
    messages = []
    run_all(small_config(tmp_path, only=("occlusion",), explain_images=1, temperature=2.0), arrays=synthetic_mnist,
            log=messages.append)
    assert not any("occlusion-s0] finished earlier" in m for m in messages)  # another student: explained anew
    saved = json.loads((tmp_path / "out" / "explain" / "occlusion-s0.json").read_text())
    assert saved["settings"]["runs"]["kd_student"].startswith("kd-T2-a0.5-s0@")


def test_help_shows_defaults_as_typed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0)" in text and "(default: 0.2,0.5,0.8)" in text and "(default: 1,2,4,16,32,64)" in text
    assert "(0," not in text and "(default: False)" not in text and "(default: None)" not in text


def test_the_default_validation_split_scales_with_limit():
    from kdtoolkit.data import validation_count
    from task1_mnist.config import Task1Config

    share = Task1Config().validation
    assert validation_count(share, 60000) == 5000 and validation_count(share, 3000) == 250


class SignalledTask:
    """A stand-in task whose second experiment is stopped by `signal_number` sent to
    this very process, as a scheduler's SIGTERM or a Ctrl-C would arrive."""

    experiments = ("first", "second", "third")

    def __init__(self, root, signal_number):
        from kdtoolkit.runner.results import ResultsStore

        self.store, self.seed, self.signal_number = ResultsStore(root), 0, signal_number
        self.config = type("Config", (), {"only": self.experiments})()
        self.log = lambda _message: None

    def experiment(self, name):
        import os
        import time

        if name == "second":
            os.kill(os.getpid(), self.signal_number)
            time.sleep(5)  # the signal arrives here
            raise AssertionError("the signal did not stop the experiment")
        return name


@pytest.mark.parametrize("signal_name, status, line", [
    ("SIGTERM", 143, "terminated (SIGTERM): finished runs and epochs are saved and timed in timings.jsonl"),
    ("SIGINT", 130, "interrupted: finished runs are saved"),
])
def test_sigterm_stops_as_sigint_does_with_its_own_status_and_timings(tmp_path, capsys, signal_name, status, line):
    import signal

    from kdtoolkit.runner import cli as common_cli
    from kdtoolkit.runner.sessions import run_experiments

    before = signal.getsignal(signal.SIGTERM)
    task = SignalledTask(tmp_path, getattr(signal, signal_name))
    assert common_cli.main(lambda: run_experiments(task)) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith(line) and "\n" not in err
    timings = [json.loads(row) for row in (tmp_path / "timings.jsonl").read_text().splitlines()]
    assert [(t["experiment"], t["finished"], t.get("stopped_by")) for t in timings] == [
        ("first", True, None), ("second", False, signal_name)]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


@pytest.mark.slow
def test_a_task1_process_given_sigterm_saves_its_epochs_and_says_so(tmp_path, synthetic_mnist):
    """The command itself, as a scheduler stops it: SIGTERM mid-training ends it with one
    line and status 143, the finished experiment and the stopped one are in
    timings.jsonl, and the same command resumes after the last saved epoch."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    np.savez(tmp_path / "mnist.npz", **{k: v[..., 0] if k.startswith("x") else v for k, v in synthetic_mnist.items()})
    argv = [sys.executable, str(Path(__file__).resolve().parents[1] / "task1_mnist" / "run.py"), "--data-dir",
            str(tmp_path), "--out", str(tmp_path / "o"), "--only", "flops,scratch", "--epochs", "200",
            "--validation", "0", "--jit", "off"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "o" / "scratch-s0" / "resume" / "state.npz"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert state.exists(), process.communicate()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM)") and "Traceback" not in err
    timings = [json.loads(row) for row in (tmp_path / "o" / "timings.jsonl").read_text().splitlines()]
    assert [(t["experiment"], t["finished"], t.get("stopped_by")) for t in timings] == [
        ("flops", True, None), ("scratch", False, "SIGTERM")]
    assert state.exists() and not (tmp_path / "o" / "scratch-s0" / "metrics.json").exists()
