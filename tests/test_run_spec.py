"""One run specification, method options from the command line to the loss, and the
speed machinery's view of a method."""

import dataclasses

import keras
import pytest

from kdtoolkit import methods
from kdtoolkit.speed import step_sharing
from kdtoolkit.methods.dkd import DKD
from kdtoolkit.files import identity_hash
from kdtoolkit.runner.run_spec import RunSpec, method_stem, run_tag
from task1_mnist import run as cli
from task1_mnist.experiments import Task1


def test_a_run_spec_gives_its_name_and_identity():
    spec = RunSpec("kd-T4-a0.5", "kd", 2, {"epochs": 12, "temperature": 4.0, "alpha": 0.5})
    assert spec.name == "kd-T4-a0.5-s2"
    assert spec.identity == {"experiment": "kd", "seed": 2, "epochs": 12, "temperature": 4.0, "alpha": 0.5}
    assert spec.identity_hash == identity_hash(spec.identity)
    fine_tuning = spec.phase("ft", epochs=25, phase="finetune")
    assert fine_tuning.name == "kd-T4-a0.5-ft-s2"
    assert fine_tuning.identity == {**spec.identity, "epochs": 25, "phase": "finetune"}
    assert spec.identity["epochs"] == 12  # frozen: the phase is a new spec


def test_run_names_show_the_method_and_its_settings():
    dkd = {"temperature": 4.0, "tckd_weight": 1.0, "nckd_weight": 8.0, "warmup": 20 / 240}
    assert run_tag(dkd) == "T4-tw1-nw8-w0.0833333"
    assert method_stem("dkd", ["dkd"], dkd) == "dkd-T4-tw1-nw8-w0.0833333"
    assert method_stem("dkd", ["ta", "takd"], dkd) == "ta-takd-dkd-T4-tw1-nw8-w0.0833333"
    assert method_stem("kd", ["ta"], {"temperature": 2.0, "alpha": 0.5}) == "ta-T2-a0.5"


def test_the_temperature_goes_from_the_command_line_into_each_methods_options(synthetic_mnist, tmp_path):
    config = cli.parse_config(["--out", str(tmp_path), "--temperature", "3", "--alpha", "0.25",
                             "--dkd-nckd-weight", "2"])
    task = Task1(config, arrays=synthetic_mnist)
    assert task.method_settings(methods.Distillation) == {"temperature": 3.0, "alpha": 0.25}
    settings = task.method_settings(DKD)
    assert settings == {"temperature": 3.0, "tckd_weight": 1.0, "nckd_weight": 2.0, "warmup": 20 / 240}
    method = task.factory(DKD)(keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                                 keras.layers.Dense(10)]))
    assert method.options == methods.make_options("dkd", {"temperature": 3.0, "nckd_weight": 2.0})
    assert task.method_settings(methods.Distillation, temperature=8) == {"temperature": 8.0, "alpha": 0.25}
    assert "temperature" not in task.method_settings(methods.get("rkd"))  # a method without one has none


def test_options_are_checked_where_a_method_is_made():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"--alpha must be a number >= 0 and <= 1, got 1.5"):
        methods.Distillation(model, alpha=1.5)
    with pytest.raises(ValueError, match=r"--temperature must be a number > 0, got 0"):
        methods.make_options("dkd", {"temperature": 0})
    with pytest.raises(ValueError, match=r"--dkd-nckd-weight must be a number >= 0, got nan"):
        methods.make_options("dkd", {"nckd_weight": float("nan")})
    shared = {"temperature": 2, "alpha": 0.1}
    assert methods.make_options("rkd", {}, shared) == methods.get("rkd").Options()  # no T: nothing taken
    assert methods.make_options("kd", {}, shared).temperature == 2.0  # an int given for a float option


def test_only_registered_classes_share_steps_and_kd_cells_share_one_loss():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])

    class ChangedLoss(methods.Distillation):
        pass

    cells = [methods.Distillation(model, temperature=t, alpha=a) for t, a in ((1.0, 0.2), (4.0, 0.9))]
    assert step_sharing.signature(cells[0]) == (id(None),)
    assert step_sharing.runtime_settings(cells[0]) == ("temperature", "alpha")
    assert step_sharing.loss_key(cells[0]) == step_sharing.loss_key(cells[1])  # T and alpha are runtime
    assert step_sharing.signature(ChangedLoss(model)) is None and not step_sharing.stackable(ChangedLoss(model))
    assert step_sharing.signature(DKD(model)) is None  # its T is baked into its graph: not shared
    twin = step_sharing.rebind(cells[1], model)
    assert float(twin.temperature.numpy()) == 4.0 and twin.options == cells[1].options
    assert dataclasses.asdict(cells[1].options) == {"temperature": 4.0, "alpha": 0.9, "standardize": False}
    assert methods.run_settings(cells[1].options) == {"temperature": 4.0, "alpha": 0.9}  # a run's part: as before
