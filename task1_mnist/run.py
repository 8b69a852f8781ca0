"""Task 1 command line: `python task1_mnist/run.py [options]` runs every experiment.

A thin layer over `task1_mnist.experiments.Task1`; see `--help`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kdtoolkit.runner import cli  # noqa: E402

cli.import_tensorflow_quietly()
from task1_mnist.config import EXPERIMENTS, FUSE_GRID, Task1Config  # noqa: E402


def build_parser():
    defaults = Task1Config()
    parser = cli.parser("python task1_mnist/run.py", __doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder (or file) with mnist.npz in keras layout; default $MNIST_DIR, else Keras' download")
    parser.add_argument("--out", default=defaults.out, help="results folder")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per model")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="Adam learning rate")
    cli.add_shared_arguments(parser, defaults, EXPERIMENTS)
    parser.add_argument("--seed", type=int, dest="single_seed", help="shorthand for --seeds N")
    parser.add_argument("--temperatures", type=cli.float_list, default=defaults.temperatures, help="grid temperatures, comma list")
    parser.add_argument("--alphas", type=cli.float_list, default=defaults.alphas, help="grid alphas, comma list")
    parser.add_argument("--fuse-grid", default=defaults.fuse_grid, choices=FUSE_GRID,
                        help="train the grid's students together in one compiled step, each as alone "
                             "(auto: on, except under --precision mixed_float16); stacked: with their weights "
                             "stacked, on a GPU one batched matmul per layer for all (same updates within float "
                             "tolerance)")
    parser.add_argument("--subclasses", type=int, default=defaults.subclasses, help="subclasses per class for subclass KD")
    parser.add_argument("--aux-weight", type=float, default=defaults.aux_weight, help="weight beta of the subclass auxiliary loss")
    parser.add_argument("--aux-temperature", type=float, default=defaults.aux_temperature, help="temperature tau of the subclass auxiliary loss")
    parser.add_argument("--missing-class", type=int, default=defaults.missing_class,
                        help="the digit the missing-class study (--only teacher,missing) leaves out of the transfer set")
    parser.add_argument("--missing-teachers", type=cli.name_list, default=defaults.missing_teachers,
                        help="teacher sizes (small, course, large) the missing-class study distils from, comma list")
    parser.add_argument("--attribution-images", type=int, default=defaults.attribution_images,
                        help="test images the attributions study explains by integrated gradients")
    parser.add_argument("--label-noise", type=cli.float_list, default=defaults.label_noise,
                        help="shares of wrong training labels of the label-noise study, comma list")
    parser.add_argument("--image-noise", type=cli.float_list, default=defaults.image_noise,
                        help="pixel-noise standard deviations (1 = the full pixel range) of the corruption study, "
                             "comma list")
    parser.add_argument("--teacher-epochs", type=cli.int_list, default=defaults.teacher_epochs, help="early-stopped teacher epochs for eskd, comma list (the final teacher is always compared)")
    return parser


def parse_config(argv=None):
    """The validated `Task1Config` of command-line arguments `argv` (raises `ConfigError`)."""
    return cli.make_config(vars(build_parser().parse_args(argv)), Task1Config)


def main(argv=None):
    return cli.main(lambda: cli.run_task(parse_config(argv), "Task 1 (MNIST)", "task1_mnist.experiments"))


if __name__ == "__main__":
    sys.exit(main())
