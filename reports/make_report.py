"""Turns saved results into the report's figures and one Markdown summary.

    python reports/make_report.py [--results results] [--out reports]

Reads `RESULTS/task1` (and `RESULTS/task2` when present): every run's
`metrics.json` and the experiment tables next to them. Writes PNG figures into
`OUT/<task>/` and `OUT/REPORT.md`. Nothing is retrained; a missing result is
skipped with a note in the summary, never a crash. A damaged file (a truncated or
garbage `metrics.json`, `test_outputs.npz`, `grid-s*.json`, a torn line of
`timings.jsonl`, ...) is skipped and named, in the report and on stdout; a
section that still cannot be built is skipped with its reason. A missing
`--results` folder, or one without finished runs, is an error (exit status 2).

The report reads results, never models: it imports neither TensorFlow nor Keras
(the methods' names, summaries and option defaults come from `reports.registry`,
which reads `common/methods/` without importing it). Its sections:
`reports/task1.py` and `reports/task2.py` (each task's), `reports/sections.py` and
`reports/figures.py` (shared by both), `reports/studies.py`, `reports/per_class.py`;
`reports/records.py` groups run records, `reports/read.py` reads files defensively,
`reports/document.py` assembles `REPORT.md`.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdtoolkit.runner.results import ResultsStore, is_set_aside  # noqa: E402
from reports.document import Report, guarded  # noqa: E402
from reports.read import DAMAGED  # noqa: E402
from reports.records import is_synthetic  # noqa: E402
from reports.task1 import task1  # noqa: E402
from reports.task2 import task2  # noqa: E402


def make_report(results_dir, out_dir):
    """Writes figures and `REPORT.md`; returns the Report (paths, notes)."""
    results_dir = Path(results_dir)
    DAMAGED.clear()
    report = Report(out_dir)
    if (results_dir / "task1").is_dir():
        guarded(report, "Task 1", task1, report, results_dir / "task1")
    else:
        report.skip("Task 1", f"no {results_dir / 'task1'}")
    if (results_dir / "task2").is_dir():
        guarded(report, "Task 2", task2, report, results_dir / "task2")
    else:
        report.skip("Task 2", f"no {results_dir / 'task2'}")
    synthetic = any(is_synthetic(ResultsStore(results_dir / t).records()) for t in ("task1", "task2"))
    report.path = report.write("Knowledge distillation: results" + (" (includes SYNTHETIC data)" if synthetic else ""))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results root holding task1/ and task2/")
    parser.add_argument("--out", default="reports", help="folder for figures and REPORT.md")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: --results {results}: no such folder; give the folder holding task1/ and task2/ "
              "(the parent of the tasks' --out)", file=sys.stderr)
        return 2
    if not any(not is_set_aside(path.parent) for path in results.glob("task[12]/*/metrics.json")):
        print(f"error: --results {results} holds no finished runs (no task1/<run>/metrics.json or "
              "task2/<run>/metrics.json); run the tasks with --out under it first, or point --results there",
              file=sys.stderr)
        return 2
    report = make_report(args.results, args.out)
    print(f"wrote {report.path} and {len(report.figures)} figures")
    for note in report.notes:
        print(note)
    for problem in report.damaged.values():
        print(f"skipped damaged file: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
