"""The read side of a label directory: the manifest's totals and the labeled rows.

:func:`scan_output` runs once at the end of a labeling run: it first repairs any id committed
twice (the last step of exactly-once, see :mod:`llkd_ray.label.store`), then counts labels,
rejections, confidence, gold accuracy and the teacher's tokens from the parts' columns: so a
resumed run counts every committed row once, whichever run labeled it. :func:`read_labels` is what
training and the docs read a finished directory with.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llkd_ray.artifacts import REJECTED_DIR, label_files
from llkd_ray.errors import ConfigError
from llkd_ray.label.store import OutputStore

logger = logging.getLogger(__name__)


def _dedupe(store: OutputStore, sub: tuple[str, ...], seen: set[str]) -> int:
    """Drop from the parts of ``sub`` every id already in ``seen`` (first part wins); add the rest."""
    removed = 0
    for name in store.parts(*sub):
        ids = store.read_table(*sub, name, columns=["id"])["id"].to_pylist()
        repeated = [i for i in ids if i in seen] + [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            table = store.read_table(*sub, name)
            id_column = table["id"].to_pylist()
            first_seen: set[str] = set()
            keep = []
            for row_id in id_column:
                keep.append(row_id not in seen and row_id not in first_seen)
                first_seen.add(row_id)
            table = table.filter(pa.array(keep))
            removed += len(id_column) - table.num_rows
            if table.num_rows:
                store.write_table(table, *sub, name)
            else:
                store.delete(*sub, name)
            logger.warning("removed %d repeated ids from %s", len(id_column) - table.num_rows, "/".join((*sub, name)))
        seen.update(ids)
    return removed


def _teacher_tokens(store: OutputStore, sub: tuple[str, ...], name: str) -> tuple[int, int, int]:
    """(tokens, rows counted, rows of the teacher not counted) of one part's ``teacher_tokens``.

    A part written before tokens were counted has no such column: its rows are not counted. In
    ``rejected/`` only the teacher's rejections (``teacher_...`` reasons) are the teacher's rows.
    """
    columns = store.schema_names(*sub, name)
    wanted = ["teacher_tokens"] if "teacher_tokens" in columns else []
    if sub:
        wanted.append("reason")
    table = store.read_table(*sub, name, columns=wanted)
    if sub:
        table = table.filter(pc.starts_with(table["reason"], "teacher_"))
    if "teacher_tokens" not in columns:
        return 0, 0, table.num_rows
    tokens = table["teacher_tokens"]
    counted = len(tokens) - tokens.null_count
    return int(pc.sum(tokens).as_py() or 0), counted, tokens.null_count


def teacher_token_totals(store: OutputStore) -> dict[str, int]:
    """The real tokens the teacher read for the committed rows (labeled and teacher-rejected)."""
    totals = {"tokens": 0, "rows": 0, "rows_not_counted": 0}
    for sub in ((), (REJECTED_DIR,)):
        for name in store.parts(*sub):
            tokens, counted, missing = _teacher_tokens(store, sub, name)
            totals["tokens"] += tokens
            totals["rows"] += counted
            totals["rows_not_counted"] += missing
    return totals


def teacher_tokens_of(store: OutputStore, ids: pa.Array) -> int:
    """The real tokens the teacher read for the committed rows among ``ids`` (a labeling round's slice)."""
    total = 0
    for sub in ((), (REJECTED_DIR,)):
        for name in store.parts(*sub):
            if "teacher_tokens" not in store.schema_names(*sub, name):
                continue
            table = store.read_table(*sub, name, columns=["id", "teacher_tokens"])
            table = table.filter(pc.is_in(table["id"], value_set=ids))
            total += int(pc.sum(table["teacher_tokens"]).as_py() or 0)
    return total


def scan_output(store: OutputStore, label_names: list[str]) -> dict[str, Any]:
    """Totals of the committed output, after making sure every id is there exactly once."""
    seen: set[str] = set()
    duplicates = _dedupe(store, (), seen) + _dedupe(store, (REJECTED_DIR,), seen)
    label_counts = np.zeros(len(label_names), dtype=np.int64)
    confidences: list[np.ndarray] = []
    correct: list[np.ndarray] = []
    gold_confidence: list[np.ndarray] = []
    truncated = 0
    for name in store.parts():
        columns = store.schema_names(name)
        wanted = ["label_index", "confidence", "truncated", "pseudo_label"]
        wanted += ["gold_label"] if "gold_label" in columns else []
        table = store.read_table(name, columns=wanted)
        if not table.num_rows:
            continue
        label_counts += np.bincount(table["label_index"].to_numpy(), minlength=len(label_names))[: len(label_names)]
        confidence = table["confidence"].to_numpy()
        confidences.append(confidence)
        truncated += int(pc.sum(table["truncated"]).as_py() or 0)
        if "gold_label" in wanted:
            gold = table["gold_label"]
            known = pc.is_valid(gold).to_numpy(zero_copy_only=False)
            hits = pc.equal(table["pseudo_label"], gold).fill_null(False).to_numpy(zero_copy_only=False)
            correct.append(hits[known])
            gold_confidence.append(confidence[known])
    reasons: Counter[str] = Counter()
    for name in store.parts(REJECTED_DIR):
        reasons.update(store.read_table(REJECTED_DIR, name, columns=["reason"])["reason"].to_pylist())
    labeled = int(label_counts.sum())
    rejected = sum(reasons.values())
    totals: dict[str, Any] = {
        "counts": {
            "read": labeled + rejected,
            "labeled": labeled,
            "rejected": rejected,
            "truncated": truncated,
            "rejected_by_reason": dict(sorted(reasons.items())),
            "duplicates_removed": duplicates,
        },
        "label_distribution": dict(zip(label_names, map(int, label_counts), strict=True)),
        "teacher_tokens": teacher_token_totals(store),
        "mean_confidence": float(np.concatenate(confidences).mean()) if labeled else None,
        "gold_accuracy": None,
    }
    if correct and sum(map(len, correct)):
        hits = np.concatenate(correct)
        conf = np.concatenate(gold_confidence)
        order = np.argsort(-conf, kind="stable")
        half = len(order) // 2
        totals["gold_accuracy"] = float(hits.mean())
        totals["gold_rows"] = len(hits)
        if half:
            totals["gold_accuracy_by_confidence"] = {
                "more_confident_half": float(hits[order[:half]].mean()),
                "less_confident_half": float(hits[order[half:]].mean()),
            }
    return totals


def read_labels(output: str | Path):
    """The labeled rows of an output directory as a Ray Dataset (``rejected/`` and ``_*`` left out)."""
    from llkd_ray.compat import read_parquet

    filesystem, paths = label_files(output)
    if not paths:
        raise ConfigError(f"no labeled parts in {output}")
    return read_parquet(paths, filesystem=filesystem)
