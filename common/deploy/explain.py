"""Explanation maps that can be compared across models: LIME and occlusion.

LIME (Ribeiro et al. 2016) fits a weighted linear model from "which superpixels
were kept" to the model's probability of a label, over perturbed copies of one
image. To make maps of different models comparable, every model is explained on
the SAME segmentation and the SAME perturbation samples (drawn once per image from
a fixed seed); only the probabilities differ. The kernel and the ridge fit are
`lime`'s own (`lime.lime_base.LimeBase`, cosine distance, kernel width 0.25, as in
`lime_image`). Models are fed probabilities, never logits.

Occlusion (Zeiler & Fergus 2014) slides a patch of a fill value over the image and
records the drop in the label's probability: deterministic, no sampling.

Agreement between two models' maps of the same image: Pearson r of the values and
the overlap of their top-k cells (superpixels or occlusion positions), averaged
over images with a standard deviation.
"""

import numpy as np
import sklearn.metrics
from lime import lime_base
from skimage import segmentation as sk_segmentation

KERNEL_WIDTH = 0.25


def segment_digit(image, n_segments=40, compactness=0.3):
    """SLIC superpixels for a `(28, 28[, 1])` grayscale digit in [0, 1].

    High compactness keeps superpixels near a regular ~4x4-pixel grid that bends
    along the strokes: quickshift (`lime`'s default) is tuned for natural RGB
    images and makes a few large blobs of a 28x28 digit's flat background, which
    leaves too few features to say where a model looks.
    """
    gray = np.asarray(image, np.float64).reshape(image.shape[0], image.shape[1])
    return sk_segmentation.slic(gray, n_segments=n_segments, compactness=compactness,
                                channel_axis=None, start_label=0)


def segment_rgb(image, n_segments=50, compactness=10.0):
    """SLIC superpixels for an `(H, W, 3)` RGB image in [0, 1] (tissue images)."""
    return sk_segmentation.slic(np.asarray(image, np.float64), n_segments=n_segments,
                                compactness=compactness, start_label=0)


def lime_neighbourhood(image, segments, num_samples, seed, hide_value=0.0):
    """Perturbation samples shared by every model explained on this image.

    Returns `(masks, images, distances)`: `masks (num_samples, n_segments)` in {0, 1}
    (row 0 keeps everything), the perturbed `images (num_samples, *image.shape)`
    with dropped superpixels set to `hide_value` (None: the superpixel's mean
    colour), and each mask's cosine distance to the all-ones mask.
    """
    segment_ids = np.unique(segments)
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 2, size=(num_samples, len(segment_ids)))
    masks[0, :] = 1
    index = np.searchsorted(segment_ids, segments)  # (H, W) -> column of masks
    keep = masks[:, index].astype(bool)  # (num_samples, H, W)
    if image.ndim == 3:
        keep = keep[..., None]
    if hide_value is None:  # lime_image's default: each superpixel's mean colour
        hidden = np.zeros_like(image, dtype=np.float32)
        for segment in segment_ids:
            hidden[segments == segment] = image[segments == segment].mean(axis=0)
    else:
        hidden = np.full_like(image, hide_value, dtype=np.float32)
    images = np.where(keep, image[None], hidden[None]).astype(np.float32)
    distances = sklearn.metrics.pairwise_distances(masks, masks[:1], metric="cosine").ravel()
    return masks, images, distances


def lime_weights(probabilities, masks, distances, label, seed=0):
    """`(n_segments,)` LIME weights of each superpixel for `label` (ridge coefficients)."""
    def kernel(d):
        return np.sqrt(np.exp(-(d**2) / KERNEL_WIDTH**2))

    base = lime_base.LimeBase(kernel, random_state=seed)
    _, local_exp, _, _ = base.explain_instance_with_data(
        masks, np.asarray(probabilities), distances, int(label), num_features=masks.shape[1],
        feature_selection="none",
    )
    weights = np.zeros(masks.shape[1])
    for feature, weight in local_exp:
        weights[feature] = weight
    return weights


def explain_lime(predict_probabilities, images, labels, segment_fn, num_samples=1000, seed=0,
                 hide_value=0.0, progress=None):
    """LIME maps of several models on the same images, samples and segmentation.

    Args:
      predict_probabilities: `{model name: fn(batch of images) -> (n, classes) probabilities}`.
      images: `(n, H, W[, C])` float images in the models' input scale.
      labels: `(n,)` label explained for each image (the same for every model).
      segment_fn: `image -> (H, W)` integer superpixel ids.
      num_samples: perturbations per image; `seed`: base seed (image i uses seed + i).
      progress: optional `callable(str)`, one line per image.

    Returns:
      `{"segments": [(H, W)] per image, "weights": {model: [(n_segments,)] per image}}`.
    """
    result = {"segments": [], "weights": {name: [] for name in predict_probabilities}}
    for i, (image, label) in enumerate(zip(images, labels)):
        segments = segment_fn(image)
        masks, perturbed, distances = lime_neighbourhood(image, segments, num_samples, seed + i, hide_value)
        result["segments"].append(segments)
        for name, predict in predict_probabilities.items():
            result["weights"][name].append(lime_weights(predict(perturbed), masks, distances, label, seed + i))
        if progress is not None:
            progress(f"LIME image {i + 1}/{len(images)} ({masks.shape[1]} superpixels, {num_samples} samples)")
    return result


def occlusion_map(predict_probabilities, image, label, patch=4, stride=2, fill=0.0):
    """`(rows, cols)` drop in P(label) when a `patch` x `patch` square at each
    `stride` step is set to `fill`: larger = the model relies more on that place."""
    height, width = image.shape[:2]
    if not (1 <= patch <= min(height, width)) or stride < 1:
        raise ValueError(f"occlusion needs 1 <= patch <= {min(height, width)} and stride >= 1, "
                         f"got patch {patch}, stride {stride}")
    tops = range(0, height - patch + 1, stride)
    lefts = range(0, width - patch + 1, stride)
    occluded = np.repeat(np.asarray(image, np.float32)[None], len(tops) * len(lefts), axis=0)
    for k, (top, left) in enumerate((t, l) for t in tops for l in lefts):
        occluded[k, top:top + patch, left:left + patch] = fill
    probabilities = np.asarray(predict_probabilities(np.concatenate([image[None], occluded])))
    base = probabilities[0, label]
    return (base - probabilities[1:, label]).reshape(len(tops), len(lefts))


def occlusion_maps(predict_probabilities, images, labels, patch=4, stride=2, fill=0.0, progress=None):
    """`{model: [(rows, cols)] per image}` for several models on the same images."""
    maps = {name: [] for name in predict_probabilities}
    for i, (image, label) in enumerate(zip(images, labels)):
        for name, predict in predict_probabilities.items():
            maps[name].append(occlusion_map(predict, image, label, patch, stride, fill))
        if progress is not None:
            progress(f"occlusion image {i + 1}/{len(images)}")
    return maps


def pearson(a, b):
    """Pearson correlation of two maps (flattened); nan if either is constant."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def top_k_overlap(a, b, k):
    """Fraction of the k highest cells of `a` that are also among the k highest of `b`."""
    a, b = np.ravel(a), np.ravel(b)
    k = min(int(k), a.size)
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def agreement(maps_a, maps_b, k=5):
    """Mean and std over images of Pearson r and top-k overlap between two models' maps.

    An image where either map is constant or has no more than `k` cells (say, one
    superpixel) says nothing about agreement (r undefined, overlap trivially 1): it
    is left out and counted in `degenerate_images`; with no usable image every
    statistic is NaN.
    """
    usable = [(a, b) for a, b in zip(maps_a, maps_b) if _informative(a, k) and _informative(b, k)]
    r = np.array([pearson(a, b) for a, b in usable])
    overlap = np.array([top_k_overlap(a, b, k) for a, b in usable])
    nan = float("nan")
    return {
        "pearson_mean": float(r.mean()) if len(r) else nan,
        "pearson_std": float(r.std()) if len(r) else nan,
        f"top{k}_overlap_mean": float(overlap.mean()) if len(r) else nan,
        f"top{k}_overlap_std": float(overlap.std()) if len(r) else nan,
        "images": int(len(maps_a)),
        "degenerate_images": int(len(maps_a) - len(usable)),
    }


def _informative(values, k):
    values = np.ravel(np.asarray(values, np.float64))
    return values.size > k and np.all(np.isfinite(values)) and np.ptp(values) > 0