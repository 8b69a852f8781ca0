"""Benchmark: Task 2 runs sharing compiled training steps (`kdtoolkit.speed.workspaces`) or not.

Runs the Task 2 command twice on an MHIST-layout folder, each in its own process
and results folder: with the default shared steps, then with `--no-share-steps`
(every run traces, and with XLA compiles, its own step). Records each invocation's
wall seconds and every run's first-epoch seconds (trace, compilation and one
epoch) and later-epoch seconds, and checks that both give the same test AUCs.
Writes `bench/results/shared_steps.json` with the device's name.

    python -m task2_mhist.synthetic --out /tmp/mhist --annotations ../shared/data/mhist/annotations.csv
    python bench/bench_shared_steps.py --data-dir /tmp/mhist --image-size 64 --limit 256
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run_times import run_times  # noqa: E402
from kdtoolkit.files import write_json_atomic  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="MHIST-layout folder")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=256, help="first N train and test images")
    parser.add_argument("--fe-epochs", type=int, default=1)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--only", default="teacher,kd,tcurve,scratch,pretrained")
    parser.add_argument("--temperatures", default="1,4,16")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jit", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/shared_steps.json"))
    return parser.parse_args(argv)


def invoke(args, out, share):
    """Runs the Task 2 command; returns its wall seconds and its runs' times and AUCs."""
    command = [sys.executable, str(ROOT / "task2_mhist/run.py"), "--data-dir", args.data_dir, "--out", out,
               "--weights", "none", "--image-size", str(args.image_size), "--limit", str(args.limit),
               "--fe-epochs", str(args.fe_epochs), "--ft-epochs", str(args.ft_epochs), "--only", args.only,
               "--temperatures", args.temperatures, "--seeds", args.seeds, "--jit", args.jit, "-q"]
    if not share:
        command.append("--no-share-steps")
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    runs = {}
    for times in run_times(out):
        record = json.loads((Path(out) / times.run / "metrics.json").read_text())
        runs[times.run] = {"wall_s": times.wall_s, "first_epoch_s": times.first_epoch_s,
                           "later_epoch_s": times.later_epoch_s, "later_cores_busy": times.later_cores_busy,
                           "test_auc": record.get("test_auc")}
    environment = record["environment"] if runs else {}
    return {"command": " ".join(command[1:]), "wall_s": wall, "runs": runs}, environment


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        shared, environment = invoke(args, f"{scratch}/shared", share=True)
        alone, _ = invoke(args, f"{scratch}/alone", share=False)
    same = {run: shared["runs"][run]["test_auc"] == alone["runs"][run]["test_auc"] for run in shared["runs"]}
    result = {
        "benchmark": "Task 2 runs with shared compiled steps vs each run tracing and compiling its own",
        "command": "python bench/bench_shared_steps.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment,
        "shared": shared,
        "not_shared": alone,
        "speedup": alone["wall_s"] / shared["wall_s"],
        "first_epochs_s": {"shared": sum(r["first_epoch_s"] for r in shared["runs"].values()),
                           "not_shared": sum(r["first_epoch_s"] for r in alone["runs"].values())},
        "same_test_auc": same,
    }
    write_json_atomic(args.out, result)
    print(f"wall: shared {shared['wall_s']:.1f} s, not shared {alone['wall_s']:.1f} s "
          f"({result['speedup']:.2f}x); first epochs {result['first_epochs_s']['shared']:.1f} s vs "
          f"{result['first_epochs_s']['not_shared']:.1f} s; same test AUC in {sum(same.values())}/{len(same)} runs")
    for run in shared["runs"]:
        a, b = shared["runs"][run], alone["runs"][run]
        print(f"  {run:<26} first epoch {a['first_epoch_s']:6.2f} s vs {b['first_epoch_s']:6.2f} s")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
