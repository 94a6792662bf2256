"""Evaluating a student (or any labeler) on a gold set: predictions and scikit-learn metrics.

- :func:`predict_labels` — label names for texts from a model directory (or a loaded model);
- metrics come from :mod:`llkd_ray.metrics` (:func:`~llkd_ray.metrics.classification_metrics`);
- :func:`evaluate_model` / ``llkd eval --model DIR --data REF [--json]`` — both on a gold set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from llkd_ray.config import PipelineConfig
from llkd_ray.metrics import classification_metrics

#: On CPU, texts are sorted by length before batching so that little compute goes to padding.
_DEFAULT_BATCH = 64


def predict_labels(
    model: str | Path | torch.nn.Module,
    texts: Sequence[str],
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    batch_size: int = _DEFAULT_BATCH,
) -> list[str]:
    """Label names for ``texts`` from a model directory, or from a loaded model and its tokenizer.

    Through :class:`~llkd_ray.student.predictor.Predictor`, so texts are cut at the length the student
    trained at (recorded in its directory) exactly as ``llkd serve`` cuts them; ``max_length``
    can only lower that limit.
    """
    from llkd_ray.serve.backends import load_predictor
    from llkd_ray.student.predictor import Predictor

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
    from llkd_ray.runtime import init_ray
    from llkd_ray.serve.backends import load_predictor

    predictor = load_predictor(model_dir, backend=backend, max_length=max_length, batch_size=_DEFAULT_BATCH)
    names = predictor.labels
    if not names or any(str(n).startswith("LABEL_") for n in names):
        raise LlkdError(f"model {model_dir} has no label names (id2label) to compare with the gold labels")
    init_ray()
    gold = read_gold(data, names, text_column=text_column, label_column=label_column)
    predicted = [names[i] for i in predictor.predict_indices(list(gold["text"]))]
    metrics = classification_metrics(list(gold["label"]), predicted, names)
    return {"model": str(model_dir), "backend": predictor.backend, "data": data, **metrics}


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
    from llkd_ray.label.run import label_corpus

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
