"""Sections both tasks' reports show: fidelity and calibration, the distillation
methods table, deployment, parameters and FLOPs, and cost."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kdtoolkit.metrics import reliability
from kdtoolkit.files import read_jsonl
from kdtoolkit.runner.results import mean_std
from reports import registry
from reports.document import fmt
from reports.read import damaged, outputs_of, read_csv
from reports.records import configured, fidelity_to_teacher, headline_label, seed_teacher, settings_line


def quality(report, root, records, headline, key, task):
    """Student quality beyond accuracy: fidelity (top-1 agreement with the model it
    was distilled from, or its seed's teacher, on the test set) and expected
    calibration error, mean ± std over seeds, and reliability diagrams of teacher,
    KD student and scratch student. `key`: a record's headline row."""
    rows = ["| model | fidelity to the teacher (%) | test ECE (%) |", "|---|---:|---:|"]
    shown = []
    teachers = seed_teacher(records, key)
    for group, label in headline:
        runs = [r for r in records if key(r) == group and r.get("test_ece") is not None]
        if not runs:
            continue
        shown += runs
        fidelity = [f for f in (fidelity_to_teacher(root, r, teachers) for r in runs) if f is not None]
        ece = [r["test_ece"] for r in runs]
        label = headline_label(label, runs[0])
        rows.append(f"| {label} | {fmt(*mean_std(fidelity), len(fidelity)) if fidelity else '—'} "
                    f"| {fmt(*mean_std(ece), len(ece))} |")
    if not shown:
        report.skip(f"fidelity and calibration ({task})", "no runs with test_ece (results from before it was recorded)")
        return
    report.text("Fidelity: how often a model predicts the class its seed's teacher predicts, on the test set. "
                "Calibration: expected calibration error over 15 equal-width confidence bins (0 = confidence "
                "matches accuracy).\n\n" + "\n".join(rows) + "\n\n" + settings_line(shown))
    panels = []
    for group, label in headline[:3]:
        runs = sorted((r for r in shown if key(r) == group), key=lambda r: r.get("seed", 0))
        found = outputs_of(root, runs[0]["run"]) if runs else None
        if found is not None:
            panels.append((headline_label(label, runs[0]), runs[0], found))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2), squeeze=False)
    for ax, (label, record, (logits, labels)) in zip(axes[0], panels):
        table = reliability(logits, labels)
        centres = (table["edges"][:-1] + table["edges"][1:]) / 2
        used = table["count"] > 0
        ax.bar(centres[used], table["accuracy"][used], width=1 / len(centres), edgecolor="black", alpha=0.7,
               label="accuracy")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label}\nECE {record['test_ece'] * 100:.2f}% ({record['run']})", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    report.figure(fig, task, "reliability", "Reliability diagrams on the test set (first seed): accuracy per "
                  "confidence bin; bars below the diagonal are over-confident.")


def method_title(name):
    """The registered method's title for tables: its summary up to the colon."""
    return registry.methods()[name].summary.split(":")[0]


def method_names():
    """`{method: title}` of every registered method (registry order), then the scratch student."""
    return {**{name: method_title(name) for name in registry.methods()}, "scratch": "no teacher (scratch)"}


def method_runs(records):
    """A DataFrame of the final runs of each student method at its invocation's
    configured settings (`configured`), one row per seed: `method`, `seed`, `run`, the
    metrics. Runs are found by their recorded identity: the student distilled straight
    from the teacher by a registered method (its experiment), and the scratch student;
    Task 2's feature-extraction phase is left out when fine-tuning ran."""
    rows = []
    names = method_names()
    for r in records:
        ident, config = r.get("identity", {}), r.get("config", {})
        method = ident.get("experiment")
        if method not in names or not configured(r):
            continue
        if ident.get("phase") == "feature-extraction" and config.get("phase") != "feature-extraction":
            continue
        rows.append({"method": method, "seed": r.get("seed", 0), "run": r["run"], "record": r,
                     **{k: v for k, v in r.items() if k.startswith("test_") and isinstance(v, (int, float))}})
    return pd.DataFrame(rows)


def noise_call(values, reference):
    """Whether two seed samples differ by more than their noise: |difference of means| >
    2 standard errors (sqrt(s_a²/n_a + s_b²/n_b)); "within seed noise" otherwise."""
    a, b = np.asarray(values, float), np.asarray(reference, float)
    if len(a) < 2 or len(b) < 2:
        return "one seed: no call"
    error = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    difference = a.mean() - b.mean()
    if abs(difference) <= 2 * error:
        return "within seed noise"
    return "above KD" if difference > 0 else "below KD"


def methods_table(report, root, records, metric, key, task):
    """Every distillation method of the registry against KD and scratch: the test metric,
    fidelity to the seed's teacher and ECE (mean ± std over seeds), and whether the
    difference to KD is beyond seed noise."""
    frame = method_runs(records)
    if frame.empty or frame["method"].nunique() < 3:
        report.skip(f"distillation methods table ({task})", "fewer than three of the registry's methods ran")
        return
    teachers = seed_teacher(records, key)
    frame["fidelity"] = [fidelity_to_teacher(root, r, teachers) for r in frame["record"]]
    frame["fidelity"] = frame["fidelity"].astype(float)
    kd = frame.loc[frame["method"] == "kd", metric].to_numpy()
    lines = [f"| method | {metric.replace('_', ' ')} (%) | fidelity (%) | test ECE (%) | vs KD | train s/seed |",
             "|---|---:|---:|---:|---|---:|"]
    names = method_names()
    for method in [m for m in names if m in set(frame["method"])]:
        rows = frame[frame["method"] == method]
        n = len(rows)
        cells = [fmt(rows[c].mean(), rows[c].std(ddof=1) if n > 1 else 0.0, n) if rows[c].notna().all() else "—"
                 for c in (metric, "fidelity", "test_ece")]
        call = "—" if method == "kd" or not len(kd) else noise_call(rows[metric], kd)
        seconds = np.mean([r["train_seconds"] for r in rows["record"]])
        lines.append(f"| {names[method]} | {' | '.join(cells)} | {call} | {seconds:.0f} |")
    shown = list(frame["record"])
    report.text("### Distillation methods\n\nEach registered method distils the same teacher into the same student "
                "(one run per seed; defaults of `--help`). \"vs KD\": the difference of means against KD is "
                "called beyond seed noise only when it exceeds two standard errors.\n\n"
                + "\n".join(lines) + "\n\n" + settings_line(shown))


def deployment_table(report, root, metric):
    """`export-s*.csv` aggregated over seeds: size, latency, and the test-metric drop
    of each TFLite variant against its Keras model."""
    paths = sorted(root.glob("export-s*.csv"))
    if not paths:
        report.skip(f"deployment table ({root.name})", "no export-s*.csv (run --only export)")
        return
    frame = pd.concat([pd.read_csv(p).assign(seed=int(p.stem.split("-s")[-1])) for p in paths])
    keras, tflite = f"keras_{metric}", f"tflite_{metric}"
    table = frame.groupby(["model", "variant"], sort=False).agg(
        params=("params", "first"), flops=("flops", "first"), size=("size_bytes", "mean"),
        latency=("latency_ms_median", "mean"), q1=("latency_ms_q1", "mean"), q3=("latency_ms_q3", "mean"),
        keras=(keras, "mean"), tflite=(tflite, "mean"),
        drop=("drop", "mean"), drop_std=("drop", "std"), seeds=("seed", "nunique")).reset_index()
    lines = [f"| model | variant | params | FLOPs | size (KiB) | latency (ms/image) [quartiles] | Keras {metric.replace('_', ' ')} (%) "
             "| TFLite (%) | drop (points) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table.itertuples():
        drop = f"{row.drop * 100:+.2f}" + (f" ± {row.drop_std * 100:.2f}" if row.seeds > 1 else "")
        lines.append(f"| {row.model} | {row.variant} | {row.params:,} | {row.flops:,} | {row.size / 1024:,.0f} "
                     f"| {row.latency:.3f} [{row.q1:.3f}–{row.q3:.3f}] | {row.keras * 100:.2f} | {row.tflite * 100:.2f} | {drop} |")
    runtime = ", ".join(sorted(frame["runtime"].unique()))
    report.text("### Deployment (TensorFlow Lite)\n\nEach model converted to TFLite and run on the whole test set "
                f"through {runtime}, one image per call on one CPU thread. Latency: per image, median and "
                "quartiles over rounds that time every file of a seed in turn, in a fresh order each round, after a "
                f"warm-up (mean over {frame['seed'].nunique()} seed(s)). Drop: Keras minus TFLite, in points.\n\n" + "\n".join(lines) + "\n")


def cost_table(report, root, records):
    """Wall time per experiment (summed over the invocations in `timings.jsonl`) and
    per run, with peak memory."""
    path = root / "timings.jsonl"
    if not path.exists():
        report.skip(f"cost ({root.name})", "no timings.jsonl")
        return
    totals = {}
    entries, problems = read_jsonl(path)
    for problem in problems:
        damaged(path, problem)
    for entry in entries:
        if not (isinstance(entry.get("experiment"), str) and isinstance(entry.get("seconds"), (int, float))
                and isinstance(entry.get("peak_rss_mib"), (int, float))):
            damaged(path, f"{path}: an entry lacks experiment, seconds or peak_rss_mib: {json.dumps(entry)[:80]}")
            continue
        seconds, peak = totals.get(entry["experiment"], (0.0, 0.0))
        totals[entry["experiment"]] = (seconds + entry["seconds"], max(peak, entry["peak_rss_mib"]))
    if not totals:
        report.skip(f"cost ({root.name})", f"no readable entry in {path}")
        return
    rows = ["| experiment | wall time (min) | peak memory (GiB) |", "|---|---:|---:|"]
    rows += [f"| {name} | {seconds / 60:.1f} | {peak / 1024:.1f} |" for name, (seconds, peak) in totals.items()]
    rows += [f"| **all** | {sum(t[0] for t in totals.values()) / 60:.1f} | "
             f"{max(t[1] for t in totals.values()) / 1024:.1f} |"]
    runs = ["| run | wall time (min) | of which test evaluation (min) |", "|---|---:|---:|"]
    for r in sorted(records, key=lambda r: r.get("started_at", "")):
        evaluation = sum(h.get("eval_seconds", 0.0) for h in r.get("history", []))
        runs.append(f"| {r['run']} | {r.get('wall_seconds', 0.0) / 60:.1f} | {evaluation / 60:.1f} |")
    env = records[0].get("environment", {}) if records else {}
    machine = env.get("platform", "this machine") + (f" with {', '.join(env['gpus'])}" if env.get("gpus") else
                                                      f" ({', '.join(sorted(set(env.get('devices', []))))})")
    report.text(f"Cost on {machine}: wall time per "
                "experiment (an experiment that reuses finished runs costs only what it adds), then per run "
                "(a run's wall time includes its final test evaluation).\n\n" + "\n".join(rows) + "\n\n"
                + "\n".join(runs) + "\n")


def flops_table(report, path):
    if not path.exists():
        report.skip(f"parameters and FLOPs ({path.parent.name})", f"no {path.name}")
        return
    rows = ["| model | parameters | FLOPs (batch 1) |", "|---|---:|---:|"]
    rows += [f"| {r['model']} | {int(r['params']):,} | {int(r['flops']):,} |" for r in read_csv(path)]
    report.text("Parameters and FLOPs (TensorFlow profiler; a multiply-add counts 2).\n\n" + "\n".join(rows) + "\n")
