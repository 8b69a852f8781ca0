"""The report's per-class table of Task 1 (Thapa 2022, Tables 6.1-6.2): each digit's
recall (its test accuracy) and F1 for the teacher, the KD student and the
scratch student, and the epochs each took to reach a test accuracy."""

from kdtoolkit.runner.results import mean_std

LEVELS = (0.97, 0.98, 0.99)  # test accuracies whose first epoch is reported


def epochs_to_reach(history, level, metric="test_accuracy"):
    """The first epoch (1-based) of a run's `history` whose `metric` is >= `level`, or None."""
    return next((i for i, record in enumerate(history, 1) if record.get(metric, -1.0) >= level), None)


def per_class_table(report, records, key, models=(("teacher", "teacher"), ("kd", "KD student"),
                                                  ("scratch", "scratch student"))):
    """Writes the tables for the records whose `key(record)` is one of `models`'
    keys and that hold `test_per_class`; skipped (with a note) when none do."""
    groups = {name: [r for r in records if key(r) == name and "test_per_class" in r] for name, _ in models}
    shown = [(name, label) for name, label in models if groups[name]]
    if not shown:
        report.skip("per-class metrics (Task 1)", "no teacher/KD/scratch runs with test_per_class")
        return

    def cell(values, scale=100.0):
        mean, std = mean_std(values)
        return f"{mean * scale:.2f} ± {std * scale:.2f}" if len(values) > 1 else f"{mean * scale:.2f}"

    classes = len(groups[shown[0][0]][0]["test_per_class"]["recall"])
    lines = ["| digit | " + " | ".join(f"{label} recall / F1 (%)" for _, label in shown) + " |",
             "|---:|" + "---:|" * len(shown)]
    for c in range(classes):
        lines.append(f"| {c} | " + " | ".join(
            f"{cell([r['test_per_class']['recall'][c] for r in groups[name]])} / "
            f"{cell([r['test_per_class']['f1'][c] for r in groups[name]])}" for name, _ in shown) + " |")
    speed = ["| model | " + " | ".join(f"epochs to {level:.0%}" for level in LEVELS) + " |",
             "|---|" + "---:|" * len(LEVELS)]
    for name, label in shown:
        reached = [[epochs_to_reach(r["history"], level) for r in groups[name]] for level in LEVELS]
        speed.append(f"| {label} | " + " | ".join(
            " ".join("—" if e is None else str(e) for e in epochs) for epochs in reached) + " |")
    report.text("Per digit, on the test set (mean ± std over seeds), and the first epoch at which each run's "
                "test accuracy reached a level (one number per seed; — where it never did).\n\n"
                + "\n".join(lines) + "\n\n" + "\n".join(speed) + "\n")
