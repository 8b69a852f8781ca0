import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kdtoolkit.metrics import binary_metrics


def hand_auc(labels, scores):
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_over_the_whole_set_matches_hand_count_and_sklearn():
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    logit_ssa = np.array([-2.0, 0.5, 1.0, 3.0, 0.1, -0.5, 0.5, 0.5])
    logits = np.stack([np.zeros_like(logit_ssa), logit_ssa], axis=1)  # P(SSA) = sigmoid(logit)
    result = binary_metrics(labels, logits)
    assert result["test_auc"] == pytest.approx(hand_auc(labels, logit_ssa))
    assert result["test_auc"] == pytest.approx(roc_auc_score(labels, logit_ssa))
    # Averaging per batch of 4 would give another number: the whole set is used.
    per_batch = np.mean([hand_auc(labels[i:i + 4], logit_ssa[i:i + 4]) for i in (0, 4)])
    assert result["test_auc"] != pytest.approx(per_batch)


def test_accuracy_f1_and_confusion_by_hand():
    labels = np.array([0, 0, 1, 1, 1])
    logits = np.array([[1, 0], [0, 1], [0, 1], [0, 1], [1, 0]], float)  # predictions 0 1 1 1 0
    result = binary_metrics(labels, logits)
    assert result["test_accuracy"] == pytest.approx(3 / 5)
    # SSA positive: TP 2, FP 1, FN 1 -> precision 2/3, recall 2/3, F1 2/3.
    assert result["test_f1"] == pytest.approx(2 / 3)
    assert result["confusion_matrix"] == [[1, 1], [1, 2]]
    assert result["roc_curve"]["fpr"][0] == 0.0 and result["roc_curve"]["tpr"][-1] == 1.0


def test_expected_calibration_error_hand_values():
    from kdtoolkit.metrics import expected_calibration_error, reliability

    # Two examples, 2 classes. Confidences: softmax([ln 3, 0]) = 0.75 (right), softmax([0, ln 9]) = 0.9 (wrong).
    logits = np.log(np.array([[3.0, 1.0], [1.0, 9.0]]))
    labels = np.array([0, 0])
    # 10 bins: 0.75 -> bin (0.7, 0.8], 0.9 -> bin (0.8, 0.9] (right edge included).
    table = reliability(logits, labels, bins=10)
    assert table["count"].tolist() == [0] * 7 + [1, 1, 0]
    np.testing.assert_allclose(table["confidence"][7:9], [0.75, 0.9])
    np.testing.assert_allclose(table["accuracy"][7:9], [1.0, 0.0])
    # ECE = 1/2 * |1 - 0.75| + 1/2 * |0 - 0.9| = 0.125 + 0.45
    assert expected_calibration_error(logits, labels, bins=10) == pytest.approx(0.575)
    # One bin: |mean accuracy - mean confidence| = |0.5 - 0.825|
    assert expected_calibration_error(logits, labels, bins=1) == pytest.approx(0.325)
    # Confident and right everywhere: ECE near 0.
    assert expected_calibration_error(np.array([[20.0, 0.0], [0.0, 20.0]]), np.array([0, 1])) < 1e-6


def test_top1_agreement():
    from kdtoolkit.metrics import top1_agreement

    a = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
    b = np.array([[9.0, 0.0, 0.0], [0.0, 3.0, 1.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert top1_agreement(a, b) == 0.75


def test_class_metrics_match_sklearn_on_every_class_including_one_never_predicted():
    from sklearn import metrics as sk

    from kdtoolkit.metrics import class_metrics

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4))
    logits[:, 3] -= 100.0  # class 3 is never predicted: precision 0, not NaN
    found = class_metrics(labels, logits, 4, prefix="test")
    predictions = logits.argmax(-1)
    precision, recall, f1, support = sk.precision_recall_fscore_support(labels, predictions, labels=[0, 1, 2, 3],
                                                                        zero_division=0)
    np.testing.assert_allclose(found["test_per_class"]["precision"], precision)
    np.testing.assert_allclose(found["test_per_class"]["recall"], recall)
    np.testing.assert_allclose(found["test_per_class"]["f1"], f1)
    assert found["test_per_class"]["support"] == support.tolist()
    assert found["confusion_matrix"] == sk.confusion_matrix(labels, predictions, labels=[0, 1, 2, 3]).tolist()
    assert found["test_macro_f1"] == pytest.approx(sk.f1_score(labels, predictions, average="macro", zero_division=0))
    assert found["test_per_class"]["precision"][3] == 0.0
