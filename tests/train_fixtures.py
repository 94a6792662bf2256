"""Helpers for the training tests: a labels directory in the labeling stage's format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def write_labels_dir(
    directory: Path,
    texts: list[str],
    label_names: list[str],
    *,
    seed: int = 0,
    parts: int = 2,
    gold: list[str] | None = None,
    teacher_accuracy: float = 0.8,
) -> Path:
    """``part-*.parquet`` + ``_manifest.json`` as ``llkd label`` writes them.

    The teacher distribution is random but informative when ``gold`` is given: its argmax agrees
    with the gold label on about ``teacher_accuracy`` of the rows.
    """
    rng = np.random.default_rng(seed)
    k = len(label_names)
    probs = rng.dirichlet(np.ones(k), size=len(texts))
    if gold is not None:
        index = {name: i for i, name in enumerate(label_names)}
        for row, label in enumerate(gold):
            target = index[label] if rng.random() < teacher_accuracy else int(rng.integers(k))
            probs[row, target] += 1.0 + rng.random()
        probs /= probs.sum(axis=1, keepdims=True)
    label_index = probs.argmax(axis=1)
    ids = [hashlib.sha1(f"{seed}:{i}:{t}".encode()).hexdigest()[:16] for i, t in enumerate(texts)]
    table = pa.table(
        {
            "id": ids,
            "text": texts,
            "pseudo_label": [label_names[i] for i in label_index],
            "label_index": pa.array(label_index, type=pa.int64()),
            "confidence": probs.max(axis=1),
            "probs": [list(p) for p in probs],
            "truncated": [False] * len(texts),
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(texts), parts + 1).astype(int)
    for p in range(parts):
        pq.write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]), directory / f"part-{p:05d}.parquet")
    counts = {"read": len(texts), "labeled": len(texts), "rejected": 0}
    manifest = {"stage": "label", "labels": label_names, "counts": counts}
    (directory / "_manifest.json").write_text(json.dumps(manifest))
    return directory


#: Eight short reviews with a teacher confidence and pseudo-label each (the one-step tests' rows).
TEXTS = [
    "a gripping, funny and deeply moving film",
    "dull , lifeless and far too long",
    "the cast is wonderful",
    "i walked out after an hour",
    "a small gem that rewards patience",
    "an incoherent mess from start to finish",
    "sharp writing and a great score",
    "nothing here works at all , not even the jokes",
]
CONFIDENCE = [0.95, 0.7, 0.88, 0.6, 0.91, 0.99, 0.55, 0.8]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


def review_batch(rows: list[int] | None = None):
    """A :class:`llkd_ray.train.data.Batch` of those rows (all eight by default)."""
    from llkd_ray.train.data import Batch

    rows = list(range(len(TEXTS))) if rows is None else rows
    probs = [[1 - c, c] if y == 1 else [c, 1 - c] for c, y in zip(CONFIDENCE, LABELS, strict=True)]
    return Batch(
        ids=[f"id{i}" for i in rows],
        texts=[TEXTS[i] for i in rows],
        labels=torch.tensor([LABELS[i] for i in rows]),
        confidence=torch.tensor([CONFIDENCE[i] for i in rows]),
        probs=torch.tensor([probs[i] for i in rows]),
    )


def fresh_selector(strategy: str = "llkd"):
    """A selector with no thresholds yet (2 classes, momentum 0.9, seed 1): two steps from it compare."""
    from llkd_ray.train.selection import Selector

    return Selector(2, strategy=strategy, momentum=0.9, seed=1)


def fresh_ctx(ctx, strategy: str = "llkd", **fields):
    """``ctx`` with a :func:`fresh_selector` of ``strategy`` and ``fields`` replaced (``sample_rate``...)."""
    from dataclasses import replace

    return replace(ctx, selector=fresh_selector(strategy), **fields)


def student_without_dropout(model_dir, labels: list[str]):
    """A tiny student (seed 0) with dropout off, and its tokenizer: two steps compare exactly."""
    from llkd_ray.student.model import load_student

    model, tokenizer = load_student(str(model_dir), labels, seed=0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tokenizer
