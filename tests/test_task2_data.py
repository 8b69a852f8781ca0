"""MHIST loading, validation errors, the dihedral views, subclasses and models."""

import csv
import shutil

import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit.errors import DataError
from tests.conftest import write_keras_weights
from task2_mhist import data as mhist
from task2_mhist import models

REAL_CSV = mhist.Path(__file__).resolve().parents[2] / "shared" / "data" / "mhist" / "annotations.csv"


def test_load_synthetic_folder(mhist_dir):
    splits = mhist.load_mhist(mhist_dir)
    assert (len(splits["train"]), len(splits["test"])) == (24, 12)
    assert set(splits["train"].labels.tolist()) == {0, 1}
    batch = next(iter(mhist.dataset(splits["train"], 32, 5)))
    assert batch["x"].shape == (5, 32, 32, 3) and batch["x"].dtype == tf.uint8  # bytes travel; models cast
    assert int(tf.reduce_max(batch["x"])) > 1
    resized = next(iter(mhist.dataset(splits["train"], 48, 2)))
    assert resized["x"].shape == (2, 48, 48, 3)


def test_real_annotations_counts():
    if not REAL_CSV.exists():
        pytest.skip(f"real MHIST annotations not found at {REAL_CSV}")
    rows = mhist.read_annotations(REAL_CSV)
    count = lambda part, label: sum(r["Partition"] == part and r["Majority Vote Label"] == label for r in rows)  # noqa: E731
    assert (count("train", "HP"), count("train", "SSA"), count("test", "HP"), count("test", "SSA")) == (1545, 630, 617, 360)


def rewrite_csv(folder, mutate):
    path = folder / "annotations.csv"
    rows = list(csv.reader(open(path)))
    mutate(rows)
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows.__setitem__(0, rows[0][:2] + ["votes", rows[0][3]]), "missing column"),
        (lambda rows: rows[1].__setitem__(1, "TA"), "unknown label 'TA'"),
        (lambda rows: rows[1].__setitem__(2, "9"), "not an integer from 0 to 7"),
        (lambda rows: rows[1].__setitem__(3, "val"), "unknown partition"),
        (lambda rows: rows[2].__setitem__(2, "7" if rows[2][1] == "HP" else "0"), "disagrees"),
        (lambda rows: rows.append(list(rows[1])), "listed twice"),
    ],
)
def test_bad_annotations_are_one_line_errors(mhist_dir, mutate, message):
    rewrite_csv(mhist_dir, mutate)
    with pytest.raises(DataError, match=message) as err:
        mhist.load_mhist(mhist_dir)
    assert "annotations.csv" in str(err.value) and "\n" not in str(err.value)


def test_missing_csv_and_images(mhist_dir, tmp_path):
    with pytest.raises(DataError, match="annotations file not found"):
        mhist.load_mhist(tmp_path)
    (mhist_dir / "MHIST_005.png").unlink()
    with pytest.raises(DataError, match="MHIST_005.png: image named in the annotations is missing"):
        mhist.load_mhist(mhist_dir)


def test_unreadable_image_is_named(mhist_dir):
    (mhist_dir / "MHIST_007.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="MHIST_007.png: unreadable image"):
        mhist.load_mhist(mhist_dir)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_image_is_named_before_training(mhist_dir, kind):
    """A truncated PNG or JPEG passes a header check (PIL's `verify()`); the full
    decode when the folder is indexed finds it and names the file."""
    from PIL import Image

    path = mhist_dir / "MHIST_007.png"
    if kind == "jpeg":  # a JPEG under the CSV's .png name, as TensorFlow's decoder accepts
        Image.open(path).convert("RGB").save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"MHIST_007.png: unreadable image \(.*\); replace it") as err:
        mhist.load_mhist(mhist_dir)
    assert "\n" not in str(err.value)


def test_an_image_damaged_after_indexing_is_named_by_the_decoder(mhist_dir):
    splits = mhist.load_mhist(mhist_dir)
    damaged = splits["train"].paths[3]
    data = open(damaged, "rb").read()
    with open(damaged, "wb") as handle:
        handle.write(data[:200])
    with pytest.raises(DataError, match=f"{damaged}: TensorFlow cannot decode this image"):
        mhist.decoded(splits["train"], 32)


def test_images_subfolder_and_separate_annotations(mhist_dir, tmp_path):
    layout = tmp_path / "official"
    (layout / "images").mkdir(parents=True)
    for png in mhist_dir.glob("*.png"):
        shutil.copy(png, layout / "images" / png.name)
    splits = mhist.load_mhist(layout, annotations=mhist_dir / "annotations.csv")
    assert len(splits["test"]) == 12


def test_subclasses_from_votes():
    split = mhist.Split(paths=("a",) * 8, labels=np.array([0, 0, 0, 0, 1, 1, 1, 1]), votes=np.arange(8))
    assert split.subclasses.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # HP 0-1 | HP 2-3 | SSA 4-5 | SSA 6-7


def test_dihedral_views_are_the_eight_distinct_symmetries():
    image = tf.reshape(tf.range(12, dtype=tf.float32), (2, 2, 3)) * tf.constant([1.0, 1.0, 1.0])
    image = tf.reshape(tf.range(4 * 4 * 1, dtype=tf.float32), (4, 4, 1))
    views = [mhist.dihedral(image, tf.constant(v)).numpy() for v in range(8)]
    np.testing.assert_array_equal(views[0], image.numpy())
    np.testing.assert_array_equal(views[1], np.rot90(image.numpy(), 1))
    np.testing.assert_array_equal(views[4], np.fliplr(image.numpy()))
    assert len({v.tobytes() for v in views}) == 8


def test_show_turns_a_batch_as_dihedral_turns_each_image():
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (16, 5, 5, 3)), tf.uint8)
    views = tf.constant([v % 8 for v in range(16)], tf.int32)
    shown = mhist.show({"x": images, "view": views, "y": views})
    assert shown["x"].dtype == tf.float32 and shown["y"] is views
    for image, view, turned in zip(images, views, shown["x"]):
        np.testing.assert_array_equal(turned.numpy(), mhist.dihedral(image, view).numpy())
    features = {"x": tf.zeros((4, 7)), "view": views[:4]}
    assert mhist.show(features) is features  # features already show their view


def test_each_image_is_decoded_once_for_every_dataset_and_view(mhist_dir, monkeypatch):
    splits = mhist.load_mhist(mhist_dir)
    decodes = []
    real = mhist.decode
    monkeypatch.setattr(mhist, "decode", lambda path, size: decodes.append(size) or real(path, size))
    monkeypatch.setattr(mhist, "_DECODED", mhist.collections.OrderedDict())
    datasets = [mhist.dataset(splits["train"], 32, 8, view=v) for v in range(8)]
    datasets.append(mhist.dataset(splits["train"], 32, 8, shuffle=True, augment=True))
    for data in datasets:
        for _ in data:
            pass
    assert decodes == [32]  # one trace of the decoding map: one pass over the files
    pixels = mhist.decoded(splits["train"], 32)
    first = next(iter(mhist.dataset(splits["train"], 32, 3, view=5)))
    np.testing.assert_array_equal(first["x"].numpy(), pixels[:3])
    np.testing.assert_array_equal(mhist.show(first)["x"].numpy()[1], mhist.dihedral(pixels[1], tf.constant(5)).numpy())


def test_augmented_views_repeat_with_the_seed(mhist_dir):
    splits = mhist.load_mhist(mhist_dir)
    def views(seed):
        ds = mhist.dataset(splits["train"], 32, 24, shuffle=True, augment=True, seed=seed)
        return [b["view"].numpy().tolist() for _, b in zip(range(2), ds.repeat())]
    assert views(3) == views(3)
    assert views(3) != views(4)
    first_epoch, second_epoch = views(3)
    assert first_epoch != second_epoch and set(first_epoch) <= set(range(8))


def test_teacher_logits_follow_the_view_shown(mhist_dir):
    splits = mhist.load_mhist(mhist_dir)
    n = len(splits["train"])
    table = np.arange(n * 8 * 2, dtype=np.float32).reshape(n, 8, 2)
    ds = mhist.dataset(splits["train"], 32, 8, shuffle=True, augment=True, seed=0, extra={"teacher_logits": table})
    for batch in ds:
        expected = table[batch["index"].numpy(), batch["view"].numpy()]
        np.testing.assert_array_equal(batch["teacher_logits"].numpy(), expected)


def test_feature_stream_shows_the_same_examples_and_views_as_the_image_stream(mhist_dir):
    splits = mhist.load_mhist(mhist_dir)
    n = len(splits["train"])
    features = np.random.default_rng(0).normal(size=(n, 8, 5)).astype(np.float32)
    options = dict(shuffle=True, augment=True, seed=7, extra={"subclass": splits["train"].subclasses})
    images = mhist.dataset(splits["train"], 32, 8, **options).repeat(2)
    cached = mhist.dataset(splits["train"], 32, 8, features=features, **options).repeat(2)
    for a, b in zip(images, cached, strict=True):
        for key in ("index", "view", "y", "subclass"):
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
        np.testing.assert_array_equal(b["x"].numpy(), features[b["index"].numpy(), b["view"].numpy()])
    with pytest.raises(ValueError, match="all 8 views"):
        mhist.dataset(splits["train"], 32, 8, augment=True, features=features[:, :1])


@pytest.mark.slow
def test_split_at_base_composes_to_the_model():
    model = models.build("mobilenetv2", "none", 32)
    features, head = models.split_at_base(model)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    assert features(x).shape == (3, 1280)
    np.testing.assert_allclose(head(features(x)).numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    assert [v.path for v in head.trainable_variables] == [v.path for v in model.trainable_variables[-2:]]
    before = models.weights_fingerprint(model)
    assert before == models.weights_fingerprint(model)
    head.trainable_variables[0].assign_add(np.ones(head.trainable_variables[0].shape, np.float32))
    assert models.weights_fingerprint(model) != before  # the head is the model's own layer


@pytest.mark.slow
def test_phase_switch_freezes_and_unfreezes():
    model = models.build("mobilenetv2", "none", 32)
    models.set_base_trainable(model, False)
    assert len(model.trainable_variables) == 2  # the head's kernel and bias
    models.set_base_trainable(model, True)
    assert len(model.trainable_variables) == 2 + len(models.base_of(model).trainable_variables) > 100


@pytest.mark.slow
@pytest.mark.parametrize("pretrained", [True, False])
def test_batchnorm_statistics_fine_tune_only_without_pretrained_weights(tmp_path, pretrained):
    weights = "none"
    if pretrained:
        weights = str(tmp_path / "base.weights.h5")
        models.base_of(models.build("mobilenetv2", "none", 32)).save_weights(weights)
    model = models.build("mobilenetv2", weights, 32)
    moving = [v for v in models.base_of(model).non_trainable_variables if "moving_mean" in v.path]
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)

    def statistics_change():
        before = [v.numpy().copy() for v in moving]
        model(x, training=True)
        return any(not np.array_equal(b, v.numpy()) for b, v in zip(before, moving))

    models.set_base_trainable(model, False)  # feature extraction: inference mode either way
    assert not statistics_change()
    models.set_base_trainable(model, True)  # fine-tuning
    assert len(model.trainable_variables) > 100  # BatchNorm scale and offset included
    assert statistics_change() is not pretrained


@pytest.mark.slow
def test_weights_from_a_saved_file(tmp_path):
    source = models.build("mobilenetv2", "none", 32)
    path = tmp_path / "base.weights.h5"
    models.base_of(source).save_weights(path)
    loaded = models.build("mobilenetv2", str(path), 32)
    for a, b in zip(models.base_of(source).get_weights(), models.base_of(loaded).get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="no such file"):
        models.build("mobilenetv2", str(tmp_path / "missing.h5"), 32)


def test_weights_from_a_folder_of_keras_files(tmp_path, tiny_architectures):
    """One folder serves every architecture, each file under its Keras name and in
    the legacy HDF5 layout Keras' downloads use."""
    sources = write_keras_weights(tmp_path, (models.TEACHER, models.STUDENT), 40)
    assert models.keras_weights_file(models.STUDENT, 40).endswith("_1.0_224_no_top.h5")  # 40 px: Keras uses 224
    assert models.keras_weights_file(models.STUDENT, 160).endswith("_1.0_160_no_top.h5")
    assert models.keras_weights_file(models.TEACHER) == "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    for architecture, source in sources.items():
        loaded = models.base_of(models.build(architecture, str(tmp_path), 40))
        for a, b in zip(source.get_weights(), loaded.get_weights()):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5.*not in"):
        models.build(models.ASSISTANT, str(tmp_path), 40)


def test_imagenet_download_failure_names_the_way_out(monkeypatch):
    import keras

    def offline(**kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setitem(models.ARCHITECTURES, "resnet50v2", (offline, "tf"))
    with pytest.raises(DataError, match="--weights DIR.*resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5.*--weights none"):
        models.build("resnet50v2", "imagenet", 32)
    assert keras  # the real constructor is restored by monkeypatch


@pytest.mark.slow
def test_weights_of_another_architecture_are_a_short_error(tmp_path, capsys):
    path = tmp_path / "resnet.weights.h5"
    models.base_of(models.build(models.TEACHER, "none", 32)).save_weights(path)
    with pytest.raises(DataError) as caught:
        models.build(models.STUDENT, str(path), 32)
    message = str(caught.value)
    assert "not the weights of mobilenetv2" in message and "\n" not in message and len(message) < 600
    assert "UserWarning" not in capsys.readouterr().err
