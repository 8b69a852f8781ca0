"""The benchmark scripts run end to end (tiny settings) and write their figures."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_bench_kd_smoke(tmp_path, real_mnist_dir):
    import bench_kd

    out = tmp_path / "kd.json"
    argv = ["--data-dir", str(real_mnist_dir), "--limit", "512", "--epochs", "1", "--grid-cells", "2",
            "--eager-steps", "2", "--steps-per-call", "4", "--teacher-weights", str(tmp_path / "none.h5"),
            "--out", str(out)]
    assert bench_kd.main(argv) == 0
    result = json.loads(out.read_text())
    methods = [r["method"] for r in result["kd_student"]]
    assert methods[0].startswith("toolkit (cached") and "toolkit, 4 steps per call" in methods
    assert "toolkit, XLA-compiled step" in methods and "keras.distillation.Distiller.fit" in methods
    assert all(r["images_per_s"] > 0 for r in result["kd_student"])
    assert result["speedup_vs_distiller"] > 0 and "devices" in result["environment"]
    grid = result["grid"]  # fused cells, in both forms, train exactly as they do one by one
    for form in ("looped", "stacked"):
        assert grid[f"{form}_accuracies"] == pytest.approx(grid["toolkit_accuracies"], abs=2 / 512)
        assert grid[f"{form}_first_epoch_seconds"] > 0 and grid[f"{form}_speedup"] > 0


@pytest.mark.slow
def test_bench_fused_forms_smoke(tmp_path):
    import bench_fused_forms

    out = tmp_path / "forms.json"
    assert bench_fused_forms.main(["--cells", "2", "--steps", "2", "--jit", "off", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    forms = result["forms"]
    assert set(forms) == {"alone", "looped", "stacked_per_member", "stacked_batched"}
    assert result["settings"]["cells"] == 2 and all(f["first_step_s"] > 0 and f["step_ms"] > 0 for f in forms.values())
    # A stacked step holds one student's graph and one loss for both cells.
    for stacked in ("stacked_per_member", "stacked_batched"):
        assert forms["alone"]["graph_ops"] < forms[stacked]["graph_ops"] < forms["looped"]["graph_ops"]


@pytest.mark.slow
def test_bench_finetune_smoke(tmp_path, mhist_dir, tiny_architectures):  # the wiring; real bases: test_task2
    import bench_finetune

    out = tmp_path / "finetune.json"
    argv = ["--data-dir", str(mhist_dir), "--image-size", "32", "--limit", "16", "--batch-size", "8",
            "--anchor-steps", "2", "--architectures", "mobilenetv2", "--out", str(out)]
    assert bench_finetune.main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["precisions"]) == ["float32", "mixed_bfloat16"]  # both, in one process
    for part in result["precisions"].values():
        (row,) = part["fine_tuning_images_per_s"]
        assert row["architecture"] == "mobilenetv2"
        assert all(row[k] > 0 for k in ("anchor", "toolkit", "keras_fit", "inference", "toolkit_first_epoch_s",
                                        "toolkit_fraction_of_peak"))
        assert row["roofline"]["peak_gflops"] > 0 and sum(row["roofline"]["flops_share"].values()) == pytest.approx(1)
        assert len(row["toolkit_epoch_s"]) == result["settings"]["epochs"] - 1 == 2  # the median of these is timed
        kd = part["kd_student_images_per_s"]
        assert kd["toolkit_cached_logits"] > 0 and kd["distiller_fit"] > 0
        assert part["course_estimate"] is None  # not every course architecture, not 224 px
    assert "devices" in result["environment"] and result["device"]["name"]


def test_the_course_work_is_counted_by_hand():
    import bench_finetune

    from kdtoolkit import methods

    # MHIST: 2,175 train images, 326 (15%) held out, 977 test; 8 views; 25 fine-tuning epochs.
    work = bench_finetune.course_work()
    fit, evaluated, views = 1849, 326 + 977, 8
    assert work["resnet50v2"] == {"models": 4, "finetune_images": 4 * 25 * fit,  # teacher, skd, sftn, random init
                                  "inference_images": 4 * 25 * evaluated + 2 * (views * fit + evaluated)
                                  + 3 * views * fit}
    assert work["densenet121"]["models"] == 1
    # kd, scratch; T curve; the other registered methods; skd, takd; init
    assert work["mobilenetv2"]["models"] == 2 + 5 + len(methods.OTHER_METHODS) + 2 + 1
    rows = [{"architecture": a, "toolkit": 10.0, "inference": 100.0} for a in work]
    estimate = bench_finetune.course_estimate(rows, 224)
    hours = sum(w["finetune_images"] / 10 + w["inference_images"] / 100 for w in work.values()) / 3600
    assert estimate["hours"] == pytest.approx(hours)
    assert bench_finetune.course_estimate(rows[:2], 224) is None


def test_a_models_roofline_weighs_each_layer_by_its_flops():
    import keras
    import roofline
    import tensorflow as tf

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, strides=2, padding="same"),
                              keras.layers.DepthwiseConv2D(3), keras.layers.Flatten(), keras.layers.Dense(5)])
    layers = roofline.weight_layers(model)
    # conv: 4x4x4 outputs x 3x3x3 each; depthwise: 2x2x4 outputs x 3x3 each; dense: 16 x 5
    assert [(kind, flops) for kind, _, flops in layers] == [
        ("conv", 2 * 64 * 27), ("depthwise", 2 * 16 * 9), ("matmul", 2 * 16 * 5)]
    found = roofline.model_roofline(model, 4, tf.float32, seconds=0.01)
    total = 2 * (64 * 27 + 16 * 9 + 16 * 5)
    assert found["forward_gflop_per_image"] == pytest.approx(total / 1e9) and found["distinct_shapes"] == 3
    assert found["flops_share"]["conv"] == pytest.approx(2 * 64 * 27 / total) and found["peak_gflops"] > 0


@pytest.mark.slow
def test_bench_shared_steps_smoke(tmp_path, mhist_dir):
    import bench_shared_steps

    out = tmp_path / "shared_steps.json"
    argv = ["--data-dir", str(mhist_dir), "--image-size", "32", "--limit", "16", "--fe-epochs", "1",
            "--ft-epochs", "1", "--only", "scratch", "--seeds", "0,1", "--out", str(out)]
    assert bench_shared_steps.main(argv) == 0  # seed 1's runs share seed 0's steps
    result = json.loads(out.read_text())
    runs = {"scratch-fe-s0", "scratch-ft-s0", "scratch-fe-s1", "scratch-ft-s1"}
    assert runs <= set(result["shared"]["runs"]) and set(result["shared"]["runs"]) == set(result["not_shared"]["runs"])
    assert all(result["same_test_auc"].values())  # sharing the compiled step changes no result
    assert result["shared"]["wall_s"] > 0 and "--no-share-steps" in result["not_shared"]["command"]
    assert all(run["later_cores_busy"] is None for run in result["shared"]["runs"].values())  # 1-epoch runs


@pytest.mark.slow
def test_bench_mhist_smoke(tmp_path, mhist_dir, tiny_architectures):
    import bench_mhist

    out = tmp_path / "mhist.json"
    argv = ["--data-dir", str(mhist_dir), "--image-size", "32", "--limit", "16", "--epochs", "2", "--out", str(out)]
    assert bench_mhist.main(argv) == 0
    result = json.loads(out.read_text())
    for part in ("feature_extraction", "kd_student_finetune"):
        assert all(seconds > 0 for name, seconds in result[part].items() if name.startswith("seconds"))
        # process CPU seconds per wall second: more than none, at most every core
        assert all(0 < cores <= os.cpu_count() + 0.5 for cores in result[part]["cores_busy"].values())
    assert "cores busy" in bench_mhist.format_table(result)


def test_run_times_of_a_results_folder(tmp_path):
    import run_times

    def write(run, history):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps({"run": run, "wall_seconds": 9.5, "history": history}))

    write("b-three-epochs", [{"seconds": 5.0, "cpu_seconds": 6.0}, {"seconds": 1.0, "cpu_seconds": 1.5},
                             {"seconds": 3.0, "cpu_seconds": 4.5}])
    write("a-one-epoch", [{"seconds": 2.0}])
    assert run_times.run_times(tmp_path) == [
        ("a-one-epoch", 9.5, 2.0, None, None),
        ("b-three-epochs", 9.5, 5.0, 2.0, 1.5),  # later epochs: (1 + 3) / 2 s, (1.5 + 4.5) / (1 + 3) cores
    ]


@pytest.mark.slow
def test_roofline_smoke(tmp_path):
    import roofline

    out = tmp_path / "roofline.json"
    result = roofline.main(["--examples", "512", "--epochs", "1", "--grid-cells", "2", "--seconds", "0.02",
                            "--precisions", "float32,mixed_bfloat16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"]["name"] and saved["device"]["kind"] in ("cpu", "gpu") and "cpu_flags" in saved["device"]
    for precision in ("float32", "mixed_bfloat16"):
        part = saved["precisions"][precision]
        assert set(part["peak_gflops"]) == set(roofline.KERNELS) and all(v > 0 for v in part["peak_gflops"].values())
        assert set(part["achieved"]) == {"teacher", "kd_student", "fused_grid"}
        assert all(r["gflops"] > 0 and r["fraction_of_peak"] > 0 for r in part["achieved"].values())
    grid, student = (saved["precisions"]["float32"]["achieved"][k]["training_flops_per_image"]
                     for k in ("fused_grid", "kd_student"))
    assert grid == 2 * student == 2 * 3 * 2_475_882  # the MLP's forward flops at batch 1, x3 for training
    assert result["precisions"].keys() == saved["precisions"].keys()
    # The Task 1 core: 55,000 training images x 12 epochs; 18 grid cells (the course's KD among them) + scratch.
    core = saved["precisions"]["float32"]["task1_core"]
    assert core["trained_images_per_model"] == 660_000 and core["student_models"] == 19
    assert core["students_tflop"] == pytest.approx(19 * 660_000 * 3 * 2_475_882 / 1e12)
    assert core["seconds_at_peak"] > 0 and core["seconds_at_achieved"] > 0


@pytest.mark.slow
def test_step_profile_smoke(tmp_path):
    import step_profile

    out = tmp_path / "profile.json"
    step_profile.main(["--seconds", "0.01", "--precisions", "float32", "--out", str(out)])
    saved = json.loads(out.read_text())["precisions"]["float32"]
    stages = ("forward", "gradients", "step", "step (XLA)", "fit")
    assert tuple(saved["teacher"]) == stages and tuple(saved["kd_student"]) == (*stages, "matmuls only")
    assert all(row["ms"] > 0 and row["cores_busy"] > 0 for model in saved.values() for row in model.values())
