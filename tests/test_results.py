import csv
import json

import pytest

import numpy as np

from kdtoolkit.files import write_array_atomic, write_arrays_atomic, write_json_atomic
from kdtoolkit.runner.results import ResultsConflict, ResultsStore


def test_atomic_json_write_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "a" / "metrics.json"
    write_json_atomic(path, {"x": 1.5, "t": (1, 2)})
    assert json.loads(path.read_text()) == {"x": 1.5, "t": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_array_writes(tmp_path):
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_array_atomic(tmp_path / "t.npy", table)
    write_arrays_atomic(tmp_path / "t.npz", {"a": table, "b": table[:1]}, compressed=True)
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), table)
    with np.load(tmp_path / "t.npz") as saved:
        np.testing.assert_array_equal(saved["b"], table[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy", "t.npz"]


def test_resume_state_of_other_settings_is_discarded(tmp_path):
    store = ResultsStore(tmp_path)
    folder = store.resume_dir("kd-s0", {"epochs": 12})
    write_arrays_atomic(folder / "state.npz", {"var:x": np.ones(1), "history": np.array("[]")})
    assert store.resume_dir("kd-s0", {"epochs": 12}) == folder and (folder / "state.npz").exists()
    store.resume_dir("kd-s0", {"epochs": 20})
    assert not (folder / "state.npz").exists()
    store.save("kd-s0", {"identity": {"epochs": 20}})
    assert not folder.exists()


def test_finished_matches_identity_and_refuses_other_settings(tmp_path):
    store = ResultsStore(tmp_path)
    identity = {"experiment": "kd", "epochs": 12, "seed": 0}
    assert store.finished("kd-s0", identity) is None
    store.save("kd-s0", {"run": "kd-s0", "test_accuracy": 0.9, "identity": identity})
    assert store.finished("kd-s0", identity)["test_accuracy"] == 0.9
    with pytest.raises(ResultsConflict, match="epochs: 2 now vs 12 saved"):
        store.finished("kd-s0", {**identity, "epochs": 2})


def test_summary_has_one_row_per_run(tmp_path):
    store = ResultsStore(tmp_path)
    for name, acc in (("a", 0.5), ("b", 0.75)):
        store.save(name, {"run": name, "test_accuracy": acc, "identity": {"experiment": "kd", "seed": 1}, "history": [1]})
    rows = list(csv.DictReader(open(store.write_summary())))
    assert [(r["run"], float(r["test_accuracy"]), r["experiment"], r["seed"]) for r in rows] == [
        ("a", 0.5, "kd", "1"),
        ("b", 0.75, "kd", "1"),
    ]


def test_result_files_follow_the_umask_and_summary_follows_every_run(tmp_path):
    import os
    import stat

    from kdtoolkit import files

    store = ResultsStore(tmp_path)
    store.save("a-s0", {"run": "a-s0", "test_accuracy": 0.5, "identity": {"experiment": "a", "seed": 0}})
    mode = stat.S_IMODE((tmp_path / "a-s0" / "metrics.json").stat().st_mode)
    assert mode == 0o666 & ~files._UMASK and files._UMASK == os.umask(files._UMASK)
    assert [r["run"] for r in csv.DictReader(open(tmp_path / "summary.csv"))] == ["a-s0"]  # no write_summary call
    store.save("b-s0", {"run": "b-s0", "test_accuracy": 0.7, "identity": {"experiment": "b", "seed": 0}})
    assert [r["run"] for r in csv.DictReader(open(tmp_path / "summary.csv"))] == ["a-s0", "b-s0"]


def test_out_that_is_a_file_or_unwritable_is_refused(tmp_path):
    from kdtoolkit.errors import UserError

    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        ResultsStore(tmp_path / "f").prepare()
    with pytest.raises(UserError, match="cannot write results there"):
        ResultsStore("/proc/kd-results").prepare()
    ResultsStore(tmp_path / "new" / "deep").prepare()
    assert (tmp_path / "new" / "deep").is_dir()


def test_weights_are_written_to_a_temporary_name_and_moved_into_place(tmp_path):
    """Another process holding the old weights file open (reading it, or writing it) no
    longer makes h5py refuse the write (`BlockingIOError: unable to lock file`)."""
    import subprocess
    import sys

    import keras

    from kdtoolkit.files import save_weights

    path = tmp_path / "run" / "model.weights.h5"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    save_weights(model, path)
    reader = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r'); "
                               "print('open', flush=True); time.sleep(60)", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        model.layers[0].kernel.assign(np.ones((3, 2)))
        save_weights(model, path)
    finally:
        reader.kill()
        reader.wait()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.weights.h5"]  # no temporary file left
    loaded = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    loaded.load_weights(path)
    np.testing.assert_array_equal(loaded.layers[0].kernel.numpy(), np.ones((3, 2)))
