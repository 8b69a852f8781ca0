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
