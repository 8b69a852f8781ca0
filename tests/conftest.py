import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kdtoolkit import device  # noqa: E402

device.configure()  # memory growth: several test processes can share one GPU

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def float32_after_each_test():
    """A run sets Keras' global dtype policy (`--precision`, `auto` by default: bfloat16
    on CPUs that compute it); a test that builds its own models afterwards must not
    inherit it."""
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def synthetic_mnist():
    return synthetic_mnist_arrays()


@pytest.fixture
def exact_float32():
    """TensorFloat-32 off for a test that checks hand-computed values (on by default
    on GPUs that have it: about 1e-3 relative error); no effect on a CPU."""
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(True)


@pytest.fixture
def repeatable_gpu(exact_float32):
    """On a GPU, op determinism for a test that compares two runs number for number
    (GPU kernels are not deterministic by default; a CPU already is), as
    `--deterministic` sets it, so `--jit auto` leaves XLA off too. It stays on for
    the rest of the process: TensorFlow cannot turn it off again."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        device.configure(deterministic=True, tf32=False)


def synthetic_mnist_arrays():
    """Small MNIST-shaped uint8 arrays whose class is the position of a bright square."""
    rng = np.random.default_rng(0)

    def make(n):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + 12 * row : 10 + 12 * row, 1 + 5 * col : 5 + 5 * col] = 255
        return images, labels

    x_train, y_train = make(384)
    x_test, y_test = make(128)
    return {"x_train": x_train[..., None], "y_train": y_train, "x_test": x_test[..., None], "y_test": y_test}


@pytest.fixture
def real_mnist_dir():
    if not (SHARED_MNIST / "mnist.npz").exists():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST} (../shared/data/mnist)")
    return SHARED_MNIST


def make_mhist(root, n_train=24, n_test=12, size=32, seed=0):
    """A small MHIST-layout folder: annotations.csv + PNGs whose class is learnable
    (SSA tiles are redder than HP tiles), votes consistent with the labels."""
    from task2_mhist import synthetic

    return synthetic.write_folder(root, synthetic.toy_rows(n_train, n_test, seed), size, seed)


@pytest.fixture
def mhist_dir(tmp_path):
    return make_mhist(tmp_path / "mhist")


def tiny_base(include_top=False, weights=None, input_shape=None, pooling=None):
    """Stands in for a keras.applications constructor (same arguments; `weights` is
    None or a file path), so recipe tests run in seconds; the real bases are built
    and trained in test_task2_data.py."""
    assert not include_top and pooling is None
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    base = keras.Model(inputs, x)  # a feature map, as keras.applications gives without pooling
    if weights is not None:
        base.load_weights(weights)
    return base


@pytest.fixture
def tiny_architectures(monkeypatch):
    """Every Task 2 architecture replaced by `tiny_base`."""
    from task2_mhist import models

    for name, (_, mode) in list(models.ARCHITECTURES.items()):
        monkeypatch.setitem(models.ARCHITECTURES, name, (tiny_base, mode))


def write_keras_weights(folder, architectures, image_size):
    """Writes each architecture's base (random values) under the file name Keras gives
    its no-top ImageNet weights, in the legacy HDF5 layout Keras' downloads use, as a
    `--weights DIR` folder; returns `{architecture: the base written}`."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from task2_mhist import models

    folder.mkdir(parents=True, exist_ok=True)
    sources = {}
    for architecture in architectures:
        sources[architecture] = models.base_of(models.build(architecture, "none", image_size))
        with h5py.File(folder / models.keras_weights_file(architecture, image_size), "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, sources[architecture])
    return sources
