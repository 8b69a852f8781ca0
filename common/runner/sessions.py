"""Running a task's selected experiments for every seed, timed and shareable.

Several processes may share one `--out` (`kdtoolkit.runner.locks`): each takes the next seed
no other holds, then finishes the others' (waiting on each run another process
is training, then loading it), so every run is trained once.
"""

import datetime
import json
import time

from kdtoolkit import device
from kdtoolkit.runner import locks, runs
from kdtoolkit.files import append_line
from kdtoolkit.runner.results import ResultsStore
from kdtoolkit.speed.workspaces import Workspaces


def run_all(task_cls, config, data=None, log=None):
    """Every selected experiment for every seed, then `summary.csv` (one row per run)
    and `summary_by_experiment.csv` (mean ± std over seeds). The data are read and
    checked first (nothing is written for bad data), then `--out`, before any
    model trains. A `--out` that cannot be written but holds finished runs is only
    read (`ResultsStore.prepare`): no locks, timings or summaries are written, and a
    run not finished there stops the command at its first write, in one line.
    Returns `{seed: {experiment: outcome}}`."""
    log = log or (lambda _msg: None)
    device.configure(config.deterministic, config.tf32, config.precision)
    data = data if data is not None else task_cls.load_data(config)
    read_only = not ResultsStore(config.out).prepare()
    if read_only:
        log(f"--out {config.out} cannot be written: its finished runs are read; a run not finished there stops "
            "the command")
    outcomes = {}
    workspaces = Workspaces()  # compiled steps shared by runs of one structure, across seeds

    def run_seed(seed, note=""):
        if len(config.seeds) > 1:
            log(f"== seed {seed} ({len(outcomes) + 1}/{len(config.seeds)}){note}")
        task = task_cls(config, data, seed=seed, log=log)
        task.workspaces = workspaces
        task.store.read_only = read_only
        outcomes[seed] = run_experiments(task)
        return task

    while not read_only and (claimed := claim_next_seed(config.out, [s for s in config.seeds
                                                                     if s not in outcomes])) is not None:
        seed, handle = claimed
        try:
            task = run_seed(seed)
        finally:
            locks.release(handle)
    for seed in config.seeds:
        if seed not in outcomes:
            task = run_seed(seed, "" if read_only else ": another process has it; its finished runs are reused")
    if not read_only:
        task.store.write_summary()
        task.store.write_seed_summary()
    return outcomes


def claim_next_seed(out, seeds):
    """`(seed, lock handle)` of the first of `seeds` that no other process holds, or None."""
    for seed in seeds:
        handle = locks.claim(out, f"seed-{seed}")
        if handle is not None:
            return seed, handle
    return None


def run_experiments(task, only=None):
    """Runs `task`'s selected experiments (`--only`, all by default) in its
    `experiments` order; returns `{experiment: outcome}`.

    Each experiment's wall time and the process's peak memory after it are logged
    and appended to `<out>/timings.jsonl`, also when it stops early (`"finished":
    false`, and `"stopped_by"`: `SIGINT`, `SIGTERM` or the error's type), so the
    time of every invocation, resumed ones included, is counted.
    """
    only = tuple(only or task.config.only)
    outcomes = {}
    for name in task.experiments:
        if name not in only:
            continue
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        start = time.perf_counter()
        finished, stopped_by = False, None
        try:
            outcomes[name] = task.experiment(name)
            finished = True
        except BaseException as err:
            stopped_by = stop_reason(err)
            raise
        finally:
            timing = {"experiment": name, "seed": task.seed, "started_at": started, "finished": finished,
                      **({"stopped_by": stopped_by} if stopped_by else {}),
                      "seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(runs.peak_rss_mib(), 1)}
            if not task.store.read_only:
                append_line(task.store.root / "timings.jsonl", json.dumps(timing))  # a torn last line ended first
        task.log(f"[{name}] experiment finished in {timing['seconds']:.0f}s "
                 f"(peak memory so far {timing['peak_rss_mib']:.0f} MiB)")
    return outcomes


def stop_reason(err):
    """What stopped an experiment, for `timings.jsonl`: the signal (`kdtoolkit.runner.cli.Terminated`
    names SIGTERM, Ctrl-C is SIGINT) or the error's type."""
    if isinstance(err, KeyboardInterrupt):
        return getattr(err, "signal_name", "SIGINT")
    return type(err).__name__
