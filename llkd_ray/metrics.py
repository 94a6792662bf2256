"""Classification metrics as plain JSON-able data, shared by training, export, evaluation and the benchmark.

A foundation (no stage imports above it): the trainer's gold-set curve and ``llkd export``'s
accuracy check need the same numbers as ``llkd eval`` without importing the evaluation layer,
which itself runs the labeling stage.

The metrics dictionary (what ``eval.json``, the training summary and the benchmark store)::

    {"n": 872, "labels": [...], "accuracy": 0.83, "macro_f1": 0.83,
     "per_class": {"negative": {"precision": .., "recall": .., "f1": .., "support": 428}, ...},
     "confusion": {"labels": [...], "matrix": [[gold 0 predicted 0, gold 0 predicted 1], ...]}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def classification_metrics(
    truth: Sequence[str], predicted: Sequence[str], label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 (over every label of the set), per-class report and confusion matrix."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    names = list(label_names)
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} gold labels but {len(predicted)} predictions")
    truth, predicted = [str(t) for t in truth], [str(p) for p in predicted]
    if not truth:
        raise ValueError("no rows to evaluate")
    # Keyed by position, so that no label name can meet the report's own keys ("macro avg", ...).
    keys = [str(i) for i in range(len(names))]
    report = classification_report(truth, predicted, labels=names, target_names=keys, output_dict=True, zero_division=0)
    return {
        "n": len(truth),
        "labels": names,
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "per_class": {
            name: {
                "precision": float(row["precision"]),
                "recall": float(row["recall"]),
                "f1": float(row["f1-score"]),
                "support": int(row["support"]),
            }
            for name, row in zip(names, (report[key] for key in keys), strict=True)
        },
        "confusion": {
            "labels": names,
            "matrix": confusion_matrix(truth, predicted, labels=names).tolist(),
        },
    }


def format_metrics(metrics: dict[str, Any]) -> str:
    """A readable report: headline numbers, the per-class table, the confusion matrix."""
    names = metrics["labels"]
    width = max(8, *(len(n) for n in names))
    lines = [f"rows {metrics['n']}   accuracy {metrics['accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}", ""]
    lines.append(f"{'label':<{width}}  precision  recall     f1  support")
    for name in names:
        row = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:.4f}  {row['support']:7d}"
        )
    lines += ["", "confusion (rows: gold, columns: predicted)"]
    cell = max(6, width)
    lines.append(" " * width + "  " + "".join(f"{n[:cell]:>{cell + 1}}" for n in names))
    for name, row in zip(names, metrics["confusion"]["matrix"], strict=True):
        lines.append(f"{name:<{width}}  " + "".join(f"{v:>{cell + 1}d}" for v in row))
    return "\n".join(lines)
