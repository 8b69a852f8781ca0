"""Explanation artefacts of several models, saved and resumable (both tasks).

`explain_and_save` writes, under `out_dir`:
- `<tag>.npz`: `images`, `labels`, per-model maps (`map__<model>`, ragged LIME
  weights padded with NaN) and for LIME the `segments`;
- `<tag>.json`: the settings, per-pair agreement numbers and per-image values.
A finished artefact with the same settings is not computed again.
"""

import itertools
import json

import numpy as np

from kdtoolkit import training
from kdtoolkit.deploy import explain
from kdtoolkit.files import identity_hash, write_arrays_atomic, write_json_atomic


def explain_and_save(out_dir, tag, kind, predictors, images, labels, settings, log=None):
    """Explains `images` for every model in `predictors` with `kind` ("lime" or
    "occlusion") and saves maps plus agreement numbers; returns the JSON record.

    `predictors` maps a model name to `fn(images) -> probabilities`; `settings`
    holds the method's options (`num_samples`, `seed`, `segment_fn`, `hide_value`
    for LIME; `patch`, `stride`, `fill` for occlusion; `top_k` for both).
    """
    say = log or (lambda _msg: None)
    json_path, npz_path = out_dir / f"{tag}.json", out_dir / f"{tag}.npz"
    public = {k: v for k, v in settings.items() if not callable(v)}
    public.update(kind=kind, models=list(predictors), images=int(len(images)))
    if json_path.exists() and npz_path.exists():
        previous = json.loads(json_path.read_text())
        if previous.get("settings") == json.loads(json.dumps(public)):
            say(f"[{tag}] finished earlier, skipping ({json_path})")
            return previous
    arrays = {"images": np.asarray(images), "labels": np.asarray(labels)}
    if kind == "lime":
        result = explain.explain_lime(
            predictors, images, labels, settings["segment_fn"], settings["num_samples"],
            settings["seed"], settings.get("hide_value", 0.0), progress=lambda m: say(f"[{tag}] {m}"),
        )
        maps = result["weights"]
        arrays["segments"] = np.stack(result["segments"])
    elif kind == "occlusion":
        maps = explain.occlusion_maps(
            predictors, images, labels, settings["patch"], settings["stride"], settings.get("fill", 0.0),
            progress=lambda m: say(f"[{tag}] {m}"),
        )
    else:
        raise ValueError(f"unknown explanation kind {kind!r}; use 'lime' or 'occlusion'")
    k = settings.get("top_k", 5)
    pairs = {}
    for a, b in itertools.combinations(predictors, 2):
        pair = pairs[f"{a} vs {b}"] = explain.agreement(maps[a], maps[b], k)
        pair["pearson_per_image"] = [explain.pearson(x, y) for x, y in zip(maps[a], maps[b])]
        if pair["degenerate_images"] == pair["images"]:
            say(f"[{tag}] {a} vs {b}: agreement undefined: every map is constant or has at most {k} cells")
            continue
        left_out = f" ({pair['degenerate_images']} degenerate images left out)" if pair["degenerate_images"] else ""
        say(f"[{tag}] {a} vs {b}: Pearson r {pair['pearson_mean']:.3f} ± {pair['pearson_std']:.3f}, "
            f"top-{k} overlap {pair[f'top{k}_overlap_mean']:.2f}{left_out}")
    for name, per_image in maps.items():
        arrays[f"map__{name}"] = _pad(per_image)
    write_arrays_atomic(npz_path, arrays, compressed=True)
    record = {"settings": public, "agreement": pairs}
    write_json_atomic(json_path, record)
    return record


def _pad(maps):
    """Stacks maps of equal shape, or pads ragged 1-D weight vectors with NaN."""
    shapes = {np.shape(m) for m in maps}
    if len(shapes) == 1:
        return np.stack(maps)
    width = max(len(m) for m in maps)
    return np.stack([np.pad(np.asarray(m, float), (0, width - len(m)), constant_values=np.nan) for m in maps])


def explain_seed(task, kind):
    """LIME or occlusion maps (`kind`) of a task's teacher, KD student and scratch
    student for one seed (`task`: a `kdtoolkit.runner.recipes.Recipes`; each model trained or
    loaded first), saved under `explain/<kind>-s<seed>` with the agreement numbers
    of every pair (`explain_and_save`)."""
    c = task.config
    records = {"teacher": task.teacher(), "kd_student": task.kd(), "scratch_student": task.scratch()}
    if kind == "lime":
        settings = {"num_samples": c.lime_samples, **task.lime_settings()}
    else:
        settings = {"patch": c.occlusion_patch, "stride": c.occlusion_stride, "fill": task.occlusion_fill}
    # The maps belong to these exact runs: another student (say, of another T) is explained anew.
    settings["runs"] = {name: f"{r['run']}@{identity_hash(r['identity'])}" for name, r in records.items()}
    images, labels = task.explanation_images()
    predictors = {name: training.probabilities_fn(task.model_of(r["run"]), task.explain_batch)
                  for name, r in records.items()}
    return explain_and_save(task.store.root / "explain", f"{kind}-s{task.seed}", kind, predictors,
                            images, labels, {"seed": task.seed, "top_k": c.top_k, **settings}, task.log)
