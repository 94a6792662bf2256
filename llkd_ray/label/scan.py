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
from llkd_ray.label.store import DUPLICATE_ID, REJECTED_SCHEMA, OutputStore, part_name, row_keys

logger = logging.getLogger(__name__)


def resolve_repeats(store: OutputStore) -> int:
    """Make every id committed once; return how many doubled copies of a row were removed.

    Rows are told apart by :func:`~llkd_ray.label.store.row_keys` (id and text). Copies of the same
    row (a retried block, or a line the corpus holds twice) are removed but one. Rows of one id with
    different texts are a repeated id: one is kept, the same on every run and resume (a labeled row
    before a rejected one, then the lowest key), the others are moved to ``rejected/`` with the
    reason ``duplicate_id``. The record is written before the rows leave their parts, so a kill in
    between leaves a copy the next scan removes.
    """
    subs = ((), (REJECTED_DIR,))
    ids: Counter[str] = Counter()
    for sub in subs:
        for name in store.parts(*sub):
            ids.update(store.read_table(*sub, name, columns=["id"])["id"].to_pylist())
    repeated = {i for i, n in ids.items() if n > 1}
    if not repeated:
        return 0
    rows: list[tuple[tuple[str, ...], str, int, str, str | None]] = []  # (sub, part, index, key, reason)
    tables: dict[tuple[tuple[str, ...], str], pa.Table] = {}
    for sub in subs:
        for name in store.parts(*sub):
            table = store.read_table(*sub, name)
            mask = pc.is_in(table["id"], value_set=pa.array(sorted(repeated), pa.string())).to_pylist()
            if not any(mask):
                continue
            tables[sub, name] = table
            keys = row_keys(table["id"], table["text"]).to_pylist()
            reasons = table["reason"].to_pylist() if sub else [None] * table.num_rows
            rows += [(sub, name, k, keys[k], reasons[k]) for k in range(table.num_rows) if mask[k]]
    drop: dict[tuple[tuple[str, ...], str], set[int]] = {}
    recorded = {key for sub, _, _, key, reason in rows if reason == DUPLICATE_ID}
    moved: list[pa.Table] = []
    removed = 0
    by_id: dict[str, list[tuple[tuple[str, ...], str, int, str, str | None]]] = {}
    for row in sorted(rows, key=lambda r: (bool(r[0]), r[3], r[4] == DUPLICATE_ID, r[0], r[1], r[2])):
        by_id.setdefault(row[3].split("\x1f", 1)[0], []).append(row)
    for occurrences in by_id.values():
        winner = next((r for r in occurrences if r[4] != DUPLICATE_ID), occurrences[0])
        seen = {winner[3]}
        for sub, name, index, key, reason in occurrences:
            if (sub, name, index) == winner[:3]:
                continue
            if key in seen or (key in recorded and reason != DUPLICATE_ID):
                removed += key in seen  # another copy of a row already there
                drop.setdefault((sub, name), set()).add(index)
                continue
            seen.add(key)
            if reason != DUPLICATE_ID:  # a repeated id: moved to rejected/ with its reason
                drop.setdefault((sub, name), set()).add(index)
                moved.append(_as_repeat(tables[sub, name].slice(index, 1)))
    if moved:
        table = pa.concat_tables(moved)
        store.write_table(
            table,
            REJECTED_DIR,
            part_name([f"{DUPLICATE_ID}:{k}" for k in row_keys(table["id"], table["text"]).to_pylist()]),
        )
    for (sub, name), indices in drop.items():
        table = tables[sub, name]
        kept = table.filter(pa.array([k not in indices for k in range(table.num_rows)]))
        if kept.num_rows:
            store.write_table(kept, *sub, name)
        else:
            store.delete(*sub, name)
        logger.warning("moved or removed %d rows of repeated ids from %s", len(indices), "/".join((*sub, name)))
    return removed


def _as_repeat(row: pa.Table) -> pa.Table:
    """A committed row (labeled or rejected) as a ``rejected/`` row with the reason ``duplicate_id``."""
    tokens = row["teacher_tokens"] if "teacher_tokens" in row.column_names else pa.nulls(1, pa.int64())
    return pa.table(
        {"id": row["id"], "text": row["text"], "reason": pa.array([DUPLICATE_ID]), "teacher_tokens": tokens},
        schema=REJECTED_SCHEMA,
    )


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
    duplicates = resolve_repeats(store)
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
