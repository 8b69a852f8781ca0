"""Task 1's (MNIST) section of the report: headline table, fidelity and
calibration, per-digit table, T x alpha grid, bars, learning curves, methods,
deployment, early-stopped teachers, studies, teacher entropy, FLOPs,
explanations and cost."""

import matplotlib.pyplot as plt
import numpy as np

from kdtoolkit.runner.results import mean_std
from reports.document import fmt, guarded
from reports.figures import explanation_panel, t_curve_figure
from reports.per_class import per_class_table
from reports.read import damaged, finished_records, json_file, read_csv
from reports.records import grouped, headline_key, headline_label, is_synthetic, settings_line, test_count
from reports.sections import cost_table, deployment_table, flops_table, methods_table, quality
from reports.studies import studies


HEADLINE = [  # headline_key -> label (filled from the first run's identity)
    ("teacher", "teacher"),
    ("kd", "KD student (T={temperature:g}, alpha={alpha:g})"),
    ("scratch", "student from scratch"),
    ("skd-teacher", "subclass teacher ({subclasses:g} subclasses/class)"),
    ("skd", "subclass KD student"),
    ("ta", "teacher assistant"),
    ("takd", "TAKD student (via assistant)"),
]


def task1(report, root, metric="test_accuracy"):
    records = finished_records(root)
    if not records:
        report.skip("Task 1", f"no finished runs in {root}")
        return
    report.text("## Task 1: MNIST" + (" (SYNTHETIC data)" if is_synthetic(records) else "") + "\n")
    guarded(report, "Task 1 headline table", lambda: headline_table(report, grouped(records, metric, headline_key),
                                                                    records))
    guarded(report, "Task 1 quality", quality, report, root, records, HEADLINE, headline_key, "task1")
    guarded(report, "Task 1 per-class table", per_class_table, report, records, headline_key)
    guarded(report, "Task 1 grid", grid_figures, report, records, metric, root)
    guarded(report, "Task 1 bars", lambda: bars(report, grouped(records, metric)))
    guarded(report, "Task 1 learning curves", learning_curves, report, records)
    guarded(report, "Task 1 methods table", methods_table, report, root, records, metric, headline_key, "task1")
    guarded(report, "Task 1 deployment table", deployment_table, report, root, metric)
    guarded(report, "Task 1 eskd table", eskd_table, report, root, records)
    guarded(report, "Task 1 studies", studies, report, root)
    guarded(report, "Task 1 teacher entropy", entropy_figure, report, root)
    guarded(report, "Task 1 FLOPs table", flops_table, report, root / "flops.csv")
    for kind in ("lime", "occlusion"):
        guarded(report, f"{kind} panels (task1)", explanation_panel, report, root / "explain", kind, "task1")
    guarded(report, "Task 1 cost", cost_table, report, root, records)


def headline_table(report, stats, records):
    rows = ["| model | test accuracy (%) | params | FLOPs |", "|---|---:|---:|---:|"]
    for group, label in HEADLINE:
        if group in stats:
            mean, std, n, record = stats[group]
            rows.append(f"| {headline_label(label, record)} | {fmt(mean, std, n)} | {record['params']:,} "
                        f"| {record['flops']:,} |")
    if len(rows) > 2:
        shown = [r for r in records if headline_key(r) in dict(HEADLINE)]
        report.text(f"Test accuracy on the {test_count(shown)}test images (mean ± sample std over seeds).\n\n"
                    + "\n".join(rows) + "\n\n" + settings_line(shown))
    else:
        report.skip("Task 1 headline table", "no teacher/KD/scratch runs")


def kd_cells(records, metric, seeds=None):
    """`{(T, alpha): [values over seeds]}` from the KD student runs straight from the
    teacher (of `seeds` only, when given)."""
    cells = {}
    for r in records:
        ident = r.get("identity", {})
        if ident.get("experiment") == "kd" and r.get(metric) is not None and (seeds is None or r.get("seed") in seeds):
            cells.setdefault((ident["temperature"], ident["alpha"]), []).append(r[metric])
    return cells


def grid_figures(report, records, metric, root):
    grids = {}
    for path in sorted(root.glob("grid-s*.json")):
        grid = json_file(path)
        if grid is not None and not (isinstance(grid, dict) and isinstance(grid.get("best"), dict)
                                     and isinstance(grid.get("cells"), list)):
            damaged(path, f"{path} is not a grid table (no best cell or cells)")
            grid = None
        if grid is not None:
            grids[int(path.stem.split("-s")[-1])] = grid
    # Only the seeds that ran the whole grid: a cell run for more seeds (T=4, alpha=0.5) is not averaged differently.
    seeds = set(grids) or None
    records = [r for r in records if seeds is None or r.get("seed") in seeds]
    cells = kd_cells(records, metric, seeds)
    temperatures = sorted({t for t, _ in cells})
    alphas = sorted({a for _, a in cells})
    if len(temperatures) < 2:
        report.skip("T curve and T x alpha heatmap", "fewer than two temperatures in the KD runs")
        return
    curve = {t: cells[(t, 0.5)] for t in temperatures if (t, 0.5) in cells}
    if len(curve) >= 2:
        t_curve_figure(report, "task1", "t_curve", curve, "student test accuracy (%)",
                       "KD student against T (alpha = 0.5)",
                       "KD student test accuracy against temperature at alpha = 0.5; "
                       "error bars: std over seeds where there are several.")
    grid = np.full((len(alphas), len(temperatures)), np.nan)
    for (t, a), values in cells.items():
        grid[alphas.index(a), temperatures.index(t)] = np.mean(values) * 100
    fig, ax = plt.subplots(figsize=(6, 2.2 + 0.4 * len(alphas)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("alpha (hard-label weight)")
    for i in range(len(alphas)):
        for j in range(len(temperatures)):
            if np.isfinite(grid[i, j]):
                bright = image.norm(grid[i, j]) > 0.6  # dark text on the light end of viridis
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="black" if bright else "white", fontsize=8)
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    ax.set_title("KD student: T x alpha grid")
    report.figure(fig, "task1", "grid_heatmap", "Student test accuracy (%) for every (T, alpha) cell.")
    rows = ["| T | " + " | ".join(f"alpha={a:g}" for a in alphas) + " |", "|---" * (len(alphas) + 1) + "|"]
    for t in temperatures:
        rows.append(f"| {t:g} | " + " | ".join(
            fmt(*mean_std(cells[(t, a)]), len(cells[(t, a)])) if (t, a) in cells else "" for a in alphas) + " |")
    best = []
    for seed, grid in sorted(grids.items()):
        cell, chosen_by = grid["best"], grid.get("chosen_by", "test_accuracy")
        best.append(f"seed {seed}: T={cell['temperature']:g}, alpha={cell['alpha']:g} by {chosen_by.replace('_', ' ')} "
                    f"({cell[chosen_by] * 100:.2f}%), test accuracy {cell['test_accuracy'] * 100:.2f}%")
    chosen = ("Best cell, chosen per seed as the run saved it" + (
        " (on the TEST set: these runs had no validation split, so the choice is optimistic)"
        if any(g.get("chosen_by", "test_accuracy").startswith("test") for g in grids.values()) else
        " on the validation split; the test set only reports") + ": " + "; ".join(best) + "."
        if best else "No grid-s*.json: no best cell chosen.")
    kd_records = [r for r in records if r.get("identity", {}).get("experiment") == "kd"]
    report.text("Grid (test accuracy %). " + chosen + "\n\n" + "\n".join(rows) + "\n\n" + settings_line(kd_records))


def bars(report, stats):
    present = [(label, stats[g]) for g, label in HEADLINE if g in stats]
    if len(present) < 2:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    labels = [label.replace(" (", "\n(") for label, _ in present]
    means = np.array([s[0] for _, s in present]) * 100
    stds = np.array([s[1] for _, s in present]) * 100
    ax.bar(range(len(present)), means, yerr=stds, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(present)), labels, rotation=30, ha="right", fontsize=8)
    low = max(0.0, means.min() - 2 * max(stds.max(), 0.2) - 0.5)
    ax.set_ylim(low, min(100.0, means.max() + 2 * max(stds.max(), 0.2) + 0.3))
    for i, m in enumerate(means):
        ax.text(i, m, f"{m:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    n = max(s[2] for _, s in present)
    ax.set_title(f"Test accuracy (mean ± std over {n} seeds)" if n > 1 else "Test accuracy (one seed)")
    report.figure(fig, "task1", "accuracy_bars", "Test accuracy of each model; error bars are the sample "
                  "std over seeds (none for a single seed). The y axis does not start at 0.")


def learning_curves(report, records):
    wanted = {"teacher": "teacher", "kd": "KD student (T=4, alpha=0.5)", "scratch": "scratch student"}
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    drawn = 0
    for experiment, label in wanted.items():
        runs = [r for r in records if r.get("experiment") == experiment
                and (experiment != "kd" or (r["identity"].get("temperature"), r["identity"].get("alpha")) == (4.0, 0.5))]
        if not runs:
            continue
        curves = np.array([[h["test_accuracy"] for h in r["history"]] for r in runs]) * 100
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), marker=".", label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.2)
        drawn += 1
    if not drawn:
        plt.close(fig)
        report.skip("learning curves", "no teacher/KD/scratch history")
        return
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Learning curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    report.figure(fig, "task1", "learning_curves", "Test accuracy after each epoch (mean over seeds; band: min-max).")


def eskd_table(report, root, records):
    files = sorted(root.glob("eskd-s*.csv"))
    if not files:
        report.skip("early-stopped teachers", "no eskd-s*.csv")
        return
    by_epoch = {}
    for path in files:
        for row in read_csv(path):
            entry = by_epoch.setdefault(int(row["teacher_epoch"]), ([], []))
            entry[0].append(float(row["teacher_test_accuracy"]))
            entry[1].append(float(row["student_test_accuracy"]))
    rows = ["| teacher epoch | teacher accuracy (%) | student accuracy (%) |", "|---:|---:|---:|"]
    for epoch, (teacher, student) in sorted(by_epoch.items()):
        rows.append(f"| {epoch} | {fmt(*mean_std(teacher), len(teacher))} | {fmt(*mean_std(student), len(student))} |")
    shown = [r for r in records if str(r.get("experiment", "")).startswith("eskd")]
    report.text("Early-stopped teachers (Cho & Hariharan 2019): a student distilled from the teacher's "
                "checkpoint after each epoch.\n\n" + "\n".join(rows) + "\n\n" + settings_line(shown))


def entropy_figure(report, root):
    files = sorted(root.glob("teacher_entropy-s*.csv"))
    if not files:
        report.skip("teacher entropy against T", "no teacher_entropy-s*.csv")
        return
    fig, ax = plt.subplots(figsize=(5, 3.3))
    temperatures = set()
    for path in files:
        rows = read_csv(path)
        temperatures |= {float(r["temperature"]) for r in rows}
        ax.plot([float(r["temperature"]) for r in rows], [float(r["entropy_nats"]) for r in rows],
                marker="o", label=path.stem.split("-")[-1].replace("s", "seed "))
    ax.axhline(np.log(10), color="grey", linestyle="--", label="uniform (log 10)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(temperatures), [f"{t:g}" for t in sorted(temperatures)])
    ax.set_xlabel("temperature T (log scale)")
    ax.set_ylabel("mean entropy (nats)")
    ax.set_title("Teacher soft targets: entropy against T")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    report.figure(fig, "task1", "teacher_entropy", "Mean entropy of softmax(teacher logits / T) over the "
                  "training images: how much the soft targets carry beyond the label.")
