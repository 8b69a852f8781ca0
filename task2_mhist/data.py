"""MHIST in its official layout: `annotations.csv` plus a folder of PNG images.

Columns: `Image Name`, `Majority Vote Label` (HP/SSA), `Number of Annotators who
Selected SSA (Out of 7)`, `Partition` (train/test). Labels: HP = 0, SSA = 1.
Images are decoded once per process into uint8 arrays (`decoded`) and travel as
uint8; models take pixels in [0, 255] (any dtype) and preprocess themselves.
"""

import collections
import csv
import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from kdtoolkit.data import untuned
from kdtoolkit.errors import DataError
from task2_mhist import synthetic

CSV_NAME = "annotations.csv"
IMAGE = "Image Name"
LABEL = "Majority Vote Label"
VOTES = "Number of Annotators who Selected SSA (Out of 7)"
PARTITION = "Partition"
CLASSES = ("HP", "SSA")
NUM_VIEWS = 8  # the dihedral group: 4 rotations x optional flip
# Known subclasses from the annotator votes (class-major, 2 per class):
# HP 0-1 | HP 2-3 | SSA 4-5 | SSA 6-7 SSA votes out of 7.
SUBCLASS_OF_VOTES = (0, 0, 1, 1, 2, 2, 3, 3)
SUBCLASSES_PER_CLASS = 2


@dataclasses.dataclass(frozen=True)
class Split:
    """One partition: image paths, labels (0 HP / 1 SSA) and SSA votes (0-7)."""

    paths: tuple
    labels: np.ndarray
    votes: np.ndarray

    def __len__(self):
        return len(self.paths)

    @property
    def subclasses(self):
        """Known subclass of each image (see `SUBCLASS_OF_VOTES`)."""
        return np.asarray(SUBCLASS_OF_VOTES, np.int32)[self.votes]

    def head(self, count):
        return Split(self.paths[:count], self.labels[:count], self.votes[:count])

    def take(self, indices):
        """The images at `indices`, in that order."""
        return Split(tuple(self.paths[i] for i in indices), self.labels[indices], self.votes[indices])


def fingerprint(splits):
    """16 hex digits over every split's image names, labels, votes and file sizes
    in bytes: a synthetic folder with the real names and labels differs from the
    real images (their files differ in size), and so do two image sets of one CSV."""
    from kdtoolkit.data import fingerprint as digest

    parts = []
    for name in sorted(splits):
        split = splits[name]
        parts += [name, "\n".join(Path(p).name for p in split.paths), split.labels, split.votes,
                  np.array([Path(p).stat().st_size for p in split.paths], np.int64)]
    return digest(*parts)


def hold_out(splits, validation):
    """`splits` with a `"val"` split of `validation` training images (a count or a
    fraction below 1) taken out of `"train"`, stratified by label; unchanged for 0."""
    from kdtoolkit.data import stratified_split, validation_count

    count = validation_count(validation, len(splits["train"]))
    if not count:
        return dict(splits)
    train, val = stratified_split(splits["train"].labels, count)
    return {**splits, "train": splits["train"].take(train), "val": splits["train"].take(val)}


def is_synthetic(data_dir):
    """Whether `data_dir` was written by `task2_mhist.synthetic` (noise, not tissue)."""
    return data_dir is not None and (Path(data_dir).expanduser() / synthetic.MARKER).is_file()


def images_folder(data_dir):
    """The folder holding the PNGs: `DATA/images/` (as `images.zip` unpacks) or `DATA/`."""
    data_dir = Path(data_dir).expanduser()
    return data_dir / "images" if (data_dir / "images").is_dir() else data_dir


def load_mhist(data_dir, annotations=None, check_images=True, limit=None):
    """Reads and validates MHIST; returns `{"train": Split, "test": Split}`.

    `annotations` defaults to `DATA/annotations.csv`. `limit` keeps the first N
    images of each partition. Every problem is a `DataError` naming the file.
    """
    if data_dir is None:
        raise DataError("MHIST needs --data-dir DIR holding annotations.csv and the PNG images "
                        "(images.zip from the MHIST authors, unpacked)")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: no such folder")
    csv_path = Path(annotations).expanduser() if annotations else data_dir / CSV_NAME
    rows = read_annotations(csv_path)
    folder = images_folder(data_dir)
    splits = {}
    for partition in ("train", "test"):
        chosen = [r for r in rows if r[PARTITION] == partition][:limit]
        if not chosen:
            raise DataError(f"{csv_path}: no images in partition {partition!r}")
        splits[partition] = Split(
            paths=tuple(str(folder / r[IMAGE]) for r in chosen),
            labels=np.array([CLASSES.index(r[LABEL]) for r in chosen], np.int32),
            votes=np.array([r[VOTES] for r in chosen], np.int32),
        )
    if check_images:
        for split in splits.values():
            check_image_files(split.paths, folder)
    return splits


def read_annotations(csv_path):
    """Validated rows of `annotations.csv` (votes as int)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: annotations file not found; pass --data-dir with {CSV_NAME} in it "
                        "or --annotations PATH (the real one is in ../shared/data/mhist)")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in (IMAGE, LABEL, VOTES, PARTITION) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(repr(m) for m in missing)}")
        rows = list(reader)
    seen = set()
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path} line {line}"
        if row[LABEL] not in CLASSES:
            raise DataError(f"{where}: unknown label {row[LABEL]!r}; expected HP or SSA")
        if row[PARTITION] not in ("train", "test"):
            raise DataError(f"{where}: unknown partition {row[PARTITION]!r}; expected train or test")
        try:
            votes = int(row[VOTES])
        except ValueError:
            votes = -1
        if not 0 <= votes <= 7:
            raise DataError(f"{where}: SSA vote count {row[VOTES]!r} is not an integer from 0 to 7")
        if (votes >= 4) != (row[LABEL] == "SSA"):
            raise DataError(f"{where}: label {row[LABEL]} disagrees with {votes} of 7 SSA votes")
        if row[IMAGE] in seen:
            raise DataError(f"{where}: image {row[IMAGE]!r} is listed twice")
        seen.add(row[IMAGE])
        row[VOTES] = votes
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    return rows


DECODED_FORMATS = ("PNG", "JPEG", "GIF", "BMP")  # what `tf.io.decode_image` reads


def check_image_files(paths, folder):
    """Every image exists and decodes in full: a truncated or corrupt PNG/JPEG (which
    passes a header check such as PIL's `verify()`) is one `DataError` naming the
    file, before any training. Each file is decoded once here, in threads (about
    1 ms per 224 px PNG on one core, so MHIST's 3,152 images add a few seconds)."""
    import concurrent.futures
    import os

    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: image named in the annotations is missing from {folder} "
                        f"({len(missing)} missing in all)")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for path, problem in zip(paths, pool.map(_image_problem, paths)):
            if problem is not None:
                raise DataError(f"{path}: unreadable image ({problem}); replace it with an intact copy of the file")


def _image_problem(path):
    """Why the image at `path` cannot be decoded in full, or None when it can."""
    from PIL import Image, ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by some library: a truncated file would decode silently
        return "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on, so truncation cannot be checked; turn it off"
    try:
        with Image.open(path) as image:
            if image.format not in DECODED_FORMATS:
                return f"a {image.format} file; expected PNG or JPEG"
            image.load()  # the full decode: a truncated or corrupt file fails here
    except Exception as err:  # PIL raises OSError, SyntaxError, zlib.error, ValueError...
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def dihedral(image, view):
    """View `view` in 0..7 of an `(H, W, C)` image: rotation by 90°·(view mod 4),
    then a left-right flip when view >= 4. View 0 is the image itself."""
    rotated = tf.image.rot90(image, k=view % 4)
    return tf.cond(view >= 4, lambda: tf.image.flip_left_right(rotated), lambda: rotated)


# Each view of `dihedral` as a transpose, then an up-down flip, then a left-right flip
# (whether each applies, by view): what `show` does to a whole batch at once.
_TRANSPOSE = (False, True, False, True, False, True, False, True)
_FLIP_ROWS = (False, True, True, False, False, True, True, False)
_FLIP_COLS = (False, False, True, True, True, True, False, False)


def show(batch):
    """The batch with its images `"x"` `(B, S, S, C)` in their views `"view"` `(B,)`, as
    float32 pixels in [0, 255]: `dihedral` of each, computed for the whole batch in
    three selects on the device (inside the compiled step; the uint8 bytes are cast
    on arrival, since oneDNN has no uint8 transpose on many CPUs). Batches of
    features (rank 2) already show their view and are returned as they are."""
    if batch["x"].shape.rank != 4:
        return batch
    x, view = tf.cast(batch["x"], tf.float32), batch["view"]

    def where(table, changed, unchanged):
        return tf.where(tf.gather(tf.constant(table), view)[:, None, None, None], changed, unchanged)

    x = where(_TRANSPOSE, tf.transpose(x, [0, 2, 1, 3]), x)
    x = where(_FLIP_ROWS, tf.reverse(x, [1]), x)
    x = where(_FLIP_COLS, tf.reverse(x, [2]), x)
    return {**batch, "x": x}


def decode(path, image_size):
    """PNG/JPEG file -> `(S, S, 3)` uint8, resized (area) only when its size differs."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    shape = tf.shape(image)
    return tf.cond(
        tf.logical_and(shape[0] == image_size, shape[1] == image_size),
        lambda: image,
        lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, (image_size, image_size), "area")), 0, 255), tf.uint8),
    )


_DECODED = collections.OrderedDict()  # (paths, size) -> pixels, the most recent last
KEPT_DECODED = 6  # splits held decoded at once (train, validation, test, and a few slices)


def decoded(split, image_size):
    """`(n, S, S, 3)` uint8 pixels (a tensor) of every image of `split`, in order: each file is
    read and decoded once per process and size (in parallel), then shared by every
    dataset, view, phase and seed (the 3,152 MHIST images at 224 px take 474 MB)."""
    key = (split.paths, int(image_size))
    if key not in _DECODED:
        files = tf.data.Dataset.from_tensor_slices(list(split.paths))
        images = untuned(files.map(lambda path: decode(path, image_size), num_parallel_calls=tf.data.AUTOTUNE))
        try:
            batches = [batch.numpy() for batch in images.batch(256)]
        except tf.errors.InvalidArgumentError:  # a file changed since it was checked: name it
            raise DataError(_undecodable(split.paths)) from None
        pixels = np.concatenate(batches) if batches else np.zeros((0, image_size, image_size, 3), np.uint8)
        _DECODED[key] = tf.constant(pixels)  # one tensor every dataset reads, never copied again
        while len(_DECODED) > KEPT_DECODED:
            _DECODED.popitem(last=False)
    _DECODED.move_to_end(key)
    return _DECODED[key]


def _undecodable(paths):
    """The one-line message naming the first of `paths` TensorFlow cannot decode."""
    for path in paths:
        try:
            tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
            reason = (err.message or type(err).__name__).splitlines()[0]
            return f"{path}: TensorFlow cannot decode this image ({reason}); replace it with an intact copy"
    return f"an image of {len(paths)} could not be decoded, but each decodes alone; run the same command again"


def per_view(name):
    """Whether extra array `name` has shape `(n, V, ...)`, read at the view shown: a
    frozen model's cached outputs (`teacher_*`) or base features."""
    return name == "features" or name.startswith("teacher_")


def dataset(split, image_size, batch_size, *, shuffle=False, augment=False, seed=0, extra=None, view=None,
            features=None, examples=None):
    """Batches of `{"x", "y", "index", "view", **extra}`; `"x"` is uint8 pixels `(S, S, 3)`
    as stored (`decoded`), and `show` puts them in their `"view"` as float32 on the
    device (view-0 batches can go to a model as they are: models take uint8 and
    cast it themselves), so images travel as bytes.

    With `augment`, each example is shown in a random dihedral view (flips and
    90° rotations; tissue has no up or down). `view` forces one view for every
    example (e.g. to precompute a teacher's logits for view v); otherwise view 0.
    `extra` arrays (first dim = split size) ride along; `per_view` ones, of shape
    `(n, 8, ...)`, are reduced to the view shown.

    `features`, `(n, V, D)` outputs of a frozen base per view (V = 8, or 1 without
    augmentation), replace the images: `"x"` is then the `(D,)` features of the
    view shown, and for one seed the example order and views are exactly those of
    the image stream.

    `examples`: the indices of the examples to stream, in that order (repeats
    allowed: a transfer subset); by default every one. The images, features and
    `extra` arrays stay whole and are read by index, so a subset copies nothing.
    """
    if features is not None and augment and view is None and features.shape[1] != NUM_VIEWS:
        raise ValueError(f"augmentation needs features of all {NUM_VIEWS} views, got shape {features.shape}")
    extra = dict(extra or {})
    if features is None:
        extra["x"] = decoded(split, image_size)
    else:
        extra["features"] = features
    examples = np.arange(len(split), dtype=np.int32) if examples is None else np.asarray(examples, np.int32)
    base = tf.data.Dataset.from_tensor_slices({"y": split.labels[examples], "index": examples})
    if shuffle:
        base = base.shuffle(len(examples), seed=seed, reshuffle_each_iteration=True)
    if augment and view is None:  # a seeded stream, so the views repeat with the seed
        randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        base = tf.data.Dataset.zip((base, randoms)).map(lambda e, r: {**e, "view": tf.cast(r % NUM_VIEWS, tf.int32)})
    else:
        base = base.map(lambda e: {**e, "view": tf.constant(view or 0, tf.int32)})
    tables = {k: tf.convert_to_tensor(v) for k, v in extra.items()}  # the decoded images: no copy

    def gather(batch):  # whole batches at once: one copy of each array's rows
        out = dict(batch)
        for name, table in tables.items():
            value = tf.gather(table, batch["index"])
            out["x" if name == "features" else name] = (tf.gather(value, batch["view"], batch_dims=1)
                                                        if per_view(name) else value)
        return out

    return untuned(base.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
