"""A results folder that heals: every file the runner reads back is checked; a damaged
one sets its run (only) aside as `<run>.damaged-<time>/` and the run is trained again;
the report names what it skipped. Store-level tests here are fast (no training); one
Task 1 test trains for real (slow)."""

import json
import shutil

import numpy as np
import pytest

from kdtoolkit.files import append_line, read_jsonl, write_arrays_atomic
from kdtoolkit.runner.results import DAMAGED, ResultsStore

IDENTITY = {"experiment": "scratch", "seed": 0, "epochs": 2}


def damage(path, kind):
    """`truncate` (the first half kept), `empty` or `garbage` (bytes of no format)."""
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                      "garbage": b"\x00\x13garbage\xff" * 7}[kind])


def weights_file(path):
    """A real Keras weights file (one Dense layer)."""
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(path)


def fabricate(root):
    """Two finished runs (record, weights, test outputs) and an unfinished one with its
    resume state, as the runner leaves them."""
    store = ResultsStore(root)
    for name in ("scratch-s0", "teacher-s0"):
        identity = {**IDENTITY, "experiment": name.split("-")[0]}
        weights_file(store.weights_path(name))
        write_arrays_atomic(store.run_dir(name) / "test_outputs.npz",
                            {"logits": np.eye(4, 3, dtype=np.float32), "labels": np.arange(4, dtype=np.int32)})
        store.save(name, {"run": name, "experiment": identity["experiment"], "seed": 0, "test_accuracy": 0.5,
                          "identity": identity})
    resume = store.resume_dir("kd-s0", {**IDENTITY, "experiment": "kd"})
    write_arrays_atomic(resume / "state.npz", {"var:0.Dense/kernel": np.ones((3, 2), np.float32),
                                               "history": np.array(json.dumps([{"loss": 1.0}]))})
    append_line(root / "timings.jsonl", json.dumps({"experiment": "teacher", "seconds": 1.0}))
    return store


def weight_values(path):
    """Every array of a weights file, in file order (names aside: Keras numbers layers per process)."""
    import h5py

    values = []
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda _name, item: values.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    return values


def snapshot(root):
    """`{relative path: bytes}` of every file under `root` (lock files aside)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


CASES = [("scratch-s0", "metrics.json"), ("scratch-s0", "model.weights.h5"), ("scratch-s0", "test_outputs.npz"),
         ("kd-s0", "resume/state.npz"), ("kd-s0", "resume/identity.json")]


@pytest.mark.parametrize("kind", ["truncate", "empty", "garbage"])
@pytest.mark.parametrize("run, file", CASES)
def test_a_damaged_file_sets_only_its_run_aside(tmp_path, capsys, run, file, kind):
    store = fabricate(tmp_path)
    damage(tmp_path / run / file, kind)
    before = snapshot(tmp_path)
    capsys.readouterr()
    store = ResultsStore(tmp_path)  # a new invocation
    if file.startswith("resume/"):
        folder = store.resume_dir(run, {**IDENTITY, "experiment": "kd"})
        assert sorted(p.name for p in folder.iterdir()) == ["identity.json"]  # starts over, from epoch 1
    else:
        assert store.finished(run, {**IDENTITY, "experiment": "scratch"}) is None  # to be trained again
        assert not store.run_dir(run).exists()
        assert store.finished("teacher-s0", {**IDENTITY, "experiment": "teacher"}) is not None
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"warning: {tmp_path / run / file}") and "training" in err, err
    (aside,) = tmp_path.glob(f"{run}{DAMAGED}*")
    after = snapshot(tmp_path)
    moved = {k: v for k, v in before.items() if k.startswith(f"{run}/")}
    assert {k.replace(aside.name, run, 1): v for k, v in after.items() if k.startswith(aside.name)} == moved
    untouched = {k: v for k, v in before.items() if not k.startswith(f"{run}/")}
    assert {k: v for k, v in after.items() if k in untouched} == untouched  # every other file, bit for bit
    assert set(after) - set(untouched) - {k.replace(run, aside.name, 1) for k in moved} <= {f"{run}/resume/identity.json"}


def test_sound_files_are_read_as_they_are_and_set_aside_folders_never(tmp_path, capsys):
    store = fabricate(tmp_path)
    before = snapshot(tmp_path)
    assert store.finished("scratch-s0", {**IDENTITY, "experiment": "scratch"})["test_accuracy"] == 0.5
    assert store.resume_dir("kd-s0", {**IDENTITY, "experiment": "kd"}) == tmp_path / "kd-s0" / "resume"
    assert snapshot(tmp_path) == before and capsys.readouterr().err == ""
    shutil.copytree(tmp_path / "scratch-s0", tmp_path / f"scratch-s0{DAMAGED}20260101T000000Z")
    assert [r["run"] for r in ResultsStore(tmp_path).records()] == ["scratch-s0", "teacher-s0"]


def test_records_skip_and_name_a_damaged_record_without_moving_it(tmp_path):
    fabricate(tmp_path)
    damage(tmp_path / "teacher-s0" / "metrics.json", "garbage")
    before = snapshot(tmp_path)
    reader = ResultsStore(tmp_path)
    assert [r["run"] for r in reader.records()] == ["scratch-s0"]
    assert list(reader.damaged) == [str(tmp_path / "teacher-s0" / "metrics.json")]
    assert snapshot(tmp_path) == before


def test_a_torn_timings_line_is_ended_before_the_next_and_skipped_by_readers(tmp_path):
    path = tmp_path / "timings.jsonl"
    append_line(path, json.dumps({"experiment": "teacher", "seconds": 1.0}))
    with open(path, "a") as handle:
        handle.write('{"experiment": "kd", "seco')  # killed mid-write
    append_line(path, json.dumps({"experiment": "scratch", "seconds": 2.0}))
    entries, problems = read_jsonl(path)
    assert [e["experiment"] for e in entries] == ["teacher", "scratch"]
    assert problems == [f"{path} line 2 is not a JSON object (torn or garbage)"]


def test_two_processes_finding_one_damaged_run_set_it_aside_once(tmp_path, capsys):
    """The second check, under the set-aside lock, finds the run already moved (and maybe
    being trained again): it moves nothing."""
    fabricate(tmp_path)
    damage(tmp_path / "scratch-s0" / "metrics.json", "empty")
    first, second = ResultsStore(tmp_path), ResultsStore(tmp_path)
    assert first.load("scratch-s0") is None
    (tmp_path / "scratch-s0" / "resume").mkdir(parents=True)  # the first is training it again
    assert not second.set_aside("scratch-s0", lambda: second.run_problem("scratch-s0")
                                if (tmp_path / "scratch-s0" / "metrics.json").exists() else None)
    assert len(list(tmp_path.glob(f"scratch-s0{DAMAGED}*"))) == 1 and (tmp_path / "scratch-s0" / "resume").is_dir()


@pytest.mark.slow
def test_task1_retrains_exactly_the_damaged_run_to_the_same_weights(tmp_path, synthetic_mnist, capsys):
    """Task 1 for real: teacher and scratch trained; each damage to one run's file makes
    that run (only) train again, to the same weights bit for bit (a seed repeats
    exactly), with one line; every file of the other run stays as it was."""
    from tests.test_task1 import small_config
    from task1_mnist.experiments import Task1

    pristine = tmp_path / "pristine"
    Task1(small_config(pristine, only=("teacher", "scratch"), epochs=1), arrays=synthetic_mnist).run()
    out = pristine / "out"
    cases = [("scratch-s0", "metrics.json", "garbage"), ("scratch-s0", "model.weights.h5", "truncate"),
             ("teacher-s0", "test_outputs.npz", "empty")]
    for run, file, kind in cases:
        case = tmp_path / f"{run}-{kind}"
        shutil.copytree(out, case / "out")
        damage(case / "out" / run / file, kind)
        before = snapshot(case / "out")
        capsys.readouterr()
        messages = []
        Task1(small_config(case, only=("teacher", "scratch"), epochs=1), arrays=synthetic_mnist,
              log=messages.append).run()
        assert [m.split("]")[0] for m in messages if "] training:" in m] == [f"[{run}"], (run, file, messages)
        warning = capsys.readouterr().err.strip()
        assert warning.startswith(f"warning: {case / 'out' / run / file}") and "\n" not in warning
        after = snapshot(case / "out")
        other = next(name for name in ("teacher-s0", "scratch-s0") if name != run)
        assert all(after[k] == v for k, v in before.items() if k.startswith(f"{other}/")), run
        retrained, first = (weight_values(folder / run / "model.weights.h5") for folder in (case / "out", out))
        assert len(retrained) == len(first) and all(np.array_equal(a, b) for a, b in zip(retrained, first))
        assert len(list((case / "out").glob(f"{run}{DAMAGED}*"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("file", ["resume/state.npz", "resume/identity.json"])
def test_task1_a_damaged_resume_state_starts_the_run_over(tmp_path, synthetic_mnist, capsys, file):
    from tests.test_task1 import small_config
    from task1_mnist.experiments import Task1

    def stopped_after_epoch_1(message):
        if "[scratch-s0] epoch 1/2" in message:
            raise KeyboardInterrupt

    config = small_config(tmp_path, only=("scratch",), epochs=2)
    with pytest.raises(KeyboardInterrupt):
        Task1(config, arrays=synthetic_mnist, log=stopped_after_epoch_1).run()
    damage(tmp_path / "out" / "scratch-s0" / file, "truncate")
    capsys.readouterr()
    messages = []
    record = Task1(config, arrays=synthetic_mnist, log=messages.append).run()["scratch"]
    assert not any("resuming" in m for m in messages) and len(record["history"]) == 2
    assert not any(h.get("resumed") for h in record["history"])
    assert capsys.readouterr().err.strip().startswith(f"warning: {tmp_path / 'out' / 'scratch-s0' / file}")
    (aside,) = (tmp_path / "out").glob(f"scratch-s0{DAMAGED}*")
    assert (aside / file).exists()
