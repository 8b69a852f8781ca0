"""Helpers shared by the task command lines (argument types, errors, output)."""

import argparse
import errno
import os
import signal
import sys
import time
from pathlib import Path

from kdtoolkit.errors import UserError


def import_tensorflow_quietly():
    """Imports TensorFlow with its C++ start-up notices (oneDNN, CUDA probing) hidden.

    TensorFlow >= 2.20 prints them before its log level applies, so stderr is
    silenced at the file-descriptor level for the import and the first device
    query (where a machine without a GPU logs `failed call to cuInit`); Python
    errors raised by the import still show.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import tensorflow

                tensorflow.config.list_physical_devices()
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults as they are typed: `0,1,2` for lists; none for on/off flags."""

    def _get_help_string(self, action):
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.default is None:
            return action.help
        return super()._get_help_string(action)

    def _expand_help(self, action):
        if isinstance(action.default, (tuple, list)):
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in action.default)
            action = argparse.Action(action.option_strings, action.dest, default=shown, help=action.help)
        return super()._expand_help(action)


def parser(prog, description):
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_shared_arguments(parser, defaults, experiments):
    """Options both task CLIs take, with the task's defaults."""
    add = parser.add_argument
    add("--seeds", type=int_list, default=defaults.seeds, help="random seeds, comma list; every experiment runs once per seed")
    add("--temperature", type=float, default=defaults.temperature, help="KD temperature T")
    add("--alpha", type=float, default=defaults.alpha, help="weight of the hard-label loss; 1 - alpha weights distillation")
    add("--validation", type=float, default=defaults.validation,
        help="training examples held out (count, or fraction below 1; 0: none, the course's setting) "
             "to choose T and alpha; the test set only reports")
    add("--explain-images", type=int, default=defaults.explain_images, help="test images explained by lime/occlusion")
    add("--lime-samples", type=int, default=defaults.lime_samples, help="LIME perturbation samples per image")
    add("--occlusion-patch", type=int, default=defaults.occlusion_patch, help="occlusion patch size in pixels")
    add("--occlusion-stride", type=int, default=defaults.occlusion_stride, help="occlusion stride in pixels")
    add("--top-k", type=int, default=defaults.top_k, help="top-k cells compared between explanation maps")
    add("--distribute", default=defaults.distribute, help="tf.distribute strategy: none, mirrored (all local GPUs) "
        "or multi-worker (machines in TF_CONFIG); --batch-size is the global batch")
    add("--deterministic", action="store_true",
        help="op determinism: the same seed gives the same numbers on a GPU too (some kernels slower)")
    add("--no-tf32", dest="tf32", action="store_false",
        help="exact float32 matrix products and convolutions on GPUs with TensorFloat-32 (slower)")
    add("--precision", default=defaults.precision, choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"),
        help="Keras dtype policy of every model (mixed: 16-bit compute, float32 variables and losses; "
             "float16 adds loss scaling; auto: mixed_bfloat16 where the CPU or GPU computes bfloat16 natively, "
             "else float32)")
    add("--jit", default=defaults.jit, choices=("auto", "on", "off"),
        help="XLA-compile the training step (auto: on with a GPU)")
    add("--steps-per-call", type=int, default=defaults.steps_per_call,
        help="training steps per compiled call (fewer Python round trips; the same updates)")
    add("--no-share-steps", dest="share_steps", action="store_false",
        help="trace and compile every run's training step anew instead of sharing it between runs of one "
             "structure (the same updates; for checking)")
    add("--ensemble-seeds", type=int_list, default=defaults.ensemble_seeds,
        help="seeds of the teachers the ensemble studies average, comma list")
    add("--per-class", type=int_list, default=defaults.per_class,
        help="examples per class of the data-efficiency study's transfer sets, comma list")
    add("--only", type=name_list, default=defaults.only, help=f"experiments, comma list of {','.join(experiments)}")
    add_method_arguments(parser, defaults)
    add("--limit", type=int, help="use only the first N train and test images (quick runs)")
    add("-q", "--quiet", action="store_true", help="print only errors and the final summary")


def add_method_arguments(parser, defaults):
    """`--chain-method` and every registered method's options, `--<method>-<option>`."""
    from kdtoolkit import methods

    group = parser.add_argument_group(
        "distillation methods", "each registered method is an experiment (--only NAME): "
        + "; ".join(f"{name}: {cls.summary}" for name, cls in methods.REGISTRY.items()))
    group.add_argument("--chain-method", default=defaults.chain_method, choices=tuple(methods.REGISTRY),
                       help="method of the teacher-assistant chain (takd) and early-stopped teachers (eskd)")
    for method, field, flag, default, text in methods.option_flags():
        if isinstance(default, bool):  # a switch (`--kd-standardize`): given means on
            group.add_argument(flag, dest=f"{METHOD_OPTION}{method}.{field}", action="store_const", const=not default,
                               default=None, help=f"{text} (default {'on' if default else 'off'})")
            continue
        group.add_argument(flag, dest=f"{METHOD_OPTION}{method}.{field}", type=type(default), default=None,
                           metavar="N" if isinstance(default, int) else "X",
                           help=f"{text} (default {default:g})")


METHOD_OPTION = "method_option:"


def pop_method_options(settings):
    """Removes the `--<method>-<option>` values from parsed `settings` (a dict) and
    returns those given as `{method: {option: value}}`."""
    found = {}
    for key in [k for k in settings if k.startswith(METHOD_OPTION)]:
        value = settings.pop(key)
        if value is not None:
            method, field = key[len(METHOD_OPTION):].split(".")
            found.setdefault(method, {})[field] = value
    return found


def float_list(text):
    """`"1,2,4"` -> `(1.0, 2.0, 4.0)`; an argparse type."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None


def int_list(text):
    """`"0,1,2"` -> `(0, 1, 2)`; an argparse type."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def name_list(text):
    """`"teacher,kd"` -> `("teacher", "kd")`; an argparse type."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def logger(quiet):
    """A progress printer with elapsed time, silent when `quiet`."""
    start = time.perf_counter()

    def log(message):
        if not quiet:
            elapsed = time.perf_counter() - start
            print(f"{elapsed:7.1f}s {message}", flush=True)

    return log


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a scheduler sends before it kills a job), raised where Ctrl-C's
    `KeyboardInterrupt` would be, so the same cleanup runs: the epoch being written
    finishes, the interrupted experiment's `timings.jsonl` entry is written."""

    signal_name = "SIGTERM"


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def _on_sigterm(handler):
    """Installs `handler` for SIGTERM; returns the one it replaced (None where signals
    cannot be set: outside the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


TERMINATED = 128 + signal.SIGTERM  # 143: the shell's status of a job ended by SIGTERM


def main(body):
    """Runs `body()`; a `UserError`, or a write refused by the disk (full, read-only,
    no permission), becomes one `error: ...` line and exit status 2. Ctrl-C (SIGINT)
    and SIGTERM stop it as one line, after the finished runs and epochs are saved and
    timed (status 130 and 143)."""
    import logging

    import tensorflow as tf

    from kdtoolkit import distribute

    tf.get_logger().setLevel(logging.ERROR)  # retracing notices etc. are not for users
    previous = _on_sigterm(_terminate)
    try:
        return body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write that failed outside the results store's checks
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        where = f" {err.filename}" if err.filename else ""
        fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        print(f"error: cannot write{where}: {err.strerror}; {fix} or choose a writable --out, then run "
              "the same command: finished runs and epochs are kept and it resumes", file=sys.stderr)
        return 2
    except tf.errors.OpError as err:
        if not distribute.lost_worker(err):
            raise
        print(f"error: {distribute.lost_workers(err)} of the multi-worker cluster stopped ({type(err).__name__}); "
              "finished runs are kept: run the same command on every worker to resume (if a worker's copy of the "
              "results is behind the chief's, the workers say so and the cluster starts again in a new --out)",
              file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM): finished runs and epochs are saved and timed in timings.jsonl; run the same "
              "command to resume", file=sys.stderr)
        return TERMINATED
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def make_config(settings, config_class):
    """The parsed `settings` (a dict of a task's flags) as a validated `config_class`
    (raises `ConfigError`); `--<method>-<option>` flags become `method_options`."""
    settings = dict(settings)
    single_seed = settings.pop("single_seed", None)
    if single_seed is not None:
        settings["seeds"] = (single_seed,)
    settings["method_options"] = pop_method_options(settings)
    return config_class(**settings)


def run_task(config, title, experiments):
    """A task command's body: `config` printed, then `run_all` of module `experiments`
    (imported only now: heavy imports after the argument checks) and the table of
    finished runs. Returns the exit status."""
    import importlib

    log = logger(config.quiet)
    log(f"{title} config:\n" + config.describe())
    from kdtoolkit import distribute
    from kdtoolkit.runner.results import ResultsStore

    importlib.import_module(experiments).run_all(config, log=log)
    resolver = distribute.cluster_resolver(config.distribute)
    root = distribute.results_root(config.out, resolver)
    if root != Path(config.out):
        print(f"{resolver.task_type} {resolver.task_id} of the cluster: the chief writes the results to {config.out}; "
              f"this worker's copy (what it resumes from) is {root}")
    print(summary_table(ResultsStore(root)))
    return 0


def summary_table(store):
    """The store's finished runs as an aligned text table."""
    records = store.records()
    damaged = "".join(f"\nskipped {path}: {problem}" for path, problem in store.damaged.items())
    if not records:
        return f"no finished runs in {store.root}" + damaged
    metrics = [m for m in ("val_accuracy", "test_accuracy", "val_auc", "test_auc") if any(m in r for r in records)]
    header = ["run", *metrics, "params", "flops", "wall_s"]
    rows = [
        [
            r["run"],
            *(f"{r[m]:.4f}" if m in r else "" for m in metrics),
            f"{r.get('params', 0):,}",
            f"{r.get('flops', 0):,}",
            f"{r.get('wall_seconds', 0):.0f}",
        ]
        for r in records
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    return f"Finished runs in {store.root} (summary.csv):\n" + "\n".join(lines) + damaged
