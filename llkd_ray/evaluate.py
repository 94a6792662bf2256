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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from llkd_ray.config import PipelineConfig

#: On CPU, texts are sorted by length before batching so that little compute goes to padding.
_DEFAULT_BATCH = 64


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
    from llkd_ray.predictor import Predictor, load_predictor

    if isinstance(model, str | Path):
        predictor = load_predictor(model, max_length=max_length, batch_size=batch_size)
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
    backend: str = "auto",
) -> dict[str, Any]:
    """Metrics of the classifier in ``model_dir`` on the gold set ``data`` (any corpus reference),
    on the runtime its directory holds (``backend``: ``auto``, ``torch`` or ``onnx``)."""
    from llkd_ray.corpus import read_gold
    from llkd_ray.errors import LlkdError
    from llkd_ray.predictor import load_predictor
    from llkd_ray.runtime import init_ray

    predictor = load_predictor(model_dir, backend=backend, max_length=max_length, batch_size=_DEFAULT_BATCH)
    names = predictor.labels
    if not names or any(str(n).startswith("LABEL_") for n in names):
        raise LlkdError(f"model {model_dir} has no label names (id2label) to compare with the gold labels")
    init_ray()
    gold = read_gold(data, names, text_column=text_column, label_column=label_column)
    predicted = [names[i] for i in predictor.predict_indices(list(gold["text"]))]
    metrics = classification_metrics(list(gold["label"]), predicted, names)
    return {"model": str(model_dir), "backend": predictor.backend, "data": data, **metrics}


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


# --------------------------------------------------------------------------- teacher and student on a gold set


def teacher_gold_metrics(
    gold_config: PipelineConfig, gold_labels: Mapping[str, str], output: str | Path
) -> dict[str, Any]:
    """The teacher's metrics on a gold set, through the labeling stage itself.

    The teacher of ``gold_config`` (a config whose ``data.input`` is the gold set) labels
    it into ``output``; a labeling already finished there is reused. Its pseudo-labels are scored
    against ``gold_labels`` (row id to gold label); a gold row it left unlabelled is an error.
    """
    from llkd_ray.artifacts import MANIFEST, read_label_rows
    from llkd_ray.errors import DataError
    from llkd_ray.label import label_corpus

    if not (Path(output) / MANIFEST).is_file():
        label_corpus(gold_config, output=output)
    on_gold = dict(read_label_rows(output, ["id", "pseudo_label"]).itertuples(index=False))
    missing = [row_id for row_id in gold_labels if row_id not in on_gold]
    if missing:
        raise DataError(f"the teacher left {len(missing)} gold rows unlabelled (e.g. id {missing[0]})")
    ids = list(gold_labels)
    names = gold_config.task.label_names
    return classification_metrics([gold_labels[i] for i in ids], [on_gold[i] for i in ids], names)


def student_gold_metrics(
    model_dir: str | Path,
    texts: Sequence[str],
    truth: Sequence[str],
    label_names: Sequence[str],
    *,
    max_length: int | None = None,
) -> dict[str, Any]:
    """The metrics of the student in ``model_dir`` on gold ``texts`` and their ``truth`` labels."""
    predicted = predict_labels(model_dir, texts, max_length=max_length)
    return classification_metrics(truth, predicted, label_names)
