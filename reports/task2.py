"""Task 2's (MHIST) section of the report: headline table, ROC curves and
confusion matrices, the AUC against T, fidelity and calibration, methods,
deployment, studies, FLOPs, explanations and cost."""

import matplotlib.pyplot as plt
import numpy as np

from reports.document import fmt, guarded
from reports.figures import explanation_panel, t_curve_figure
from reports.read import damaged, finished_records, json_file
from reports.records import grouped, headline_key, headline_label, is_synthetic, phase_key, settings_line, test_count
from reports.sections import cost_table, deployment_table, flops_table, methods_table, quality
from reports.studies import studies


HEADLINE_TASK2 = [  # headline_key of fine-tuned runs -> label
    ("teacher", "teacher ResNet50V2"),
    ("kd", "KD student MobileNetV2 (T={temperature:g}, alpha={alpha:g})"),
    ("scratch", "student from scratch"),
    ("teacher-init_none", "teacher, random init"),
    ("scratch-init_none", "student, random init"),
    ("skd-teacher", "subclass teacher (known subclasses)"),
    ("skd", "subclass KD student"),
    ("ta", "assistant DenseNet121"),
    ("takd", "TAKD student (via assistant)"),
]


def task2(report, root):
    records = finished_records(root)
    if not records:
        report.skip("Task 2", f"no finished runs in {root}")
        return
    synthetic = is_synthetic(records)
    report.text("## Task 2: MHIST" + (" — SYNTHETIC images (noise, not tissue: numbers test the pipeline, "
                                      "not the method)" if synthetic else "") + "\n")
    finetuned = phase_key("finetune")
    auc, acc, f1 = (grouped(records, m, finetuned) for m in ("test_auc", "test_accuracy", "test_f1"))
    rows = ["| model | AUC (%) | accuracy (%) | F1 (%) | params | FLOPs |", "|---|---:|---:|---:|---:|---:|"]
    for group, label in HEADLINE_TASK2:
        if group in auc:
            record = auc[group][3]
            rows.append(f"| {headline_label(label, record)} | {fmt(*auc[group][:3])} | {fmt(*acc[group][:3])} "
                        f"| {fmt(*f1[group][:3])} "
                        f"| {record['params']:,} | {record['flops']:,} |")
    if len(rows) > 2:
        # Each fine-tuned row started from its feature-extraction run: both phases' settings are named.
        shown = [r for r in records if headline_key(r) in dict(HEADLINE_TASK2)]
        where = f"the whole {'SYNTHETIC ' if synthetic else ''}MHIST test set ({test_count(shown)}images)"
        report.text(f"Test metrics over {where} after fine-tuning (SSA is the positive class; "
                    "mean ± std over seeds).\n\n" + "\n".join(rows) + "\n\n" + settings_line(shown))
    first_seed = min(x.get("seed", 0) for x in records)
    by_key = {finetuned(r): r for r in records if r.get("seed", 0) == first_seed and finetuned(r) is not None}
    shown = [(headline_label(label, by_key[g]), by_key[g]) for g, label in HEADLINE_TASK2[:3]
             if g in by_key and "roc_curve" in by_key[g]]
    if shown:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        for label, record in shown:
            ax.plot(record["roc_curve"]["fpr"], record["roc_curve"]["tpr"], label=f"{label} (AUC {record['test_auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("false positive rate (HP called SSA)")
        ax.set_ylabel("true positive rate (SSA found)")
        ax.set_title("ROC curves (test set)")
        ax.legend(fontsize=7, loc="lower right")
        report.figure(fig, "task2", "roc_curves", "ROC curves of teacher, KD student and scratch student (first seed).")
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.0), squeeze=False)
        for ax, (label, record) in zip(axes[0], shown):
            matrix = np.array(record["confusion_matrix"])
            ax.imshow(matrix, cmap="Blues")
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, str(value), ha="center", va="center",
                        color="white" if value > matrix.max() / 2 else "black")
            ax.set_xticks([0, 1], ["HP", "SSA"])
            ax.set_yticks([0, 1], ["HP", "SSA"])
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(label, fontsize=8)
        report.figure(fig, "task2", "confusion_matrices", "Confusion matrices on the test set (first seed; "
                      "prediction = the more probable class).")
    else:
        report.skip("ROC curves and confusion matrices", "no fine-tuned teacher/KD/scratch runs with ROC points")
    cells, kd_runs = {}, []
    for r in records:
        ident = r.get("identity", {})
        if ident.get("experiment") == "kd" and ident.get("phase") == "finetune":
            cells.setdefault(ident["temperature"], []).append(r["test_auc"])
            kd_runs.append(r)
    if len(cells) >= 2:
        choices = []
        for path in sorted(root.glob("tcurve-s*.json")):
            saved = json_file(path)
            if not (isinstance(saved, dict) and isinstance(saved.get("best"), dict)):
                if saved is not None:
                    damaged(path, f"{path} is not a T-curve table (no best cell)")
                continue
            chosen_by = saved.get("chosen_by", "test_auc")
            choices.append(f"{path.stem.split('-')[-1].replace('s', 'seed ')}: T={saved['best']['temperature']:g} "
                           f"by {chosen_by.replace('_', ' ')}" + (" (on the TEST set: no validation split)"
                                                                   if chosen_by.startswith("test") else ""))
        t_curve_figure(report, "task2", "t_curve_auc", cells, "student test AUC (%)", "KD student AUC against T",
                       "MobileNetV2 student AUC after fine-tuning against the KD temperature; "
                       "error bars: std over seeds where there are several."
                       + (" Best T: " + "; ".join(choices) + "." if choices else ""))
        report.text(settings_line(kd_runs))
    else:
        report.skip("Task 2 T curve", "fewer than two temperatures among the fine-tuned KD runs")
    guarded(report, "Task 2 quality", quality, report, root, records, HEADLINE_TASK2, finetuned, "task2")
    guarded(report, "Task 2 methods table", methods_table, report, root, records, "test_auc", finetuned, "task2")
    guarded(report, "Task 2 deployment table", deployment_table, report, root, "test_auc")
    guarded(report, "Task 2 studies", studies, report, root)
    guarded(report, "Task 2 FLOPs table", flops_table, report, root / "flops.csv")
    for kind in ("lime", "occlusion"):
        guarded(report, f"{kind} panels (task2)", explanation_panel, report, root / "explain", kind, "task2")
    guarded(report, "Task 2 cost", cost_table, report, root, records)
