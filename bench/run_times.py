"""Per-run times of a results folder: wall seconds, first epoch (trace, compile, one
epoch), the mean of the later epochs and how many cores they kept busy (process CPU
seconds over wall seconds; on a GPU machine a high figure means a host-bound step),
from each run's `metrics.json`.

    python bench/run_times.py results/task1
"""

import json
import sys
from pathlib import Path
from typing import NamedTuple, Optional


class RunTime(NamedTuple):
    """One run's times in seconds; the last three are None where there is no such epoch
    (or, for cores, no `cpu_seconds`: records written before it was kept)."""

    run: str
    wall_s: float
    first_epoch_s: Optional[float]
    later_epoch_s: Optional[float]
    later_cores_busy: Optional[float]


def later_epochs(history):
    """`(mean seconds, cores busy)` of a `training.fit` history's epochs after the first
    (which traces and compiles the step); each None where it cannot be told."""
    later = history[1:]
    seconds = sum(epoch["seconds"] for epoch in later)
    cores = (sum(epoch["cpu_seconds"] for epoch in later) / seconds
             if later and seconds > 0 and all("cpu_seconds" in epoch for epoch in later) else None)
    return (seconds / len(later) if later else None), cores


def run_times(folder):
    """`[RunTime]` of every run under `folder`, by run name."""
    rows = []
    for path in sorted(Path(folder).glob("*/metrics.json")):
        record = json.loads(path.read_text())
        history = record.get("history", [])
        rows.append(RunTime(record["run"], record["wall_seconds"], history[0]["seconds"] if history else None,
                            *later_epochs(history)))
    return rows


def main(folder):
    for run, wall, first, later, cores in run_times(folder):
        text = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"  {run:<28} wall {wall:7.2f} s  first epoch {text(first)} s  later epochs {text(later)} s"
              f"  cores busy {text(cores)}")


if __name__ == "__main__":
    main(sys.argv[1])
