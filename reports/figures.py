"""Figures both tasks' reports draw: a metric against the KD temperature and the
explanation panels (LIME, occlusion)."""

import matplotlib.pyplot as plt
import numpy as np

from kdtoolkit.files import npz_problem
from kdtoolkit.runner.results import mean_std
from reports.document import number
from reports.read import damaged, json_file

MODEL_LABELS = {"teacher": "teacher", "kd_student": "KD student", "scratch_student": "scratch student"}


def t_curve_figure(report, task, name, values_by_t, ylabel, title, caption):
    """Metric (%) against T on a log axis; `values_by_t` maps T to values over seeds."""
    t = np.array(sorted(values_by_t))
    mean, std = (np.array(x) * 100 for x in zip(*(mean_std(values_by_t[v]) for v in t)))
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.errorbar(t, mean, yerr=std, marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(t, [f"{v:g}" for v in t])
    ax.set_xlabel("temperature T (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    report.figure(fig, task, name, caption)


def explanation_panel(report, folder, kind, task):
    files = sorted(folder.glob(f"{kind}-s*.npz"))
    if not files:
        report.skip(f"{kind} panels ({task})", f"no {folder}/{kind}-s*.npz")
        return
    path = files[0]
    problem = npz_problem(path)
    record = json_file(path.with_suffix(".json")) if path.with_suffix(".json").exists() else None
    if problem or not isinstance(record, dict):
        if problem:
            damaged(path, problem)
        report.skip(f"{kind} panels ({task})", f"{path.name} or its .json is missing or damaged")
        return
    data = np.load(path)
    models = record["settings"]["models"]
    if kind == "lime" and "segments" in data.files and max(len(np.unique(s)) for s in data["segments"]) < 2:
        report.skip(f"{kind} panels ({task})", f"{path.name}: the segmentation found one superpixel per image "
                    "(e.g. noise images), so the maps carry nothing to show")
        return
    images, labels = data["images"], data["labels"]
    count = min(4, len(images))
    fig, axes = plt.subplots(count, len(models) + 1, figsize=(1.9 * (len(models) + 1), 1.9 * count), squeeze=False)
    for i in range(count):
        image = images[i].squeeze()
        image = image / 255.0 if image.max() > 1.5 else image  # Task 2 pixels are in [0, 255]
        axes[i, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[i, 0].set_title(f"label {labels[i]}", fontsize=8)
        for j, model in enumerate(models, 1):
            heat = pixel_map(data, kind, model, i, image.shape[:2], record["settings"])
            limit = np.nanmax(np.abs(heat)) or 1.0
            axes[i, j].imshow(image, cmap="gray" if image.ndim == 2 else None, alpha=0.35)
            axes[i, j].imshow(heat, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.75)
            if i == 0:
                axes[i, j].set_title(MODEL_LABELS.get(model, model), fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    k = record["settings"].get("top_k", 5)
    agreement = record["agreement"]
    caption_parts = []
    for pair, a in agreement.items():
        degenerate = a.get("degenerate_images", 0)
        if degenerate >= a["images"]:
            caption_parts.append(f"{pair.replace('_', ' ')}: undefined (every map constant or at most {k} cells)")
            continue
        left_out = f", {degenerate} degenerate images left out" if degenerate else ""
        caption_parts.append(f"{pair.replace('_', ' ')}: r = {number(a['pearson_mean'])} ± {number(a['pearson_std'])}, "
                             f"top-{k} overlap {number(a[f'top{k}_overlap_mean'])}{left_out}")
    method = ("LIME superpixel weights" if kind == "lime"
              else f"occlusion ({record['settings']['patch']}px patch, stride {record['settings']['stride']})")
    runs = record["settings"].get("runs")
    caption = (f"{method} for the true label; red = evidence for it, blue = against, each map scaled to "
               f"its own largest value. Agreement over "
               f"{record['settings']['images']} images (mean ± std): " + "; ".join(caption_parts) + "."
               + (" Runs explained: " + ", ".join(r.split("@")[0] for r in runs.values()) + "." if runs else ""))
    report.figure(fig, task, f"{kind}_panel", caption)


def pixel_map(data, kind, model, index, shape, settings):
    """The explanation of image `index` painted back onto its pixels."""
    values = data[f"map__{model}"][index]
    if kind == "lime":
        return np.nan_to_num(values)[data["segments"][index]]
    patch, stride = settings["patch"], settings["stride"]
    heat, count = np.zeros(shape), np.zeros(shape)
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            heat[r * stride:r * stride + patch, c * stride:c * stride + patch] += values[r, c]
            count[r * stride:r * stride + patch, c * stride:c * stride + patch] += 1
    return heat / np.maximum(count, 1)
