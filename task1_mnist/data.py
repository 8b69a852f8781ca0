"""MNIST loading: a local `mnist.npz` (keras layout) or Keras' own download."""

import os
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from kdtoolkit.data import check_images, check_labels
from kdtoolkit.errors import DataError
from task1_mnist.models import NUM_CLASSES

ENV_VAR = "MNIST_DIR"
FILE_NAME = "mnist.npz"
_HOW = (
    f"pass --data-dir DIR (or set {ENV_VAR}) where DIR holds {FILE_NAME} in the layout of "
    "keras.datasets.mnist, e.g. ../shared/data/mnist"
)


def locate(data_dir=None):
    """Path of a local `mnist.npz` from `data_dir`, else `$MNIST_DIR`, else None.

    `data_dir` may be the file itself or the folder holding it. A given location
    that holds no `mnist.npz` is an error, never a silent download.
    """
    source = data_dir if data_dir not in (None, "") else os.environ.get(ENV_VAR) or None
    if source is None:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        origin = "--data-dir" if data_dir not in (None, "") else f"${ENV_VAR}"
        raise DataError(f"{origin} {source!r}: no {FILE_NAME} found there; {_HOW}")
    return path


def load_mnist(data_dir=None, limit=None):
    """MNIST as uint8 arrays (a local file's images may also be floats in [0, 1] or
    [0, 255], scaled here; labels must be integers 0-9: `kdtoolkit.data.check_images`,
    `check_labels`): `x_train (n, 28, 28, 1)`, `y_train (n,)`, `x_test`, `y_test`,
    and `source` (where they came from, a string).

    `limit` keeps the first `limit` training and test examples (quick runs).
    """
    path = locate(data_dir)
    if path is None:
        arrays = _download()
    else:
        arrays = _read_npz(path)
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
    arrays["x_train"] = arrays["x_train"][..., None]
    arrays["x_test"] = arrays["x_test"][..., None]
    arrays["source"] = str(path) if path is not None else "keras.datasets.mnist download"
    if limit is not None:
        arrays["source"] += f" (first {limit} train and test images)"
    return arrays


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as err:
        raise DataError(f"{path}: missing array {err}; {_HOW}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file, truncated or corrupt ({err}); {_HOW}") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y) or len(x) == 0:
            raise DataError(
                f"{path}: x_{split} has shape {x.shape} and y_{split} {y.shape}; "
                f"expected (n, 28, 28) images and (n,) labels"
            )
    for split in ("train", "test"):  # the dtype, range and values: one line naming the file and array
        arrays[f"x_{split}"] = check_images(arrays[f"x_{split}"], f"{path} x_{split}")
        arrays[f"y_{split}"] = check_labels(arrays[f"y_{split}"], NUM_CLASSES, f"{path} y_{split}")
    return arrays


def _download():
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as err:  # any network or hash failure means the same thing here
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"could not download MNIST through Keras ({reason}); {_HOW}") from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def scale(batch):
    """Batch map: uint8 pixels -> float32 in [0, 1]; other entries unchanged."""
    return {**batch, "x": tf.cast(batch["x"], tf.float32) / 255.0}
