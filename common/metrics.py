"""Test metrics computed over a whole test set (never averaged per batch)."""

import numpy as np
from sklearn import metrics as sk_metrics


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    exps = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exps / exps.sum(axis=-1, keepdims=True)


def binary_metrics(labels, logits, positive=1, curve=True, prefix="test"):
    """AUC, F1, accuracy and confusion matrix of a 2-class problem from class logits.

    The score is the softmax probability of class `positive`; the prediction is the
    arg-max class. Keys are `<prefix>_auc`, `<prefix>_accuracy`, `<prefix>_f1` and
    `confusion_matrix`; with `curve`, `roc_curve` (`fpr`, `tpr`, `thresholds`) too.
    """
    labels = np.asarray(labels).reshape(-1)
    probabilities = softmax(logits)
    scores = probabilities[:, positive]
    predictions = np.argmax(probabilities, axis=-1)
    result = {
        f"{prefix}_auc": float(sk_metrics.roc_auc_score(labels == positive, scores))
        if len(np.unique(labels)) == 2 else float("nan"),
        f"{prefix}_accuracy": float(np.mean(predictions == labels)),
        f"{prefix}_f1": float(sk_metrics.f1_score(labels == positive, predictions == positive, zero_division=0)),
        "confusion_matrix": sk_metrics.confusion_matrix(labels, predictions, labels=[0, 1]).tolist(),
    }
    if curve and len(np.unique(labels)) == 2:
        fpr, tpr, thresholds = sk_metrics.roc_curve(labels == positive, scores)
        result["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                               "thresholds": np.nan_to_num(thresholds, posinf=1.0).tolist()}
    return result


def class_metrics(labels, logits, num_classes, prefix="test"):
    """Per-class metrics of a `num_classes`-way problem from class logits, over the
    whole split: `confusion_matrix` (rows: true class, columns: predicted),
    `<prefix>_per_class` (`precision`, `recall` (the class's accuracy), `f1`,
    `support`: one value per class; a class never predicted has precision 0) and
    `<prefix>_macro_f1` (the unweighted mean of the classes' F1)."""
    labels = np.asarray(labels).reshape(-1)
    predictions = np.argmax(np.asarray(logits), axis=-1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    hits = np.diag(confusion).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(hits / confusion.sum(axis=0))
        recall = np.nan_to_num(hits / confusion.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"confusion_matrix": confusion.tolist(),
            f"{prefix}_per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                                    "support": confusion.sum(axis=1).tolist()},
            f"{prefix}_macro_f1": float(f1.mean())}


def _confidence_and_hits(logits, labels):
    probabilities = softmax(logits)
    return probabilities.max(axis=-1), probabilities.argmax(axis=-1) == np.asarray(labels).reshape(-1)


def reliability(logits, labels, bins=15):
    """Reliability diagram data: the top-1 softmax probability (confidence) cut into
    `bins` equal-width bins of (0, 1], right edge included. Returns
    `{"edges": (bins + 1,), "count", "confidence", "accuracy": (bins,)}`: per bin the
    examples, their mean confidence and their accuracy (NaN for an empty bin)."""
    confidence, hits = _confidence_and_hits(logits, labels)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=hits, minlength=bins) / count
    return {"edges": np.linspace(0, 1, bins + 1), "count": count, "confidence": mean_confidence,
            "accuracy": accuracy}


def expected_calibration_error(logits, labels, bins=15):
    """ECE (Guo et al. 2017): `sum_b |B_b| / n * |accuracy(B_b) - confidence(B_b)|`
    over the `reliability` bins; 0 for a perfectly calibrated model, in [0, 1]."""
    table = reliability(logits, labels, bins)
    used = table["count"] > 0
    gaps = np.abs(table["accuracy"][used] - table["confidence"][used])
    return float(np.sum(table["count"][used] / table["count"].sum() * gaps))


def top1_agreement(logits_a, logits_b):
    """Fidelity: the fraction of rows where two models predict the same class."""
    return float(np.mean(np.argmax(logits_a, axis=-1) == np.argmax(logits_b, axis=-1)))
