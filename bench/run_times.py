"""Per-run times of a results folder: wall seconds, first epoch (trace, compile, one
epoch) and the mean of the later epochs, from each run's `metrics.json`.

    python bench/run_times.py results/task1
"""

import json
import sys
from pathlib import Path


def run_times(folder):
    """`[(run, wall_s, first_epoch_s, later_epoch_s or None)]`, by run name."""
    rows = []
    for path in sorted(Path(folder).glob("*/metrics.json")):
        record = json.loads(path.read_text())
        seconds = [epoch["seconds"] for epoch in record.get("history", [])]
        later = sum(seconds[1:]) / (len(seconds) - 1) if len(seconds) > 1 else None
        rows.append((record["run"], record["wall_seconds"], seconds[0] if seconds else None, later))
    return rows


def main(folder):
    for run, wall, first, later in run_times(folder):
        text = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"  {run:<28} wall {wall:7.2f} s  first epoch {text(first)} s  later epochs {text(later)} s")


if __name__ == "__main__":
    main(sys.argv[1])
