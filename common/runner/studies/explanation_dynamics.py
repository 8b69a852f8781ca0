"""Explanations over training: how a teacher's explanations converge, epoch by epoch,
to those of an ensemble of teachers (Gardner 2022 (York), §4.5: occlusion maps
of each checkpoint against the ensemble's, the share above a Pearson threshold of
r = 0.53 growing from 78% to 98% on the true class and from 52% to 87% off it).

The maps are of two kinds, each compared with the ensemble's of its own kind:
occlusion, Gardner's (`kdtoolkit.deploy.explain.occlusion_map`: the drop in the class's
probability when a `--occlusion-patch` square is blanked, at `--occlusion-stride`
steps), and integrated gradients (`kdtoolkit.runner.studies.attributions`). The
reference is the mean-logit ensemble of the teachers of `--ensemble-seeds`
(`kdtoolkit.runner.studies.ensemble`); the maps are those of the true class (on-target)
and of the class the ensemble ranks highest among the others (off-target), for
the first `--explain-images` test images, at the checkpoint the seed's teacher
saved after each epoch. For each epoch: the mean Pearson r over images and the
share of images with r above the threshold, on and off target. The `.npz` keeps
the on-target maps of the first `SHOWN` images, the ensemble's and each
checkpoint's, for the report's figure of maps across checkpoints.
"""

import numpy as np
import tensorflow as tf

from kdtoolkit.deploy import explain
from kdtoolkit.files import write_arrays_atomic
from kdtoolkit.runner.studies import save_table
from kdtoolkit.runner.studies.attributions import integrated_gradients
from kdtoolkit.runner.studies.ensemble import mean_logits

THRESHOLD = 0.53  # Gardner 2022's Pearson threshold for two maps that agree
SHOWN = 3  # images whose maps the .npz keeps


def pearson_rows(first, second):
    """`(n,)` Pearson correlation of each pair of flattened maps; 0 where either is constant."""
    a = np.asarray(first, np.float64).reshape(len(first), -1)
    b = np.asarray(second, np.float64).reshape(len(second), -1)
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    norms = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.divide((a * b).sum(-1), norms, out=np.zeros(len(a)), where=norms > 0)


def occlusion(model, images, classes, patch, stride, fill):
    """`(n, rows, cols)` occlusion maps of `model` (`x -> logits`), image i for class `classes[i]`."""
    probabilities = lambda x: tf.nn.softmax(tf.cast(model(x), tf.float32)).numpy()  # noqa: E731
    return np.stack(explain.occlusion_maps({"model": probabilities}, images, classes, patch, stride, fill)["model"])


def run(task, images, labels, checkpoints, seeds):
    """The study on `task` (a `kdtoolkit.runner.recipes.Recipes`): `checkpoints` is
    `[(epoch, model)]` of the seed's teacher, `seeds` those of the ensemble's members.
    Writes `explanation_dynamics-s<seed>.csv` and `.json`; returns the rows (one per
    kind of map and epoch)."""
    c = task.config
    kinds = {"occlusion": lambda model, classes: occlusion(model, images, classes, c.occlusion_patch,
                                                           c.occlusion_stride, task.occlusion_fill),
             "integrated gradients": lambda model, classes: integrated_gradients(model, images, classes)}
    reference = mean_logits([task.for_seed(seed).teacher_model()[1] for seed in seeds])
    logits = np.asarray(reference(images))
    ranked = np.where(np.eye(logits.shape[1], dtype=bool)[labels], -np.inf, logits)
    targets = {"on": labels, "off": ranked.argmax(-1)}
    rows = []
    shown = {"images": np.asarray(images[:SHOWN]), "labels": np.asarray(labels[:SHOWN]),
             "epochs": np.array([epoch for epoch, _ in checkpoints])}
    for kind, maps_of in kinds.items():
        maps = {side: maps_of(reference, classes) for side, classes in targets.items()}
        key = kind.replace(" ", "_")
        shown[f"{key}_ensemble"] = maps["on"][:SHOWN]
        epochs = []  # each checkpoint's on-target maps of the shown images
        for epoch, model in checkpoints:
            row = {"maps": kind, "epoch": epoch}
            for side, classes in targets.items():
                found = maps_of(model, classes)
                r = pearson_rows(found, maps[side])
                row.update({f"{side}_target_mean_r": float(r.mean()),
                            f"{side}_target_share": float(np.mean(r > THRESHOLD))})
                if side == "on":
                    epochs.append(found[:SHOWN])
            rows.append(row)
            task.log(f"[dynamics] {kind}, teacher epoch {epoch}: on-target r {row['on_target_mean_r']:.3f} "
                     f"({row['on_target_share']:.0%} > {THRESHOLD}), off-target r {row['off_target_mean_r']:.3f} "
                     f"({row['off_target_share']:.0%})")
        shown[f"{key}_epochs"] = np.stack(epochs)  # (epochs, SHOWN, rows, cols)
    path = save_table(task, "explanation_dynamics", rows, seeds=list(seeds), images=int(len(images)),
                      threshold=THRESHOLD, occlusion_patch=c.occlusion_patch, occlusion_stride=c.occlusion_stride)
    write_arrays_atomic(path.with_suffix(".npz"), shown)
    return rows
