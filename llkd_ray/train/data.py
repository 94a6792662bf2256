"""The trainer's input: the labeling stage's Parquet parts, checked; their rows as a Ray Dataset and,
on each worker, as a stream of candidate :class:`Batch` es.

``validate_labels_dir`` runs on the driver before anything starts (top-level ``part-*.parquet``
files, ``_manifest.json`` labels equal to the config's); ``estimate_pool_tokens`` sizes one compute
budget unit; ``build_dataset`` is the lazy Ray Dataset the workers shard; :class:`CandidateStream`
reads a worker's shard. :class:`Batch` is plain torch (the step functions take it): this module
imports Ray only inside the functions that need it.

Decisions:

- The rows arrive tokenised. ``build_dataset`` tokenises them in Ray Data CPU tasks (truncated at
  the student's ``max_length``, unpadded, ragged ``input_ids``), so a worker's step only pads and
  moves them: tokenising a GPU-sized batch on the step's thread costs as much as the GPU step
  itself (docs/training.md, "The GPU path").
- :class:`Batch` carries the ids and ``take``/``concat`` keep them, so scoring and training share
  a row's tokenisation. A Batch built from texts alone (tests, scripts) is tokenised on first use
  by the same ``tokenize_texts``; ``pad_token_ids`` is the one padding path, and it gives the
  tensors of ``tokenizer(texts, padding=True, truncation=True, max_length=L)`` (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
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

#: Rows (all copies together) up to which a stream the run will start over is materialized in
#: the object store instead of read and tokenised again at each start.
MATERIALIZE_ROWS = 100_000


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


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[np.ndarray]:
    """The rows' token ids, truncated at ``max_length``, unpadded (int32, one array a row)."""
    encoded = tokenizer(
        list(texts), truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
    )
    return [np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"]]


def pad_token_ids(ids: Sequence[np.ndarray], tokenizer: Any, length: int | None = None) -> dict[str, torch.Tensor]:
    """Ragged ids as the model's padded inputs, at the longest row (or ``length``, if longer).

    The tensors ``tokenizer(texts, padding=True, ...)`` gives (its pad id and side, a
    ``token_type_ids`` of zeros where the model takes one), built in numpy in one scatter:
    ``tokenizer.pad`` loops over the rows in Python.
    """
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    width = max(int(lengths.max(initial=0)), length or 0)
    positions = np.arange(width)
    left = tokenizer.padding_side == "left"
    real = positions >= (width - lengths)[:, None] if left else positions < lengths[:, None]
    input_ids = np.full((len(ids), width), tokenizer.pad_token_id or 0, dtype=np.int64)
    if len(ids):
        input_ids[real] = np.concatenate(ids)
    encoded = {"input_ids": torch.from_numpy(input_ids)}
    if "token_type_ids" in tokenizer.model_input_names:
        encoded["token_type_ids"] = torch.zeros_like(encoded["input_ids"])
    encoded["attention_mask"] = torch.from_numpy(real.astype(np.int64))
    return encoded


@dataclass
class Batch:
    """One worker's rows for a step, as the labeling stage wrote them, tokenised."""

    ids: list[str]
    texts: list[str]
    labels: torch.Tensor
    """Pseudo-label index y_i (int64)."""
    confidence: torch.Tensor
    """Teacher confidence c_i (float32)."""
    probs: torch.Tensor
    """Teacher distribution q_i (float32, N x K)."""
    input_ids: list[np.ndarray] | None = None
    """The student's token ids of each row (truncated, unpadded); None until tokenised."""

    def __len__(self) -> int:
        return len(self.ids)

    def token_ids(self, tokenizer: Any, max_length: int) -> list[np.ndarray]:
        """The rows' token ids: as they arrived, or tokenised now (once) for a Batch built from texts."""
        if self.input_ids is None:
            self.input_ids = tokenize_texts(tokenizer, self.texts, max_length)
        return self.input_ids

    @staticmethod
    def from_numpy(batch: dict[str, np.ndarray]) -> Batch:
        probs = np.stack([np.asarray(p, dtype=np.float32) for p in batch["probs"]]) if len(batch["probs"]) else None
        return Batch(
            ids=[str(i) for i in batch["id"]],
            texts=[str(t) for t in batch["text"]],
            labels=torch.tensor(np.asarray(batch["label_index"], dtype=np.int64)),
            confidence=torch.tensor(np.asarray(batch["confidence"], dtype=np.float32)),
            probs=torch.as_tensor(probs) if probs is not None else torch.zeros(0, 0),
            input_ids=list(batch["input_ids"]) if "input_ids" in batch else None,
        )

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        tokenised = all(b.input_ids is not None for b in batches)
        return Batch(
            ids=[i for b in batches for i in b.ids],
            texts=[t for b in batches for t in b.texts],
            labels=torch.cat([b.labels for b in batches]),
            confidence=torch.cat([b.confidence for b in batches]),
            probs=torch.cat([b.probs for b in batches]),
            input_ids=[row for b in batches for row in b.input_ids or []] if tokenised else None,
        )

    def take(self, index: torch.Tensor) -> Batch:
        rows = index.tolist()
        return Batch(
            ids=[self.ids[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            labels=self.labels[index],
            confidence=self.confidence[index],
            probs=self.probs[index],
            input_ids=[self.input_ids[i] for i in rows] if self.input_ids is not None else None,
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


@functools.lru_cache(maxsize=4)
def _tokenizer(reference: str) -> Any:
    """A tokenizer loaded once per Ray worker process (the tasks of a map reuse their processes)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reference)


def tokenize_block(block: pa.Table, tokenizer: str, max_length: int) -> pa.Table:
    """A Ray Data block with its rows' ``input_ids`` (the student's, truncated, unpadded) added."""
    texts = [str(t) for t in block.column("text").to_pylist()]
    ids = tokenize_texts(_tokenizer(tokenizer), texts, max_length)
    return block.append_column("input_ids", pa.array(ids, type=pa.list_(pa.int32())))


def build_dataset(
    pool: LabeledPool, plan: TrainingPlan, seed: int, tokenizer: str, max_length: int
) -> ray.data.Dataset:
    """The labeled Ray Dataset: ``plan.passes`` copies of the pool, each in its own block order,
    tokenised by the student's ``tokenizer`` (a path) in CPU tasks on the way to the workers.

    Lazy, unless the run will start its stream over and the copies are small
    (:data:`MATERIALIZE_ROWS`): each start of a lazy stream runs the read and the tokenising map
    again, seconds of Ray Data start-up each time, which on a small pool (the rounds' first slices)
    costs more than its training. Materialized in the order the lazy stream keeps, the blocks are
    the same, so the run is too."""
    from llkd_ray.compat import read_parquet

    base = read_parquet(pool.files, columns=LABEL_COLUMNS)
    copies = [base.randomize_block_order(seed=seed + p) for p in range(plan.passes)]
    dataset = copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]
    dataset = dataset.map_batches(
        tokenize_block, batch_format="pyarrow", fn_kwargs={"tokenizer": tokenizer, "max_length": max_length}
    )
    if plan.cycles and plan.passes * plan.pool_rows <= MATERIALIZE_ROWS:
        # The dataset's own context (a copy taken when it was made): the trainer's ingest options,
        # which keep the order, do not reach a materialization run here.
        dataset.context.execution_options.preserve_order = True
        dataset = dataset.materialize()
    return dataset
