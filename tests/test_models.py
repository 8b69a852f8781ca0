import numpy as np

from task1_mnist.models import build_student, build_teacher


def test_exact_parameter_counts():
    assert build_teacher().count_params() == 1_011_466
    assert build_student().count_params() == 1_238_730


def test_models_output_logits_per_class():
    x = np.zeros((3, 28, 28, 1), np.float32)
    assert tuple(build_teacher()(x).shape) == (3, 10)
    assert tuple(build_student()(x).shape) == (3, 10)
    assert tuple(build_teacher(num_outputs=40)(x).shape) == (3, 40)


def test_assistant_size():
    from kdtoolkit.flops import count_flops
    from task1_mnist.models import build_assistant

    assert build_assistant().count_params() == 108_618
    assert count_flops(build_assistant()) == 1_546_026
