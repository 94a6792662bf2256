"""Evaluating a student (or any labeler) on a gold set: predictions and scikit-learn metrics.

- :func:`predict_labels` — label names for texts from a model directory (or a loaded model);
- :func:`classification_metrics` — accuracy, macro-F1, a per-class report and the confusion
  matrix, as plain JSON-able data;
- :func:`evaluate_model` / ``llkd eval --model DIR --data REF [--json]`` — both on a gold set.

The metrics dictionary (what ``eval.json``, the training summary and the benchmark store)::

    {"n": 872, "labels": [...], "accuracy": 0.83, "macro_f1": 0.83,
     "per_class": {"negative": {"precision": .., "recall": .., "f1": .., "support": 428}, ...},
     "confusion": {"labels": [...], "matrix": [[gold 0 predicted 0, gold 0 predicted 1], ...]}}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: On CPU, texts are sorted by length before batching so that little compute goes to padding.
_DEFAULT_BATCH = 64


def classification_metrics(
    truth: Sequence[str], predicted: Sequence[str], label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 (over every label of the set), per-class report and confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    names = list(label_names)
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} gold labels but {len(predicted)} predictions")
    truth, predicted = [str(t) for t in truth], [str(p) for p in predicted]
    if not truth:
        raise ValueError("no rows to evaluate")
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=names, average=None, zero_division=0
    )
    return {
        "n": len(truth),
        "labels": names,
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=names, average="macro", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
        },
        "confusion": {
            "labels": names,
            "matrix": confusion_matrix(truth, predicted, labels=names).tolist(),
        },
    }


def predict_labels(
    model: str | Path | torch.nn.Module,
    texts: Sequence[str],
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    batch_size: int = _DEFAULT_BATCH,
) -> list[str]:
    """Label names for ``texts`` from a model directory, or from a loaded model and its tokenizer.

    Through :class:`~llkd_ray.predictor.Predictor`, so texts are cut at the length the student
    trained at (recorded in its directory) exactly as ``llkd serve`` cuts them; ``max_length``
    can only lower that limit.
    """
    from llkd_ray.predictor import Predictor

    if isinstance(model, str | Path):
        predictor = Predictor.load(model, max_length=max_length, batch_size=batch_size)
    elif tokenizer is None:
        raise ValueError("predict_labels with a loaded model needs its tokenizer")
    else:
        predictor = Predictor(model, tokenizer, max_length=max_length, batch_size=batch_size)
    return [predictor.labels[i] for i in predictor.predict_indices(list(texts))]


def evaluate_model(
    model_dir: str | Path,
    data: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int | None = None,
) -> dict[str, Any]:
    """Metrics of the classifier in ``model_dir`` on the gold set ``data`` (any corpus reference)."""
    from llkd_ray.corpus import read_gold
    from llkd_ray.errors import LlkdError
    from llkd_ray.predictor import Predictor
    from llkd_ray.runtime import init_ray

    predictor = Predictor.load(model_dir, max_length=max_length, batch_size=_DEFAULT_BATCH)
    names = predictor.labels
    if not names or any(str(n).startswith("LABEL_") for n in names):
        raise LlkdError(f"model {model_dir} has no label names (id2label) to compare with the gold labels")
    init_ray()
    gold = read_gold(data, names, text_column=text_column, label_column=label_column)
    predicted = [names[i] for i in predictor.predict_indices(list(gold["text"]))]
    return {"model": str(model_dir), "data": data, **classification_metrics(list(gold["label"]), predicted, names)}


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
