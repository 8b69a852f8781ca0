"""Task 2 command line: `python task2_mhist/run.py --data-dir DIR --phase finetune`.

A thin layer over `task2_mhist.experiments`; see `--help`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdtoolkit.runner import cli  # noqa: E402

cli.import_tensorflow_quietly()

from task2_mhist.config import EXPERIMENTS, FEATURE_CACHE, PHASES, Task2Config  # noqa: E402


def build_parser():
    d = Task2Config()
    p = cli.parser("python task2_mhist/run.py", __doc__.splitlines()[0])
    p.add_argument("--data-dir", help="MHIST folder: annotations.csv and the PNGs (or an images/ subfolder)")
    p.add_argument("--annotations", help="annotations.csv elsewhere (e.g. ../shared/data/mhist/annotations.csv)")
    p.add_argument("--out", default=d.out, help="results folder")
    p.add_argument("--phase", choices=PHASES, default=d.phase, help="feature-extraction only, or then fine-tuning (finetune = all)")
    p.add_argument("--weights", default=d.weights, help="imagenet (Keras download), none, or PATH to a base weights file")
    p.add_argument("--image-size", type=int, default=d.image_size, help="square input size in pixels; smaller runs faster on CPU")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--fe-epochs", type=int, default=d.fe_epochs, help="feature-extraction epochs")
    p.add_argument("--ft-epochs", type=int, default=d.ft_epochs, help="fine-tuning epochs")
    p.add_argument("--teacher-lr", type=float, default=d.teacher_lr, help="teacher Adam rate (fine-tuning: / 10)")
    p.add_argument("--student-lr", type=float, default=d.student_lr, help="student and assistant Adam rate (fine-tuning: / 10)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no random flips and 90-degree rotations")
    p.add_argument("--feature-cache", choices=FEATURE_CACHE, default=d.feature_cache,
                   help="train feature extraction on the frozen base's features, computed once per base and view "
                        "(auto: when the views to compute, 8 with augmentation or 1, are at most --fe-epochs)")
    p.add_argument("--temperatures", type=cli.float_list, default=d.temperatures, help="T values of the tcurve experiment")
    cli.add_shared_arguments(p, d, EXPERIMENTS)
    return p


def parse_config(argv=None):
    """The validated `Task2Config` of command-line arguments `argv` (raises `ConfigError`)."""
    return cli.make_config(vars(build_parser().parse_args(argv)), Task2Config)


def main(argv=None):
    return cli.main(lambda: cli.run_task(parse_config(argv), "Task 2 (MHIST)", "task2_mhist.experiments"))


if __name__ == "__main__":
    sys.exit(main())
