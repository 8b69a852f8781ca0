"""Benchmark: the two forms of a fused grid (`kdtoolkit.speed.fused`), first step and steady steps.

Builds `--cells` Task 1 MLP students (KD at the default grid's T and alpha, one
seed), fuses them looped (`Fused`, `--fuse-grid on`) and stacked (`Stacked`,
`--fuse-grid stacked`) with each kind of matrix product (`stacked_per_member`,
the CPU default; `stacked_batched`, the GPU default), and times each form's first
training step (trace and, with XLA, compilation) and its steady steps on random
MNIST-shaped batches of 256 with random teacher logits, beside one student trained
alone (the first cell) for reference, and counts the operations in each step's
graph. All run in this one process, one after the other. Writes
`bench/results/fused_forms.json` with the device.

    python bench/bench_fused_forms.py [--cells 18 --steps 30 --jit auto|on|off]
"""

import argparse
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdtoolkit.runner import cli  # noqa: E402

cli.import_tensorflow_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kdtoolkit import data as common_data  # noqa: E402
from kdtoolkit import device, methods, training
from kdtoolkit.runner import runs  # noqa: E402
from kdtoolkit.speed.fused import Fused, Stacked  # noqa: E402
from kdtoolkit.files import write_json_atomic  # noqa: E402
from task1_mnist.models import build_student  # noqa: E402

TEMPERATURES, ALPHAS = (1.0, 2.0, 4.0, 16.0, 32.0, 64.0), (0.2, 0.5, 0.8)
OPTIMIZERS = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=18, help="fused students (default 18, the course's grid)")
    parser.add_argument("--steps", type=int, default=30, help="steps timed after the first (default 30)")
    parser.add_argument("--jit", default="auto", choices=device.JIT, help="XLA as the task commands resolve it")
    parser.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                        help="adam (the tasks'; default) or sgd, to time the steps without Adam's update")
    parser.add_argument("--out", default=str(ROOT / "bench/results/fused_forms.json"))
    return parser.parse_args(argv)


def time_form(name, form, cells, batches, jit, optimizer="adam"):
    """`{"first_step_s", "step_ms", "graph_ops"}` of `cells` ((T, alpha) pairs) fused
    by `form` (members -> method), or of the first cell's student alone when `form`
    is None."""
    students = []
    for index in range(len(cells)):
        runs.set_seed(0)
        with keras.name_scope(f"{name}{index}"):
            students.append(build_student())
    members = [methods.Distillation(s, temperature=t, alpha=a) for s, (t, a) in zip(students, cells)]
    method = form(members) if form is not None else members[0]
    step, means = training.make_train_step(method, OPTIMIZERS[optimizer](1e-3),
                                           element_spec=batches.element_spec, jit=jit)
    iterator = iter(batches)
    start = time.perf_counter()
    step(next(iterator))
    float(means.result()["loss"])
    first = time.perf_counter() - start
    start, count = time.perf_counter(), 0
    for batch in iterator:
        step(batch)
        count += 1
    float(means.result()["loss"])  # waits for the device
    return {"first_step_s": first, "step_ms": (time.perf_counter() - start) / count * 1000,
            "graph_ops": graph_ops(step)}


def graph_ops(step):
    """Operations in a traced step's graph, its nested functions' included: what is
    traced, optimised and (with XLA) compiled."""
    graph = getattr(step, "xla", step).get_concrete_function().graph.as_graph_def()
    return len(graph.node) + sum(len(function.node_def) for function in graph.library.function)


def main(argv=None):
    args = parse_args(argv)
    if not 2 <= args.cells <= len(TEMPERATURES) * len(ALPHAS) or args.steps < 1:
        raise SystemExit(f"--cells must be 2 to {len(TEMPERATURES) * len(ALPHAS)} and --steps >= 1")
    device.configure()
    jit = device.use_jit(args.jit)
    cells = [(t, a) for t in TEMPERATURES for a in ALPHAS][: args.cells]
    rng = np.random.default_rng(0)
    n = 256 * (args.steps + 1)
    batches = common_data.batched({"x": rng.random((n, 28, 28, 1), dtype=np.float32),
                                   "y": rng.integers(0, 10, n).astype(np.int32),
                                   "teacher_logits": rng.normal(size=(n, 10)).astype(np.float32)}, 256)
    forms = {}
    for name, form, members in (("alone", None, cells[:1]), ("looped", Fused, cells),
                                ("stacked_per_member", partial(Stacked, batched=False), cells),
                                ("stacked_batched", partial(Stacked, batched=True), cells)):
        forms[name] = time_form(name, form, members, batches, jit, args.optimizer)
        print(f"{name}: first step {forms[name]['first_step_s']:.2f} s, "
              f"then {forms[name]['step_ms']:.1f} ms per step; {forms[name]['graph_ops']} graph ops", flush=True)
    result = {"benchmark": "fused grid forms: first step and steady steps",
              "command": "python bench/bench_fused_forms.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {"cells": args.cells, "steps": args.steps, "jit": jit, "batch_size": 256,
                           "optimizer": args.optimizer},
              "environment": runs.environment(), "forms": forms}
    write_json_atomic(args.out, result)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
