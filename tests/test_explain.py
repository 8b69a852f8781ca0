"""LIME and occlusion maps, and the agreement numbers between models."""

import numpy as np
import pytest

from kdtoolkit.deploy import explain


def digit(seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((28, 28, 1), np.float32)
    image[6:22, 12:16] = 1.0  # a "1"
    return np.clip(image + rng.uniform(0, 0.05, image.shape), 0, 1).astype(np.float32)


def region_model(top, left, size):
    """P(class 1) grows with the ink inside one square; ignores everything else."""
    def predict(x):
        x = np.asarray(x)
        ink = x[:, top:top + size, left:left + size].reshape(len(x), -1).mean(1)
        p1 = 1 / (1 + np.exp(-10 * (ink - 0.3)))
        return np.stack([1 - p1, p1], axis=1)
    return predict


def test_lime_is_repeatable_with_the_same_seed():
    images, labels = np.stack([digit(0), digit(1)]), [1, 1]
    models = {"m": region_model(8, 10, 8)}
    a = explain.explain_lime(models, images, labels, explain.segment_digit, num_samples=300, seed=7)
    b = explain.explain_lime(models, images, labels, explain.segment_digit, num_samples=300, seed=7)
    for x, y in zip(a["weights"]["m"], b["weights"]["m"]):
        np.testing.assert_array_equal(x, y)
    c = explain.explain_lime(models, images, labels, explain.segment_digit, num_samples=300, seed=8)
    assert not np.array_equal(a["weights"]["m"][0], c["weights"]["m"][0])


def test_lime_puts_weight_on_the_region_the_model_reads():
    image = digit()
    segments = explain.segment_digit(image)
    result = explain.explain_lime({"m": region_model(8, 10, 8)}, image[None], [1], explain.segment_digit, 500)
    weights = result["weights"]["m"][0]
    inside = np.unique(segments[8:16, 10:18])
    outside = np.setdiff1d(np.unique(segments), np.unique(segments[6:18, 8:20]))
    assert weights[inside].max() > 0.01
    assert np.abs(weights[outside]).max() < weights[inside].max() / 5


def test_all_models_share_segmentation_and_samples():
    image = digit()
    segments = explain.segment_digit(image)
    masks_a, images_a, d_a = explain.lime_neighbourhood(image, segments, 50, seed=3)
    masks_b, images_b, d_b = explain.lime_neighbourhood(image, segments, 50, seed=3)
    np.testing.assert_array_equal(masks_a, masks_b)
    np.testing.assert_array_equal(images_a, images_b)
    assert masks_a[0].all() and np.array_equal(images_a[0], image) and d_a[0] == pytest.approx(0)
    # A dropped superpixel is blanked, a kept one untouched.
    row = 1
    dropped = np.isin(segments, np.flatnonzero(masks_a[row] == 0))
    assert (images_a[row][dropped] == 0).all()
    np.testing.assert_array_equal(images_a[row][~dropped], image[~dropped])


def test_agreement_with_itself_is_perfect_and_lower_with_an_unrelated_model():
    images = np.stack([digit(s) for s in range(3)])
    models = {"a": region_model(8, 10, 8), "a_again": region_model(8, 10, 8), "other": region_model(18, 2, 8)}
    result = explain.explain_lime(models, images, [1, 1, 1], explain.segment_digit, num_samples=300)
    same = explain.agreement(result["weights"]["a"], result["weights"]["a_again"], k=5)
    other = explain.agreement(result["weights"]["a"], result["weights"]["other"], k=5)
    assert same["pearson_mean"] == pytest.approx(1.0) and same["top5_overlap_mean"] == 1.0
    assert other["pearson_mean"] < 0.5 and other["top5_overlap_mean"] < 1.0
    assert same["images"] == 3


def test_occlusion_peaks_on_the_patch_the_model_depends_on():
    image = np.ones((28, 28, 1), np.float32)
    predict = region_model(12, 16, 4)
    heat = explain.occlusion_map(predict, image, label=1, patch=4, stride=2)
    assert heat.shape == (13, 13)
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert (row * 2, col * 2) == (12, 16)
    assert heat[0, 0] == pytest.approx(0.0)  # far away: no effect
    again = explain.occlusion_map(predict, image, label=1, patch=4, stride=2)
    np.testing.assert_array_equal(heat, again)  # deterministic
    with pytest.raises(ValueError, match="patch"):
        explain.occlusion_map(predict, image, 1, patch=0)


def test_pearson_and_top_k_by_hand():
    assert explain.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert explain.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(explain.pearson([1, 1, 1], [1, 2, 3]))
    assert explain.top_k_overlap([5, 4, 3, 0], [5, 0, 4, 3], k=2) == 0.5


def test_degenerate_maps_are_left_out_of_agreement():
    informative = [np.array([0.1, 0.5, -0.2, 0.9, 0.0, 0.3, -0.4])] * 2
    constant = [np.zeros(7)] * 2  # e.g. a model whose probability never moved
    one_superpixel = [np.array([0.4])] * 2  # SLIC found one segment: top-5 overlap would be trivially 1
    mixed = explain.agreement(informative + constant + one_superpixel, informative + constant + one_superpixel, k=5)
    assert mixed["pearson_mean"] == pytest.approx(1.0) and mixed["top5_overlap_mean"] == 1.0
    assert (mixed["images"], mixed["degenerate_images"]) == (6, 4)
    none = explain.agreement(one_superpixel, one_superpixel, k=5)
    assert none["degenerate_images"] == 2
    assert all(np.isnan(none[key]) for key in ("pearson_mean", "pearson_std", "top5_overlap_mean"))
