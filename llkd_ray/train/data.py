"""The trainer's input: the labeling stage's Parquet parts, checked; their rows as a Ray Dataset and,
on each worker, as a stream of candidate :class:`Batch` es.

``validate_labels_dir`` runs on the driver before anything starts (top-level ``part-*.parquet``
files, ``_manifest.json`` labels equal to the config's); ``estimate_pool_tokens`` sizes one compute
budget unit; ``build_dataset`` is the lazy Ray Dataset the workers shard; :class:`CandidateStream`
reads a worker's shard. :class:`Batch` is plain torch (the step functions take it): this module
imports Ray only inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from llkd_ray.artifacts import MANIFEST, label_files, read_json, resolve
from llkd_ray.errors import LlkdError
from llkd_ray.train.plan import TrainingPlan

if TYPE_CHECKING:
    import ray.data

#: Columns the trainer reads from the labeling output.
LABEL_COLUMNS = ["id", "text", "label_index", "confidence", "probs"]


@dataclass(frozen=True)
class LabeledPool:
    """The labeling stage's output: its Parquet parts and row count (read from footers only)."""

    directory: str
    files: list[str]
    rows: int


def validate_labels_dir(labels: str | Path, label_names: list[str]) -> LabeledPool:
    """Check a labels directory before any training starts; raise :class:`LlkdError` if unusable.

    It must exist, hold top-level ``part-*.parquet`` files with at least one row and the columns
    the trainer reads, and (when ``_manifest.json`` is there) have been labeled with the config's
    label set, in the same order.
    """
    reference = str(labels)
    filesystem, root = resolve(reference)
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise LlkdError(f"labels directory not found: {reference} (write one with `llkd label`)")
    manifest = read_json(f"{root}/{MANIFEST}", filesystem, strict=True)
    labeled_with = manifest.get("labels") if isinstance(manifest, dict) else None
    if labeled_with is not None and list(labeled_with) != list(label_names):
        raise LlkdError(
            f"labels directory {reference} was labeled with labels {list(labeled_with)}, "
            f"but the config's task.labels are {list(label_names)}; relabel or use the matching config"
        )
    _, parts = label_files(reference)
    if not parts:
        raise LlkdError(f"labels directory {reference} is empty: no part-*.parquet files (did `llkd label` finish?)")
    rows = 0
    for path in parts:
        with filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            missing = [c for c in LABEL_COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                raise LlkdError(
                    f"labels file {path} lacks column(s) {', '.join(missing)}; "
                    f"found {', '.join(parquet.schema_arrow.names)}"
                )
            rows += parquet.metadata.num_rows
    if rows == 0:
        raise LlkdError(f"labels directory {reference} is empty: its Parquet parts hold no rows")
    files = parts if "://" not in reference else [f"{reference.split('://')[0]}://{p}" for p in parts]
    return LabeledPool(directory=reference, files=files, rows=rows)


def estimate_pool_tokens(pool: LabeledPool, tokenizer: Any, max_length: int, sample_rows: int = 20_000) -> int:
    """The pool's student tokens (truncated at ``max_length``): the size of one budget unit.

    Counted exactly on pools of up to ``sample_rows`` rows; on larger pools the mean over the
    first ``sample_rows`` rows (whole Parquet row groups) is scaled to the pool.
    """
    texts: list[str] = []
    for path in pool.files:
        filesystem, local = resolve(path)
        with filesystem.open_input_file(local) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                texts.extend(str(t) for t in parquet.read_row_group(group, columns=["text"]).column("text").to_pylist())
                if len(texts) >= sample_rows:
                    break
        if len(texts) >= sample_rows:
            break
    counted = 0
    for start in range(0, len(texts), 1024):
        encoded = tokenizer(texts[start : start + 1024], truncation=True, max_length=max_length)
        counted += sum(len(ids) for ids in encoded["input_ids"])
    if not texts:
        return 0
    return counted if len(texts) >= pool.rows else round(counted * pool.rows / len(texts))


@dataclass
class Batch:
    """One worker's rows for a step, as the labeling stage wrote them."""

    ids: list[str]
    texts: list[str]
    labels: torch.Tensor
    """Pseudo-label index y_i (int64)."""
    confidence: torch.Tensor
    """Teacher confidence c_i (float32)."""
    probs: torch.Tensor
    """Teacher distribution q_i (float32, N x K)."""

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def from_numpy(batch: dict[str, np.ndarray]) -> Batch:
        probs = np.stack([np.asarray(p, dtype=np.float32) for p in batch["probs"]]) if len(batch["probs"]) else None
        return Batch(
            ids=[str(i) for i in batch["id"]],
            texts=[str(t) for t in batch["text"]],
            labels=torch.tensor(np.asarray(batch["label_index"], dtype=np.int64)),
            confidence=torch.tensor(np.asarray(batch["confidence"], dtype=np.float32)),
            probs=torch.as_tensor(probs) if probs is not None else torch.zeros(0, 0),
        )

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        return Batch(
            ids=[i for b in batches for i in b.ids],
            texts=[t for b in batches for t in b.texts],
            labels=torch.cat([b.labels for b in batches]),
            confidence=torch.cat([b.confidence for b in batches]),
            probs=torch.cat([b.probs for b in batches]),
        )

    def take(self, index: torch.Tensor) -> Batch:
        rows = index.tolist()
        return Batch(
            ids=[self.ids[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            labels=self.labels[index],
            confidence=self.confidence[index],
            probs=self.probs[index],
        )


class CandidateStream:
    """This worker's candidate batches from its dataset shard, skipping what a restored run consumed.

    The first batch is fetched on construction: Ray Data's start-up (seconds) is not training time.
    """

    def __init__(self, shard: Any, rows: int, seed: int, skip: int) -> None:
        self._shard, self._rows, self._seed, self._cycle = shard, rows, seed, 0
        self._batches = self._iterate()
        for _ in range(skip):
            self._fetch()
        self._ready: dict[str, np.ndarray] | None = self._fetch()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(
            self._shard.iter_batches(
                batch_size=self._rows,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=max(4 * self._rows, 256),
                local_shuffle_seed=self._seed + 7919 * self._cycle,
            )
        )

    def _fetch(self) -> dict[str, np.ndarray]:
        try:
            return next(self._batches)
        except StopIteration:  # past the last copy of the pool: start over, shuffled anew
            self._cycle += 1
            self._batches = self._iterate()
            try:
                return next(self._batches)
            except StopIteration:
                raise RuntimeError("the candidate stream is empty (fewer rows than one batch)") from None

    def next(self) -> Batch:
        batch, self._ready = (self._ready, None) if self._ready is not None else (self._fetch(), None)
        return Batch.from_numpy(batch)


def build_dataset(pool: LabeledPool, plan: TrainingPlan, seed: int) -> ray.data.Dataset:
    """The labeled Ray Dataset (lazy): ``plan.passes`` copies of the pool, each in its own block order."""
    from llkd_ray.compat import read_parquet

    base = read_parquet(pool.files, columns=LABEL_COLUMNS)
    copies = [base.randomize_block_order(seed=seed + p) for p in range(plan.passes)]
    return copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]
