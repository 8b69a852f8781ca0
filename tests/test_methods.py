"""The registered distillation methods: each loss against values computed by hand
(plain `math`/numpy loops, written from the papers' formulas), plus the registry."""

import math

import numpy as np
import pytest
import tensorflow as tf

from kdtoolkit import methods
from kdtoolkit.methods import at, crd, dkd, fitnets, rkd

pytestmark = pytest.mark.usefixtures("exact_float32")

TEACHER = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [2.0, 0.0, -1.0]]
STUDENT = [[3.0, 2.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.5, -0.5]]
LABELS = [2, 0, 1]


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hand_dkd(temperature):
    tckd = nckd = full = coupled = 0.0
    for t, s, y in zip(TEACHER, STUDENT, LABELS):
        pt, ps = softmax([v / temperature for v in t]), softmax([v / temperature for v in s])
        bt, bs = [pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]
        rest_t = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
        rest_s = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
        tckd += kl(bt, bs) / len(LABELS)
        nckd += kl(rest_t, rest_s) / len(LABELS)
        full += kl(pt, ps) / len(LABELS)
        coupled += (kl(bt, bs) + (1 - pt[y]) * kl(rest_t, rest_s)) / len(LABELS)
    return tckd, nckd, full, coupled


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_parts_match_hand_values_and_decompose_kd(temperature):
    tckd, nckd = dkd.dkd_parts(tf.constant(LABELS), tf.constant(STUDENT), tf.constant(TEACHER), temperature)
    hand_tckd, hand_nckd, full, coupled = hand_dkd(temperature)
    assert float(tckd) == pytest.approx(hand_tckd, rel=1e-5)
    assert float(nckd) == pytest.approx(hand_nckd, rel=1e-5)
    assert coupled == pytest.approx(full, rel=1e-9)  # the paper's identity KD = TCKD + (1 - p_t) NCKD


def test_dkd_method_weights_its_terms():
    batch = {"x": tf.constant(STUDENT), "y": tf.constant(LABELS), "teacher_logits": tf.constant(TEACHER)}
    identity = tf.keras.layers.Lambda(lambda x: x)
    method = dkd.DKD(identity, dkd.DKDOptions(temperature=4.0, tckd_weight=2.0, nckd_weight=3.0), methods.Context(3))
    terms, _ = method.loss_terms(batch)
    hand_tckd, hand_nckd, _, _ = hand_dkd(4.0)
    ce = sum(-math.log(softmax(s)[y]) for s, y in zip(STUDENT, LABELS)) / 3
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(terms["tckd"]) == pytest.approx(2.0 * 16 * hand_tckd, rel=1e-5)
    assert float(terms["nckd"]) == pytest.approx(3.0 * 16 * hand_nckd, rel=1e-5)


def test_hint_loss_is_mean_squared_difference():
    teacher = [[1.0, 2.0], [0.0, -1.0]]
    student = [[0.0, 2.0], [3.0, 1.0]]
    assert float(fitnets.hint_loss(tf.constant(teacher), tf.constant(student))) == pytest.approx((1 + 0 + 9 + 4) / 4)


def test_attention_map_and_loss_match_hand_values():
    # one example, 2x2 positions, 2 channels
    features = np.array([[[[1.0, -3.0], [2.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]], np.float32)
    hand_map = [[(1 + 9) / 2, (4 + 0) / 2], [0.0, (1 + 1) / 2]]
    np.testing.assert_allclose(at.attention_map(tf.constant(features)).numpy()[0], hand_map)
    teacher_map = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    q_s = np.array([5.0, 2.0, 0.0, 1.0]) / math.sqrt(25 + 4 + 0 + 1)
    q_t = np.array([1.0, 0.0, 0.0, 1.0]) / math.sqrt(2)
    loss = at.attention_loss(tf.constant(teacher_map), tf.constant(features))
    assert float(loss) == pytest.approx(float(np.mean((q_s - q_t) ** 2)), rel=1e-5)


def test_adaptive_average_pool_takes_pytorch_windows():
    # 5 -> 2 along an axis: PyTorch's windows are [0, 3) and [2, 5) (they overlap at 2)
    np.testing.assert_allclose(at.adaptive_pool_matrix(5, 2), [[1 / 3, 1 / 3, 1 / 3, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3]],
                               rtol=1e-6)
    features = np.arange(2 * 5 * 4 * 3, dtype=np.float32).reshape(2, 5, 4, 3)
    pooled = at.adaptive_average_pool(tf.constant(features), (2, 2)).numpy()
    np.testing.assert_allclose(pooled[1, 1, 0], features[1, 2:5, 0:2].mean(axis=(0, 1)), rtol=1e-6)
    assert at.adaptive_average_pool(tf.constant(features), (5, 4)) is not None


def test_attention_refuses_a_teacher_map_larger_than_the_students():
    with pytest.raises(ValueError, match="larger than the student's"):
        at.check_sizes((14, 14), (7, 7))


def hand_rkd(teacher, student):
    def huber(x):
        return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5

    def distance_potentials(e):
        n = len(e)
        d = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mean for j in range(n)] for i in range(n)]

    def angle_potentials(e):
        n = len(e)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if j == i or k == i:
                        continue
                    a = np.subtract(e[j], e[i])
                    b = np.subtract(e[k], e[i])
                    out[i, j, k] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        return out

    n = len(teacher)
    dt, ds = distance_potentials(teacher), distance_potentials(student)
    distance = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    at_, as_ = angle_potentials(teacher), angle_potentials(student)
    angle = sum(huber(x) for x in (as_ - at_).ravel()) / n**3
    return distance, angle


def test_rkd_losses_match_hand_values():
    teacher = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0]]
    student = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.5], [5.0, -1.0, 0.0]]  # another width
    distance, angle = rkd.rkd_losses(tf.constant(teacher), tf.constant(student))
    hand_distance, hand_angle = hand_rkd(teacher, student)
    assert float(distance) == pytest.approx(hand_distance, rel=1e-5)
    assert float(angle) == pytest.approx(hand_angle, rel=1e-5)
    # a right angle at the origin between (3,0) and (0,4): cosine 0; 3-4-5 triangle distances
    np.testing.assert_allclose(rkd.angle_potentials(tf.constant(teacher)).numpy()[0, 1, 2], 0.0, atol=1e-6)
    np.testing.assert_allclose(rkd.pairwise_distances(tf.constant(teacher)).numpy()[1, 2], 5.0, rtol=1e-6)


def test_rkd_is_zero_for_a_scaled_copy_and_has_finite_gradients():
    teacher = tf.constant([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    student = tf.Variable(2.0 * teacher)
    with tf.GradientTape() as tape:
        distance, angle = rkd.rkd_losses(teacher, student)
        total = distance + angle
    assert float(total) == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.isfinite(tape.gradient(total, student).numpy()))


def test_nce_loss_matches_hand_value():
    positive = [2.0, 0.5]
    negatives = [[0.1, 0.3, 1.0], [0.2, 0.2, 0.05]]
    n = 30
    noise = 3 / n
    hand = 0.0
    for p, row in zip(positive, negatives):
        hand -= math.log(p / (p + noise)) + sum(math.log(noise / (h + noise)) for h in row)
    hand /= 2
    value = crd.nce_loss(tf.constant(positive), tf.constant(negatives), n)
    assert float(value) == pytest.approx(hand, rel=1e-5)


def test_crd_memory_moves_towards_the_batch_and_fixes_z_once():
    memory = crd.ContrastMemory(labels=np.arange(20) % 4, dim=4, temperature=0.5, negatives=6)
    memory.build_for(student_dim=5, teacher_dim=3)
    before = memory.student_memory.numpy().copy()
    student = tf.random.normal((3, 5), seed=1)
    teacher = tf.random.normal((3, 3), seed=2)
    index = tf.constant([2, 7, 11])
    loss = memory.loss(student, teacher, index)
    assert np.isfinite(float(loss)) and float(loss) > 0
    after = memory.student_memory.numpy()
    changed = np.flatnonzero(np.any(after != before, axis=1))
    np.testing.assert_array_equal(changed, [2, 7, 11])
    np.testing.assert_allclose(np.linalg.norm(after[[2, 7, 11]], axis=1), 1.0, rtol=1e-5)
    v = tf.math.l2_normalize(memory.student_head(student), axis=-1).numpy()
    expected = before[[2, 7, 11]] * 0.5 + 0.5 * v
    np.testing.assert_allclose(after[[2, 7, 11]], expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               rtol=1e-5)
    z = memory.z.numpy().copy()
    assert np.all(z > 0)
    memory.loss(student, teacher, index)
    np.testing.assert_array_equal(memory.z.numpy(), z)


def test_registry_lists_each_method_with_validated_options():
    assert set(methods.REGISTRY) >= {"kd", "dkd", "fitnets", "at", "rkd", "crd"}
    for name, cls in methods.REGISTRY.items():
        assert cls.name == name and cls.summary and cls.__module__ == f"kdtoolkit.methods.{name}"
    assert methods.make_options("dkd", {"nckd_weight": 2.0}).nckd_weight == 2.0
    with pytest.raises(ValueError, match="--dkd-nckd-weight must be a number >= 0"):
        methods.make_options("dkd", {"nckd_weight": -1.0})
    with pytest.raises(ValueError, match="no option"):
        methods.make_options("rkd", {"weight": 1.0})
    with pytest.raises(ValueError, match="--crd-negatives must be an integer >= 1, got 0"):
        methods.make_options("crd", {"negatives": 0})
    with pytest.raises(ValueError, match="--crd-tau must be a number > 0"):
        methods.make_options("crd", {"tau": 0.0})


@pytest.mark.slow
def test_the_readme_walk_through_adds_a_method(tmp_path, synthetic_mnist):
    """README's "Adding a method": its file alone, in a fresh copy of the project (put
    first on the path as `kdtoolkit`), gives a method that `--help` lists, `--only`
    trains and records, and the report's methods table shows (found by its recorded
    identity, at any option)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    start = readme.index("```python", readme.index("`common/methods/logitmse.py`")) + len("```python")
    code = readme[start:readme.index("```", start)]
    project = tmp_path / "project"
    for package in ("common", "task1_mnist", "reports"):
        shutil.copytree(root / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "common" / "methods" / "logitmse.py").write_text(code)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "kdtoolkit").symlink_to(project / "common")  # the copy, ahead of the editable install
    np.savez(tmp_path / "mnist.npz", **{k: v[..., 0] if k.startswith("x") else v for k, v in synthetic_mnist.items()})
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'lib'}:{project}"}
    command = [sys.executable, "task1_mnist/run.py"]
    shown = subprocess.run([*command, "--help"], cwd=project, env=env, capture_output=True, text=True)
    assert "--logitmse-weight" in shown.stdout and "logit matching" in shown.stdout
    done = subprocess.run([*command, "--data-dir", str(tmp_path / "mnist.npz"), "--out", str(tmp_path / "out"),
                           "--only", "teacher,kd,scratch,logitmse", "--logitmse-weight", "2", "--temperature", "3",
                           "--epochs", "1", "--batch-size", "64",
                           "--validation", "64", "-q"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "logitmse-w2-s0" / "metrics.json").read_text())
    assert record["identity"]["weight"] == 2.0 and {"ce", "mse"} <= set(record["history"][0])
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "task1").symlink_to(tmp_path / "out")
    made = subprocess.run([sys.executable, "reports/make_report.py", "--results", str(tmp_path / "results"),
                           "--out", str(tmp_path / "report")], cwd=project, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    text = (tmp_path / "report" / "REPORT.md").read_text()
    table = text[text.index("### Distillation methods"):]
    assert "| logit matching (Ba & Caruana 2014) |" in table and "| KD (Hinton et al. 2015) |" in table
    assert "| KD student (T=3, alpha=0.5) |" in text  # the headline row at the T that ran


def test_a_method_named_like_an_experiment_is_refused():
    from kdtoolkit.runner.recipes import Recipes

    methods.REGISTRY["export"] = methods.REGISTRY["dkd"]
    try:
        with pytest.raises(ValueError, match="'export' has the name of a Clash experiment"):
            type("Clash", (Recipes,), {})
    finally:
        del methods.REGISTRY["export"]


def test_a_method_registered_from_elsewhere_is_found_in_name_order():
    """`@register` outside `common/methods/` (a user's own module): the one registry
    finds it by name and keeps name order."""
    @methods.register
    class Mine(methods.Distillation):
        name = "aaa_mine"

    try:
        assert methods.get("aaa_mine") is Mine and methods.REGISTRY is methods.base.REGISTRY
        assert list(methods.REGISTRY) == sorted(methods.REGISTRY) and next(iter(methods.REGISTRY)) == "aaa_mine"
        with pytest.raises(ValueError, match="two methods are named 'kd'"):
            methods.register(type("OtherKD", (methods.Distillation,), {"name": "kd"}))
    finally:
        del methods.REGISTRY["aaa_mine"]
