"""The report's research-studies section (`docs/studies.md`): each study's saved
tables (`<study>-s<seed>.json`), mean ± std over seeds."""

import matplotlib.pyplot as plt
import numpy as np

from kdtoolkit.files import npz_problem, read_json
from kdtoolkit.runner.results import mean_std


STEMS = ("missing", "smoothed_teacher", "data_efficiency", "ensemble", "teacher_capacity", "attributions",
         "label_noise", "image_noise", "explanation_dynamics")  # the saved tables


def _mean(values, scale=1.0, digits=2):
    """`mean ± std (n=k)` of `values` times `scale`; no ± for one value."""
    mean, std = mean_std(values)
    if len(values) > 1:
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f} (n={len(values)})"
    return f"{mean * scale:.{digits}f}"


def _tables(report, root, stem, title, only):
    """Every seed's saved table of study `stem`; none: a note in the report (`title`,
    and the `--only` that makes them) and an empty list."""
    tables = []
    for path in sorted(root.glob(f"{stem}-s*.json")):
        table, problem = read_json(path)
        if problem or not isinstance(table, dict):
            report.damaged[str(path)] = problem or f"{path} is not a study table (a JSON object)"
        else:
            tables.append(table)
    if not tables:
        report.skip(title, f"no {stem}-s*.json (run --only {only})")
    return tables


def _section(report, tables, text, lines):
    """A study's heading and prose (`text`, ending in a blank line), then its table
    `lines`, then the precision its runs trained at when not float32 (`tables`: the
    seeds' saved tables; those saved before they recorded it were float32)."""
    precisions = sorted({table.get("precision", "float32") for table in tables})
    note = "" if precisions == ["float32"] else f"\n*Trained in {' and '.join(precisions)}.*\n"
    report.text(text + "\n".join(lines) + "\n" + note)


def _error_bars(stds):
    """Sample stds as error bars: none (0) where one seed gave no std."""
    return [s if np.isfinite(s) else 0 for s in stds]


def _curves(report, root, name, caption, xlabel, ylabel, series, log_x=False):
    """A line figure of the study: `series` is `{label: {x: [values over seeds]}}`,
    drawn as the mean with error bars of the sample std over seeds."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, points in series.items():
        xs = sorted(points)
        means, stds = zip(*(mean_std(points[x]) for x in xs))
        ax.errorbar(xs, means, yerr=_error_bars(stds), marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    report.figure(fig, root.name, name, caption)


def _points(tables, x, value, where=lambda row: True):
    """`{x(row): [value(row) of each seed]}` over the seeds' rows for which `where` holds."""
    return {at: [value(r) for r in rows]
            for at, rows in _rows_by(tables, lambda row: x(row) if where(row) else None).items() if at is not None}


def _rows_by(tables, key):
    """`{key(row): [row of each seed's table]}`, in the first table's order."""
    groups = {}
    for table in tables:
        for row in table["rows"]:
            groups.setdefault(key(row), []).append(row)
    return groups


def _bars(report, root, name, caption, ylabel, groups, ylim=None):
    """A grouped bar figure of the study: `groups` is `{x label: {series: [values over
    seeds]}}`, each bar the mean with an error bar of the sample std over seeds."""
    series = list(dict.fromkeys(label for bars in groups.values() for label in bars))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(groups) * len(series) / 2 + 2), 3.5))
    for i, label in enumerate(series):
        at = [(x, *mean_std(bars[label])) for x, bars in enumerate(groups.values()) if label in bars]
        xs, means, stds = zip(*at)
        ax.bar(np.array(xs) + (i - (len(series) - 1) / 2) * width, means, width,
               yerr=_error_bars(stds), capsize=3, label=label)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)
    report.figure(fig, root.name, name, caption)


def missing_class(report, root):
    """Missing-class transfer per teacher: test errors and errors on the missing
    class, raw and with that class's bias shifted, per model; the figure: the share
    of the missing class each student gets right."""
    tables = _tables(report, root, "missing", "missing-class transfer", "teacher,missing")
    if not tables:
        return
    cls = tables[0]["missing_class"]
    groups = _rows_by(tables, lambda row: (row.get("teacher", "" if "scratch" in row["model"] else "course"),
                                           row["model"], row["bias"] == "shifted"))
    lines = [f"| teacher | model | {cls}'s bias | test errors | errors on the {cls}s | {cls}s right (%) | "
             "test accuracy (%) |", "|---|---|---|---:|---:|---:|---:|"]
    for (teacher, model, shifted), rows in groups.items():
        chosen = next((r["chosen_by"] for r in rows if r["chosen_by"]), "")  # empty where no seed shifted
        shift = (f"+{_mean([r['bias_shift'] for r in rows], digits=1)}" + (f" (on {chosen})" if chosen else "")
                 if shifted else "as trained")
        lines.append(f"| {teacher or '—'} | {model} | {shift} | {_mean([r['test_errors'] for r in rows], digits=1)} | "
                     f"{_mean([r['class_errors'] for r in rows], digits=1)} of {rows[0]['class_examples']} | "
                     f"{_mean([r['class_accuracy'] for r in rows], 100)} | "
                     f"{_mean([r['test_accuracy'] for r in rows], 100)} |")
    _section(report, tables, f"### Missing-class transfer (Hinton et al. 2015, §3)\n\nThe students never see a {cls} in "
                f"training; each teacher does. The {cls}'s output bias is then raised by the shift that maximises "
                "validation accuracy (the paper: +3.5, chosen on the test set; 206 test errors, 133 on the 1,010 "
                "test 3s, before; 109, 14 on 3s, after. Vats 2021: a small teacher's students get 94.25-99.48% of "
                "the missing class right, a large teacher's mostly under 3%).\n\n", lines)
    students = {}
    for (teacher, model, shifted), rows in groups.items():
        if not model.startswith("teacher"):
            label = f"KD, {teacher} teacher" if teacher else "scratch"
            students.setdefault(label, {})["bias shifted" if shifted else "as trained"] = [
                100 * r["class_accuracy"] for r in rows]
    _bars(report, root, "missing", f"Share of the test {cls}s each student gets right without having seen one, as "
          f"trained and with the {cls}'s bias shifted (mean ± std over seeds).", f"{cls}s right (%)", students,
          ylim=(0, 100))


def smoothed_teacher(report, root):
    """KD from a label-smoothed teacher against KD from the plain one."""
    tables = _tables(report, root, "smoothed_teacher", "KD from a label-smoothed teacher", "smoothed")
    if not tables:
        return
    groups = _rows_by(tables, lambda row: row["model"])
    metric = tables[0].get("metric", "test_accuracy")
    lines = [f"| model | {metric.replace('_', ' ')} (%) | soft-target entropy at T={tables[0]['temperature']:g} "
             "(nats) |", "|---|---:|---:|"]
    for model, rows in groups.items():
        entropy = [r["soft_target_entropy_nats"] for r in rows if r["soft_target_entropy_nats"] is not None]
        lines.append(f"| {model} | {_mean([r[metric] for r in rows], 100)} | "
                     f"{_mean(entropy, digits=3) if entropy else '—'} |")
    _section(report, tables, "### KD from a label-smoothed teacher (Müller et al. 2019)\n\nThe same teacher architecture and "
                f"schedule trained with label smoothing (eps={tables[0]['epsilon']:g}), and a KD student of each "
                "teacher (Müller et al.: smoothed teachers distil worse).\n\n", lines)


def data_efficiency(report, root):
    """Student test metric against examples per class, by transfer-set choice."""
    tables = _tables(report, root, "data_efficiency", "data efficiency", "efficiency")
    if not tables:
        return
    metric = tables[0].get("metric", "test_accuracy")
    shown = metric.replace("_", " ").replace("auc", "AUC")
    columns = (("kd", "random"), ("kd", "entropy"), ("scratch", "random"))
    cells = {key: [r[metric] for r in rows] for key, rows in
             _rows_by(tables, lambda row: (row["per_class"], row["method"], row["selection"])).items()}
    lines = ["| examples per class | KD, random (%) | KD, highest-entropy (%) | scratch, random (%) |",
             "|---:|---:|---:|---:|"]
    for n in sorted({key[0] for key in cells}):
        lines.append(f"| {n} | " + " | ".join(_mean(cells[(n, *c)], 100) if (n, *c) in cells else "—"
                                               for c in columns) + " |")
    _section(report, tables, f"### Data efficiency\n\nThe {shown} of students trained on N examples of each class "
                "(repeated to the full "
                "set's size, so each run takes the course's steps), chosen at random or as the N whose softened "
                f"teacher output at T={tables[0]['temperature']:g} has the highest entropy (Vats 2021: over 95% "
                "from 60 high-entropy examples per class with a small teacher).\n\n", lines)
    _curves(report, root, "data_efficiency", f"Student {shown} against examples per class (mean ± std over "
            "seeds).", "examples per class", f"{shown} (%)", {
                label: _points(tables, lambda r: r["per_class"], lambda r: 100 * r[metric],
                               lambda r, c=choice: (r["method"], r["selection"]) == c)
                for choice, label in ((("kd", "random"), "KD, random"), (("kd", "entropy"), "KD, highest-entropy"),
                                      (("scratch", "random"), "scratch, random"))}, log_x=True)


ROLES = (("member", "a member teacher", "members"), ("ensemble", "their ensemble", "ensemble"),
         ("student", "the student distilled from the ensemble", "its student"),
         ("single-teacher student", "a KD student of one teacher (its seed's)", "one teacher's\nstudent"))
# the ensemble table's rows: (role, label in the table, label in the figure)


def _same_model(row):
    """What makes two seeds' ensemble rows one model: a member's run, or the ensemble of
    the same members (`ensemble-m0.1.2-s<seed>`, its name without the seed)."""
    return row["run"].rsplit("-s", 1)[0] if row["model"] == "ensemble" else row["run"]


def ensemble(report, root):
    """Members, their mean-logit ensemble and the student distilled from it."""
    tables = _tables(report, root, "ensemble", "ensemble teacher", "ensemble")
    if not tables:
        return
    groups = _rows_by(tables, lambda row: row["model"])
    metric = tables[0].get("metric", "test_accuracy")
    lines = [f"| model | {metric.replace('_', ' ')} (%) | the student agrees with it (%) |", "|---|---:|---:|"]
    scores = {}  # role: its test metric, once per run (every seed's table holds the same members)
    for role, label, short in ROLES:
        rows = groups.get(role, [])
        fidelity = [r["student_fidelity"] for r in rows if r["student_fidelity"] is not None]
        if rows:
            scores[short] = list({_same_model(r): 100 * r[metric] for r in rows}.values())
            lines.append(f"| {label} | {_mean(scores[short])} | {_mean(fidelity, 100) if fidelity else '—'} |")
    seeds = ", ".join(map(str, tables[0]["seeds"]))
    _section(report, tables, f"### Ensemble teacher\n\nThe teachers of seeds {seeds}, their logits averaged, distilled into "
                "one student by KD (Gardner 2022, CIFAR-10: members 84.37 ± 0.32%, ensemble 87.95%, student "
                "85.32%), beside each seed's KD student of its own teacher alone. Mean ± std over members and "
                "seeds.\n\n", lines)
    low = min(min(values) for values in scores.values())
    _bars(report, root, "ensemble", f"{metric.replace('_', ' ').capitalize()} of the member teachers, their ensemble, "
          "the student distilled from it and a student of one teacher (mean ± std over members and seeds).",
          f"{metric.replace('_', ' ')} (%)", {label: {"": values} for label, values in scores.items()},
          ylim=(np.floor(low - 0.5), 100))


def teacher_capacity(report, root):
    """Teachers of each size, their soft targets' entropy and their students."""
    tables = _tables(report, root, "teacher_capacity", "teacher capacity", "capacity")
    if not tables:
        return
    metric = tables[0].get("metric", "test_accuracy")
    shown = metric.replace("_", " ").replace("auc", "AUC")
    lines = [f"| teacher | params | teacher {shown} (%) | entropy at T={tables[0]['temperature']:g} (nats) | "
             f"student {shown} (%) | student agrees with it (%) |", "|---|---:|---:|---:|---:|---:|"]
    for preset, rows in _rows_by(tables, lambda row: row["preset"]).items():
        fidelity = [r["student_fidelity"] for r in rows if r["student_fidelity"] is not None]
        lines.append(f"| {preset} | {rows[0]['teacher_params']:,} | "
                     f"{_mean([r[f'teacher_{metric}'] for r in rows], 100)} | "
                     f"{_mean([r['soft_target_entropy_nats'] for r in rows], digits=3)} | "
                     f"{_mean([r[f'student_{metric}'] for r in rows], 100)} | "
                     f"{_mean(fidelity, 100) if fidelity else '—'} |")
    _section(report, tables, "### Teacher capacity\n\nOne teacher per size, the same schedule, and a KD student of each (Vats "
                "2021: on MNIST the bigger teacher distilled worse).\n\n", lines)
    _curves(report, root, "teacher_capacity", f"Teacher and KD student {shown} against the teacher's parameters "
            "(mean ± std over seeds).", "teacher parameters", f"{shown} (%)", {
                label: _points(tables, lambda r: r["teacher_params"], lambda r, k=key: 100 * r[k])
                for key, label in ((f"teacher_{metric}", "teacher"), (f"student_{metric}", "KD student"))}, log_x=True)


def attributions(report, root):
    """Foreground share of integrated-gradient mass per model, and KD against scratch."""
    tables = _tables(report, root, "attributions", "gradient attributions", "attributions")
    if not tables:
        return
    groups = _rows_by(tables, lambda row: (row["model"], row["class"]))
    classes = sorted({c for _, c in groups})
    lines = ["| digit | teacher (%) | KD student (%) | scratch student (%) |",
             "|---:|---:|---:|---:|"]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(_mean([r["foreground_share"] for r in groups[(m, c)]], 100)
                                              if (m, c) in groups else "—" for m in ("teacher", "kd", "scratch"))
                     + " |")
    tests = "; ".join(f"seed {i}: KD above scratch in {t['kd_vs_scratch']['higher']} of "
                      f"{t['kd_vs_scratch']['classes']} classes, Wilcoxon p = "
                      + (f"{t['kd_vs_scratch']['wilcoxon_p']:.3g}" if t["kd_vs_scratch"]["wilcoxon_p"] is not None
                         else "n/a") for i, t in enumerate(tables))
    _section(report, tables, f"### Gradient attributions\n\nShare of each model's integrated-gradient mass on the digit's ink "
                f"(pixels > {tables[0]['foreground_threshold']:g}), mean per digit over the first {tables[0]['images']} "
                "test images (Thapa 2022: KD above scratch in 10 of 10 classes, Wilcoxon p = "
                f"0.00195). {tests}.\n\n", lines)
    _bars(report, root, "attributions", "Share of the integrated-gradient mass on the ink, per digit (mean ± std over "
          "seeds).", "foreground share (%)", {
              str(c): {label: [100 * r["foreground_share"] for r in groups[(m, c)]]
                       for m, label in (("teacher", "teacher"), ("kd", "KD student"), ("scratch", "scratch student"))
                       if (m, c) in groups} for c in classes})


NOISE_SECTIONS = {  # table stem: (heading, --only, level column, its scale, what the corruption is)
    "label_noise": ("Label noise", "noise", "wrong training labels (%)", 100,
                    "A share of the training labels replaced by another class at random"),
    "image_noise": ("Image noise", "corruption", "pixel noise std (× full range)", 1,
                    "Gaussian noise, clipped to the pixel range, added to every training image"),
}


def training_noise(report, root, stem):
    """Teacher, KD and scratch test accuracy against the level of one corruption of
    the training set (`NOISE_SECTIONS`, `kdtoolkit.runner.studies.training_noise`)."""
    heading, only, column, scale, what = NOISE_SECTIONS[stem]
    tables = _tables(report, root, stem, heading.lower(), only)
    if not tables:
        return
    lines = [f"| {column} | teacher (%) | KD student (%) | scratch student (%) | KD − scratch (points) |",
             "|---:|---:|---:|---:|---:|"]
    for level, rows in _rows_by(tables, lambda row: row[stem]).items():
        lines.append(f"| {level * scale:g} | " + " | ".join(_mean([r[k] for r in rows], 100) for k in (
            "teacher_test_accuracy", "kd_test_accuracy", "scratch_test_accuracy", "kd_gain")) + " |")
    _section(report, tables, f"### {heading}\n\n{what} (validation and test sets clean); the teacher and both students "
                "learn from it (Thapa 2022: KD's largest gain under the heaviest corruption).\n\n", lines)
    _curves(report, root, stem, f"{heading}: test accuracy of the teacher and both students (mean ± std over "
            "seeds).", column, "test accuracy (%)", {
                label: _points(tables, lambda r: r[stem] * scale, lambda r, k=key: 100 * r[k])
                for key, label in (("teacher_test_accuracy", "teacher"), ("kd_test_accuracy", "KD student"),
                                   ("scratch_test_accuracy", "scratch student"))})


def explanation_dynamics(report, root):
    """Agreement of each teacher checkpoint's maps with the ensemble's, epoch by epoch,
    per kind of map (tables saved before occlusion was added hold integrated gradients)."""
    tables = _tables(report, root, "explanation_dynamics", "explanations over training", "dynamics")
    if not tables:
        return
    threshold = tables[0]["threshold"]
    lines = [f"| maps | teacher epoch | on-target r | on-target r > {threshold:g} (%) | off-target r | "
             f"off-target r > {threshold:g} (%) |", "|---|---:|---:|---:|---:|---:|"]
    groups = _rows_by(tables, lambda row: (row.get("maps", "integrated gradients"), row["epoch"]))
    for (kind, epoch), rows in groups.items():
        lines.append(f"| {kind} | {epoch} | " + " | ".join(
            _mean([r[f"{side}_target_{k}"] for r in rows], scale, digits)
            for side in ("on", "off") for k, scale, digits in (("mean_r", 1.0, 3), ("share", 100, 1))) + " |")
    _section(report, tables, "### Explanations over training\n\nOcclusion and integrated-gradient maps of the teacher after "
             "each epoch against those of the ensemble of the teachers of seeds "
             f"{', '.join(map(str, tables[0]['seeds']))}, on {tables[0]['images']} test images, for the true class "
             "(on-target) and the ensemble's next class (off-target) (Gardner 2022, occlusion maps: share above "
             "r = 0.53 from 78% to 98% on-target, 52% to 87% off-target).\n\n", lines)
    kinds = dict.fromkeys(kind for kind, _ in groups)
    _curves(report, root, "explanation_dynamics", f"Share of the teacher's maps with Pearson r > {threshold:g} "
            "against the ensemble's, after each epoch.", "teacher epoch", f"maps with r > {threshold:g} (%)", {
                f"{kind}, {side}-target": _points(tables, lambda r: r["epoch"],
                                                  lambda r, s=side: 100 * r[f"{s}_target_share"],
                                                  lambda r, k=kind: r.get("maps", "integrated gradients") == k)
                for kind in kinds for side in ("on", "off")})
    saved = sorted(root.glob("explanation_dynamics-s*.npz"))
    if saved:
        _dynamics_maps(report, root, saved[0], kinds)


def _dynamics_maps(report, root, path, kinds):
    """The figure of maps across checkpoints: per kind of map and shown image, the
    image, the ensemble's on-target map, then the teacher's after up to 4 epochs."""
    problem = npz_problem(path)
    if problem:
        report.damaged[str(path)] = problem
        return
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    epochs = arrays["epochs"]
    picked = np.unique(np.linspace(0, len(epochs) - 1, min(4, len(epochs))).round().astype(int))
    rows = [(kind, i) for kind in kinds if f"{kind.replace(' ', '_')}_epochs" in arrays
            for i in range(len(arrays["images"]))]
    fig, axes = plt.subplots(len(rows), 2 + len(picked), figsize=(1.5 * (2 + len(picked)), 1.5 * len(rows)),
                             squeeze=False)
    for (kind, i), line in zip(rows, axes):
        key = kind.replace(" ", "_")
        panels = [("image", arrays["images"][i]), ("ensemble", arrays[f"{key}_ensemble"][i]),
                  *((f"epoch {epochs[e]}", arrays[f"{key}_epochs"][e, i]) for e in picked)]
        for ax, (title, picture) in zip(line, panels):
            ax.imshow(np.squeeze(picture), cmap="gray" if title == "image" else "magma")
            ax.set_title(title if title != "image" else f"{kind}, class {arrays['labels'][i]}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    report.figure(fig, root.name, "explanation_dynamics_maps", f"On-target maps of the seed's teacher across its "
                  f"checkpoints beside the ensemble's ({path.stem}).")


def studies(report, root):
    """Every study's table that `root` holds (nothing when it holds none)."""
    if not any(any(root.glob(f"{stem}-s*.json")) for stem in STEMS):
        return
    report.text("### Research studies\n\nOpt-in experiments beside the course (`docs/studies.md`).\n")
    missing_class(report, root)
    smoothed_teacher(report, root)
    data_efficiency(report, root)
    ensemble(report, root)
    teacher_capacity(report, root)
    attributions(report, root)
    training_noise(report, root, "label_noise")
    training_noise(report, root, "image_noise")
    explanation_dynamics(report, root)
