"""Student training on Ray Train: DDP workers, LLKD selection computed across shards, weighted loss.

Read it top to bottom, like a recipe:

1. **Inputs** — ``validate_labels_dir`` checks the labeling stage's output before anything starts
   (top-level ``part-*.parquet`` files, ``_manifest.json`` labels equal to the config's).
2. **Plan** — ``TrainingPlan``: global batch, per-worker rows and candidates, the step or compute
   budget, warm-up, how many passes over the pool the candidate stream needs.
3. **One step, plain torch** — ``train_step``: the information need (inference-mode scoring), the
   selection (``llkd_ray.selection``, all-reduced across shards), the weighted loss, backward on
   the kept rows. The equivalence test runs exactly this function in a 2-process gloo group.
4. **The recipe** — ``StudentTrainingRecipe``: ``setup`` builds model, optimizer, schedule,
   selector and candidate stream (``ray.train.get_dataset_shard``) and restores from
   ``ray.train.get_checkpoint()`` with ``load_checkpoint``; ``train`` is the loop (compute
   accounting, gold-set evaluations along the run, ``metrics.jsonl``); ``save_checkpoint`` writes
   what a restart needs. ``train_loop_per_worker`` builds and runs it.
5. **The driver** — ``train_student``: builds the Ray Dataset (lazily, from the Parquet parts),
   the ``TorchTrainer`` (``ScalingConfig``, ``RunConfig`` with ``FailureConfig`` and
   ``CheckpointConfig``), runs it, and writes ``OUTPUT/student/``, ``OUTPUT/metrics.jsonl``,
   ``OUTPUT/selected_ids.parquet`` and ``OUTPUT/training_summary.json``.

Terms: a **step** is one optimizer step. Its candidates are ``training.batch_size`` x M rows
(M = ``candidates_per_step``; 1 for ``all``), split evenly over the workers; every strategy but
``all`` scores them in inference mode, selects once over the whole step (thresholds, mask,
normaliser: per optimizer step, whatever the gradient accumulation) and back-propagates at most
``batch_size`` of the selected, in ``gradient_accumulation_steps`` micro-batches. ``all`` trains on
every row. A run is bounded by steps (``max_steps`` / ``epochs``; an **epoch** is
``pool rows // batch_size`` steps) or by compute (``training.budget``, in passes of ``all`` over the
pool; ``llkd_ray/compute.py``). The gold set is evaluated at ``training.eval_points`` fractions of
the run, or at the end of each epoch and of training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from llkd_ray.artifacts import MANIFEST, TRAINING_SUMMARY, label_files, read_json, resolve
from llkd_ray.compute import ComputeMeter, ProgressSchedule, StepCompute, all_pass_flops, non_embedding_parameters
from llkd_ray.config import PipelineConfig, validate_config
from llkd_ray.errors import ConfigError, LlkdError
from llkd_ray.selection import Selection, Selector, normalized_entropy, scoring_sample, selection_loss
from llkd_ray.serve.predictor import Predictor, inference, save_classifier

logger = logging.getLogger(__name__)

#: Columns the trainer reads from the labeling output.
LABEL_COLUMNS = ["id", "text", "label_index", "confidence", "probs"]
STATE_FILE = "training_state.pt"
WORKER_SUMMARY = "worker_summary.json"
#: Copies of the pool the candidate dataset is made of (each in its own block order); a run that
#: draws more starts the stream over with a new shuffle.
MAX_POOL_COPIES = 8
#: Placeholder for "evaluate on ``config.data.gold``" in :func:`train_student`.
CONFIG_GOLD = "config"


# =========================================================================== 1. inputs


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


# =========================================================================== 2. plan


#: How a strategy learns the student's information need ``u_i`` before its mask (docs/method.md):
#: ``train`` — it trains on every row (``all``): ``u`` comes free from the training forward pass;
#: ``none`` — its mask reads the teacher only (``teacher_confidence``): nothing is scored;
#: ``gated`` — it needs ``u`` only where the teacher passes (``llkd``, ``random``): those rows are
#: scored, and a uniform sample of the rest for the student levels' batch means;
#: ``full`` — every candidate is scored (``student_uncertainty``; ``llkd`` without gated scoring).
Scoring = Literal["train", "none", "gated", "full"]


def scoring_mode(strategy: str, gated: bool = True) -> Scoring:
    """The cheapest scoring that gives ``strategy`` the same mask (see :data:`Scoring`)."""
    if strategy == "all":
        return "train"
    if strategy == "teacher_confidence":
        return "none"
    if strategy in ("llkd", "random") and gated:
        return "gated"
    return "full"


@dataclass(frozen=True)
class TrainingPlan:
    """Sizes and budgets every worker agrees on (computed once, on the driver)."""

    workers: int
    batch_size: int
    """Global rows per optimizer step (at most: the selected rows of the step's candidates)."""
    accumulation: int
    """Micro-batches the step's kept rows are back-propagated in (``gradient_accumulation_steps``)."""
    candidates_per_step: int
    """M; 1 for ``all``, which has nothing to choose among."""
    scoring: Scoring
    """How candidates are scored before selection (:data:`Scoring`)."""
    sample_rate: float
    """Gated scoring: the sampling rate of the rows outside the teacher gate."""
    fill: bool
    """Adaptive M (``selection.fill_batch``): draws of one batch until the kept rows fill a batch,
    at most ``candidates_per_step`` of them."""
    pool_rows: int
    pool_tokens: int
    steps_per_epoch: int
    total_steps: int
    """The step budget; for a compute-budgeted run, a safety cap the budget is reached well before."""
    budget: float | None
    """Compute budget in passes of ``all`` over the pool (None: the run is bounded by steps)."""
    warmup: float
    """Fraction of the run (steps or compute) the learning rate warms up over."""
    eval_points: int | None
    passes: int
    """Copies of the pool the candidate stream is made of (enough for the run)."""

    @property
    def scored(self) -> bool:
        """Selection happens before the training pass (every strategy but ``all``)."""
        return self.scoring != "train"

    @property
    def worker_rows(self) -> int:
        """Rows one worker back-propagates per step (at most)."""
        return self.batch_size // self.workers

    @property
    def worker_candidates(self) -> int:
        """Candidates one worker draws at once: a step's worth, or one batch's when filling."""
        return self.worker_rows * (1 if self.fill else self.candidates_per_step)

    @staticmethod
    def build(config: PipelineConfig, pool_rows: int, pool_tokens: int = 0) -> TrainingPlan:
        training, selection = config.training, config.selection
        scoring = scoring_mode(selection.strategy, selection.gated_scoring)
        scored = scoring != "train"
        m = selection.candidates_per_step if scored else 1
        steps_per_epoch = max(1, pool_rows // training.batch_size)
        if training.budget is not None:
            # A candidate costs 6N per token trained, 2N scored, less when it is neither (gated or no
            # scoring): the step cap only guards against a run that never spends its budget (it
            # stops there, with budget_spent < 1). The stream cycles, so the cap costs nothing.
            candidates = math.ceil((25 if scored else 1) * training.budget * pool_rows * 1.25)
            total = max(1, math.ceil(candidates / (training.batch_size * m)))
        else:
            total = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
        # Equal shards drop at most workers-1 rows of the stream; one spare pass covers that. The
        # stream starts over (a new shuffle) past the last copy, so long runs need no more copies.
        passes = min(math.ceil(total * training.batch_size * m / pool_rows) + 1, MAX_POOL_COPIES)
        return TrainingPlan(
            workers=training.workers,
            batch_size=training.batch_size,
            accumulation=training.gradient_accumulation_steps,
            candidates_per_step=m,
            scoring=scoring,
            sample_rate=selection.scoring_sample_rate,
            fill=scored and selection.fill_batch,
            pool_rows=pool_rows,
            pool_tokens=pool_tokens,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            budget=training.budget,
            warmup=training.warmup_ratio,
            eval_points=training.eval_points,
            passes=passes,
        )


# =========================================================================== 3. one step, plain torch


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


@dataclass
class StepContext:
    """What a step needs besides the model and the rows."""

    tokenizer: Any
    max_length: int
    device: torch.device
    world_size: int = 1
    soft_loss: bool = False
    autocast_dtype: torch.dtype | None = None
    scaler: Any = None
    """A ``torch.amp.GradScaler`` for fp16, else None."""

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


@dataclass
class StepResult:
    selection: Selection
    loss: float
    """This worker's loss term (its share of the global ``L``; the sum over workers is ``L``)."""
    selected_ids: list[str]
    compute: StepCompute
    """This worker's tokens, samples and seconds in the step (the optimizer step not included)."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _tokens(encoded: dict[str, torch.Tensor]) -> int:
    """Real tokens of a tokenised batch (padding excluded): what the FLOPs rule counts."""
    mask = encoded.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(encoded["input_ids"].numel())


def score_candidates(model: torch.nn.Module, batch: Batch, ctx: StepContext, chunk: int) -> tuple[torch.Tensor, int]:
    """The student's information need ``u_i`` for every candidate, and the tokens scored.

    Inference mode: no dropout, no graph (about a third of a training pass's FLOPs per token).
    The rows keep their order (chunks of ``chunk`` rows, padded per chunk, as the FLOPs rule and the
    equivalence over workers assume), so this is not :class:`~llkd_ray.serve.predictor.Predictor`'s
    length-sorted batching; the eval-mode/inference-mode switch is the same.
    """
    needs, tokens = [], 0
    with inference(_unwrap(model)) as module, ctx.autocast():
        for start in range(0, len(batch.texts), chunk):
            encoded = ctx.encode(batch.texts[start : start + chunk])
            tokens += _tokens(encoded)
            needs.append(normalized_entropy(module(**encoded).logits))
    return (torch.cat(needs) if needs else torch.zeros(0)), tokens


def _micro_batches(rows: int, parts: int) -> list[torch.Tensor]:
    """Row indices in at most ``parts`` contiguous chunks (never an empty one)."""
    return [chunk for chunk in torch.arange(rows).chunk(max(1, min(parts, rows))) if len(chunk)]


def backward_weighted(
    model: torch.nn.Module,
    rows: Batch,
    weights: torch.Tensor,
    normaliser: float,
    ctx: StepContext,
    micro_batches: int = 1,
) -> tuple[float, int, torch.Tensor]:
    """Forward and backward ``rows`` with the spec's weighted loss, in micro-batches.

    Gradients accumulate over the micro-batches; under DDP only the last one all-reduces them.
    Each micro-batch's loss already carries the step's global normaliser, so their sum is the
    step's loss. Returns this worker's loss term, the tokens trained and the logits (detached).
    """
    loss_total, tokens, logits_out = 0.0, 0, []
    chunks = _micro_batches(len(rows), micro_batches)
    for number, index in enumerate(chunks):
        part = rows.take(index) if len(chunks) > 1 else rows
        last = number == len(chunks) - 1
        sync = model.no_sync() if not last and isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        with sync or contextlib.nullcontext():
            encoded = ctx.encode(part.texts)
            tokens += _tokens(encoded)
            with ctx.autocast():
                logits = model(**encoded).logits
            loss = selection_loss(
                logits,
                weights[index].to(ctx.device) if len(chunks) > 1 else weights.to(ctx.device),
                normaliser,
                labels=part.labels.to(ctx.device),
                teacher_probs=part.probs.to(ctx.device) if ctx.soft_loss else None,
                world_size=ctx.world_size,
            )
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        loss_total += float(loss.detach())
        logits_out.append(logits.detach())
    return loss_total / ctx.world_size, tokens, torch.cat(logits_out)


def train_step(
    model: torch.nn.Module,
    candidates: Batch,
    selector: Selector,
    ctx: StepContext,
    *,
    capacity: int | None = None,
    micro_batches: int = 1,
    scoring: Scoring = "full",
    sample_rate: float = 1.0,
) -> StepResult:
    """Select, weight and back-propagate one optimizer step's rows on this worker (no optimizer step).

    Selecting strategies (``scoring`` other than ``train``): the candidates are scored in inference
    mode as ``scoring`` says, the selector chooses among all of them at once — one selection per
    optimizer step, whatever the gradient accumulation — and only the kept rows (at most
    ``capacity``) go through forward and backward, in ``micro_batches``. ``train`` (``all``): every
    row trains, weight 1, and the information need for the thresholds' record comes from the
    training forward pass itself.
    """
    model.train()
    compute = StepCompute()
    if scoring != "train":
        selection, rows, weights = _score_and_select(
            model, candidates, selector, ctx, capacity, compute, scoring=scoring, sample_rate=sample_rate
        )
        kept = len(rows)
        if not kept:
            # Nothing kept here: one row with weight 0 keeps this worker in DDP's gradient all-reduce.
            rows, weights = candidates.take(torch.tensor([0])), torch.zeros(1)
        clock = time.perf_counter()
        loss, compute.training_tokens, _ = backward_weighted(
            model, rows, weights, selection.normaliser, ctx, micro_batches
        )
        compute.training_s = time.perf_counter() - clock
        compute.trained_samples = kept
    else:
        clock = time.perf_counter()
        weights = torch.ones(len(candidates))
        normaliser = max(1.0, float(len(candidates) * ctx.world_size))  # equal shards: the global batch
        loss, compute.training_tokens, logits = backward_weighted(
            model, candidates, weights, normaliser, ctx, micro_batches
        )
        compute.training_s = time.perf_counter() - clock
        compute.trained_samples = len(candidates)
        clock = time.perf_counter()
        selection = selector.select(candidates.confidence, candidates.labels, normalized_entropy(logits))
        compute.selection_s = time.perf_counter() - clock
    mask = selection.mask.cpu().tolist()
    return StepResult(
        selection=selection,
        loss=loss,
        selected_ids=[i for i, keep in zip(candidates.ids, mask, strict=True) if keep],
        compute=compute,
    )


def _score_and_select(
    model: torch.nn.Module,
    candidates: Batch,
    selector: Selector,
    ctx: StepContext,
    capacity: int | None,
    compute: StepCompute,
    *,
    scoring: Scoring = "full",
    sample_rate: float = 1.0,
) -> tuple[Selection, Batch, torch.Tensor]:
    """Score the candidates in inference mode as ``scoring`` says and select; the kept rows and weights.

    Unscored rows carry ``u = NaN``; with ``gated`` scoring, the rows outside the teacher gate
    that the sample left out get their class's mean over the sampled ones (``fill_unscored``).
    """
    clock = time.perf_counter()
    uncertainty = torch.full((len(candidates),), math.nan)
    sampled = None
    if scoring == "full":
        to_score = torch.ones(len(candidates), dtype=torch.bool)
    elif scoring == "gated":
        gate = selector.teacher_gate(candidates.confidence, candidates.labels)
        sampled = ~gate & scoring_sample(candidates.ids, sample_rate, selector.seed, selector.steps)
        to_score = gate | sampled
    else:
        to_score = torch.zeros(len(candidates), dtype=torch.bool)
    index = to_score.nonzero().squeeze(1)
    if len(index):
        scored = candidates.take(index) if len(index) < len(candidates) else candidates
        needs, tokens = score_candidates(model, scored, ctx, chunk=max(capacity or 0, 32))
        uncertainty[index] = needs
        compute.scoring_tokens += tokens
        compute.scored_samples += len(index)
    compute.scoring_s += time.perf_counter() - clock
    clock = time.perf_counter()
    if sampled is not None:
        uncertainty = selector.fill_unscored(uncertainty, candidates.labels, sampled)
    selection = selector.select(candidates.confidence, candidates.labels, uncertainty, capacity=capacity)
    compute.selection_s += time.perf_counter() - clock
    keep = selection.mask.nonzero().squeeze(1).cpu()
    return selection, candidates.take(keep), selection.weights[keep]


def _merge(selections: list[Selection]) -> Selection:
    """The selections of one step's draws as one: masks and weights concatenated, counts summed."""
    if len(selections) == 1:
        return selections[0]
    selected = sum(s.selected for s in selections)
    candidates = sum(s.candidates for s in selections)

    def mean(attribute: str, counts: list[int]) -> float:
        pairs = [(getattr(s, attribute), n) for s, n in zip(selections, counts, strict=True) if n]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else math.nan

    return Selection(
        mask=torch.cat([s.mask for s in selections]),
        weights=torch.cat([s.weights for s in selections]),
        normaliser=max(1.0, float(selected)),
        teacher_thresholds=selections[-1].teacher_thresholds,
        student_thresholds=selections[-1].student_thresholds,
        candidates=candidates,
        selected=selected,
        confidence_selected=mean("confidence_selected", [s.selected for s in selections]),
        confidence_rejected=mean("confidence_rejected", [s.candidates - s.selected for s in selections]),
    )


def fill_step(
    model: torch.nn.Module,
    draw: Callable[[], Batch],
    selector: Selector,
    ctx: StepContext,
    *,
    capacity: int,
    target: int,
    max_draws: int,
    micro_batches: int = 1,
    scoring: Scoring = "full",
    sample_rate: float = 1.0,
) -> StepResult:
    """Adaptive M: draw one batch of candidates at a time until the kept rows fill a batch.

    Each draw is scored and selected on its own (the thresholds advance per draw, as at M = 1);
    the kept rows accumulate until ``target`` rows are kept over all workers (the global batch)
    or ``max_draws`` draws were made, then they are back-propagated in one optimizer step with the
    step's normaliser (the rows kept over all its draws). Every worker makes the same number of
    draws: the stopping test reads the selector's global counts. ``capacity`` caps this worker's
    kept rows (its share of the batch).
    """
    model.train()
    compute = StepCompute()
    selections, kept_rows, kept_weights, ids, kept = [], [], [], [], 0
    for _ in range(max_draws):
        candidates = draw()
        selection, rows, weights = _score_and_select(
            model, candidates, selector, ctx, capacity - kept, compute, scoring=scoring, sample_rate=sample_rate
        )
        selections.append(selection)
        kept_rows.append(rows)
        kept_weights.append(weights)
        ids.extend(candidates.ids)
        kept += len(rows)
        if sum(s.selected for s in selections) >= target:
            break
    selection = _merge(selections)
    rows = Batch.concat(kept_rows) if kept else Batch.concat([candidates.take(torch.tensor([0]))])
    weights = torch.cat(kept_weights) if kept else torch.zeros(1)
    clock = time.perf_counter()
    loss, compute.training_tokens, _ = backward_weighted(model, rows, weights, selection.normaliser, ctx, micro_batches)
    compute.training_s = time.perf_counter() - clock
    compute.trained_samples = kept
    mask = selection.mask.cpu().tolist()
    return StepResult(
        selection=selection,
        loss=loss,
        selected_ids=[i for i, keep in zip(ids, mask, strict=True) if keep],
        compute=compute,
    )


def build_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights; the fused kernel where torch has one.

    Fused matters for selection: an LLKD step back-propagates a few rows, and the optimizer step
    over every parameter (the embedding table included) is then most of its cost. Measured on
    2 CPU cores with the MiniLM student (22.7M parameters): 0.158 s per step with the default
    (foreach) implementation, 0.027 s fused, against 0.07 s for forward + backward of 5 rows.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=learning_rate)


def load_student(reference: str, label_names: list[str], seed: int) -> tuple[torch.nn.Module, Any]:
    """Any ``AutoModelForSequenceClassification`` with id2label/label2id from the label set.

    A checkpoint without a classification head (or with one of another size) gets a fresh head,
    initialised from ``seed``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            reference,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    return model, tokenizer


# =========================================================================== 4. the recipe (one worker)


@dataclass
class TrainState:
    """Everything a restored worker needs besides the model, optimizer, scheduler and selector."""

    step: int = 0
    batches_consumed: int = 0
    """Candidate batches this worker has read from its shard: the data position to fast-forward to."""
    attempt: int = 0
    candidates_seen: int = 0
    rows_selected: int = 0
    selected_counts: dict[str, int] = field(default_factory=dict)
    """Rank 0 only: how often each pool id was selected (the data usage)."""
    train_seconds: float = 0.0
    next_eval: int = 1
    """The next evaluation point (of ``plan.eval_points``)."""
    curve: list[dict[str, Any]] = field(default_factory=list)
    """Rank 0 only: the gold-set evaluations so far (the learning curve)."""
    resumed_from: list[int] = field(default_factory=list)
    last_loss: float | None = None

    @property
    def last_eval(self) -> dict[str, Any] | None:
        return self.curve[-1] if self.curve else None

    def data_usage(self, pool_rows: int) -> dict[str, Any]:
        return {
            "pool_fraction": len(self.selected_counts) / pool_rows if pool_rows else 0.0,
            "sample_step_fraction": self.rows_selected / self.candidates_seen if self.candidates_seen else 0.0,
            "pool_rows_selected": len(self.selected_counts),
            "pool_rows": pool_rows,
            "selected_sample_steps": self.rows_selected,
            "sample_steps": self.candidates_seen,
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "no":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():  # auto
        return torch.bfloat16
    return None


class _Stream:
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


def _collectives(world_size: int) -> tuple[Callable[[torch.Tensor], Any] | None, Callable[[Any], list[Any]]]:
    """The all-reduce for the selector and an all-gather of Python objects (identity on 1 worker)."""
    if world_size == 1:
        return None, lambda obj: [obj]
    import torch.distributed as dist

    def all_reduce(tensor: torch.Tensor) -> None:
        # gloo takes the CPU float64 tensor as it is; NCCL needs it on the GPU.
        if dist.get_backend() == "nccl":
            on_device = tensor.cuda()
            dist.all_reduce(on_device)
            tensor.copy_(on_device.cpu())
        else:
            dist.all_reduce(tensor)

    def all_gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    return all_reduce, all_gather


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, allow_nan=False) + "\n")


class StepCallback:
    """A hook the recipe calls after every step (after its metrics are written)."""

    def on_step_end(self, recipe: StudentTrainingRecipe) -> None:  # pragma: no cover - interface
        pass


@dataclass(frozen=True)
class FaultInjection(StepCallback):
    """A testing hook: the worker of ``rank`` exits (like a lost process) right after ``step``,
    on the first attempt only — the ``marker`` file it writes records that it did."""

    step: int
    marker: str
    rank: int = 1

    def on_step_end(self, recipe: StudentTrainingRecipe) -> None:
        if recipe.rank == self.rank and recipe.state.step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text(f"worker {recipe.rank} exited after step {recipe.state.step}\n")
            os._exit(1)


class StudentTrainingRecipe:
    """One Ray Train worker's run, in the shape of torchtune's single-device recipe.

    ``setup`` builds the model, optimizer, schedule, selector and candidate stream from the config
    (restoring them with ``load_checkpoint`` when Ray Train hands one back); ``train`` is the loop;
    ``save_checkpoint`` writes what a restart needs. The compute accounting and the budget live in
    ``self.compute`` (a :class:`~llkd_ray.compute.ComputeMeter`, global over workers) and
    :meth:`progress`.
    """

    def __init__(
        self,
        config: PipelineConfig,
        plan: TrainingPlan,
        output: Path,
        student_path: str,
        gold: dict[str, Any] | None = None,
        callbacks: list[StepCallback] | None = None,
    ) -> None:
        self.config, self.plan, self.output = config, plan, output
        self.student_path, self.gold = student_path, gold
        self.callbacks = callbacks or []
        self.metrics_path = output / "metrics.jsonl"
        self.label_names = config.task.label_names
        self.state = TrainState()
        self.compute = ComputeMeter()

    @staticmethod
    def from_loop_config(loop_config: dict[str, Any]) -> StudentTrainingRecipe:
        fault = loop_config.get("fault")
        return StudentTrainingRecipe(
            PipelineConfig.model_validate(loop_config["config"]),
            TrainingPlan(**loop_config["plan"]),
            Path(loop_config["output"]),
            loop_config["student_path"],
            loop_config.get("gold"),
            callbacks=[FaultInjection(**fault)] if fault else [],
        )

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        import ray.train
        import ray.train.torch

        training, selection = self.config.training, self.config.selection
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(training.cpus_per_worker)))
        self.all_reduce, self.all_gather = _collectives(self.world)
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)

        checkpoint = ray.train.get_checkpoint()
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as restored:
            source = str(Path(restored) / "student") if restored else self.student_path
            model, self.tokenizer = load_student(source, self.label_names, training.seed)
            self.compute.parameters = non_embedding_parameters(model)
            self.model = ray.train.torch.prepare_model(model)
            self.optimizer = build_optimizer(self.model, training.learning_rate, training.weight_decay)
            self.schedule = ProgressSchedule(self.plan.warmup)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
            self.selector = Selector(
                len(self.label_names),
                strategy=selection.strategy,
                momentum=selection.momentum,
                weighting=selection.weighting,
                seed=training.seed,
                all_reduce=self.all_reduce,
                rank=self.rank,
                world_size=self.world,
            )
            if restored:
                self.load_checkpoint(Path(restored))
            elif self.rank == 0:
                self.metrics_path.unlink(missing_ok=True)
        # One budget unit (a pass of `all` over the pool) in FLOPs, and the budget itself.
        self.unit_flops = (
            all_pass_flops(self.compute.parameters, self.plan.pool_tokens) if self.plan.pool_tokens else None
        )
        self.budget_flops = self.plan.budget * self.unit_flops if self.plan.budget and self.unit_flops else None

        autocast_dtype = _autocast_dtype(training.mixed_precision, self.device)
        self.ctx = StepContext(
            tokenizer=self.tokenizer,
            max_length=self.config.student.max_length,
            device=self.device,
            world_size=self.world,
            soft_loss=selection.loss == "soft",
            autocast_dtype=autocast_dtype,
            scaler=torch.amp.GradScaler(self.device.type) if autocast_dtype == torch.float16 else None,
        )
        self.stream = _Stream(
            ray.train.get_dataset_shard("train"),
            self.plan.worker_candidates,
            training.seed + self.rank,
            self.state.batches_consumed,
        )

    def load_checkpoint(self, directory: Path) -> None:
        """Restore the optimizer, schedule, selector, counters and (rank 0) the metrics so far."""
        saved = torch.load(directory / STATE_FILE, weights_only=False)
        self.state = TrainState(**saved["state"])
        self.compute = ComputeMeter(**saved["compute"])
        self.selector.load_state_dict(saved["selector"])
        if "optimizer" in saved:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        self.state.attempt += 1
        self.state.resumed_from.append(self.state.step)
        if self.rank == 0:  # the metrics as of the checkpoint: steps after it are redone
            shutil.copyfile(directory / "metrics.jsonl", self.metrics_path)
            _write_jsonl(self.metrics_path, {"kind": "resume", "step": self.state.step, "attempt": self.state.attempt})

    # ------------------------------------------------------------------ the budget

    def progress(self) -> float:
        """The fraction of the run done: compute spent over the budget, or steps over the steps."""
        if self.budget_flops:
            return self.compute.flops / self.budget_flops
        return self.state.step / self.plan.total_steps

    def finished(self) -> bool:
        return self.progress() >= 1.0 - 1e-9 or self.state.step >= self.plan.total_steps

    def _evaluation_due(self) -> bool:
        if not self.gold:
            return False
        if self.plan.eval_points:
            return self.finished() or self.progress() >= self.state.next_eval / self.plan.eval_points - 1e-9
        return self.state.step % self.plan.steps_per_epoch == 0 or self.finished()

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        plan, state, training = self.plan, self.state, self.config.training
        capacity = plan.worker_rows if plan.scored else None
        self.model.train()
        started = time.perf_counter() - state.train_seconds
        while not self.finished():
            if plan.fill:
                result = fill_step(
                    self.model,
                    self._draw,
                    self.selector,
                    self.ctx,
                    capacity=plan.worker_rows,
                    target=plan.batch_size,
                    max_draws=plan.candidates_per_step,
                    micro_batches=plan.accumulation,
                    scoring=plan.scoring,
                    sample_rate=plan.sample_rate,
                )
            else:
                result = train_step(
                    self.model,
                    self._draw(),
                    self.selector,
                    self.ctx,
                    capacity=capacity,
                    micro_batches=plan.accumulation,
                    scoring=plan.scoring,
                    sample_rate=plan.sample_rate,
                )
            clock = time.perf_counter()
            self._optimizer_step(result.selection.selected > 0)
            result.compute.training_s += time.perf_counter() - clock

            clock = time.perf_counter()
            gathered = self.all_gather((result.selected_ids, result.loss, asdict(result.compute)))
            step = StepCompute.total([StepCompute(**share[2]) for share in gathered])
            step.selection_s += time.perf_counter() - clock  # gathering the ids is selection's bookkeeping
            self.compute.add(step)
            state.step += 1
            state.candidates_seen += result.selection.candidates
            state.rows_selected += result.selection.selected
            state.last_loss = sum(share[1] for share in gathered)
            if self.rank == 0:
                for ids, _, _ in gathered:
                    for row_id in ids:
                        state.selected_counts[row_id] = state.selected_counts.get(row_id, 0) + 1
            self.schedule.progress = self.progress()
            with warnings.catch_warnings():  # a step that selected nothing skips optimizer.step()
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            state.train_seconds = time.perf_counter() - started
            if self.rank == 0:
                _write_jsonl(self.metrics_path, self._step_record(result.selection, step))

            if self._evaluation_due():
                self.evaluate()
                started = time.perf_counter() - state.train_seconds  # evaluation is not training time
            for callback in self.callbacks:
                callback.on_step_end(self)
            if self.finished():
                break
            if state.step % training.checkpoint_every == 0:
                self._report(with_checkpoint=True)
            elif state.step % training.report_every == 0:
                self._report()
        self._report(final=True)

    def _draw(self) -> Batch:
        self.state.batches_consumed += 1
        return self.stream.next()

    def _optimizer_step(self, any_selected: bool) -> None:
        if any_selected:
            if self.ctx.scaler is not None:
                self.ctx.scaler.step(self.optimizer)
                self.ctx.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _step_record(self, selection: Selection, step: StepCompute) -> dict[str, Any]:
        state, names = self.state, self.label_names
        return {
            "step": state.step,
            "epoch": state.step / self.plan.steps_per_epoch,
            "progress": self.progress(),
            "loss": _finite(state.last_loss),
            "lr": self.scheduler.get_last_lr()[0],
            "selected_fraction": selection.selected_fraction,
            "selected": selection.selected,
            "candidates": selection.candidates,
            "teacher_thresholds": dict(zip(names, selection.teacher_thresholds.tolist(), strict=True)),
            "student_thresholds": dict(zip(names, selection.student_thresholds.tolist(), strict=True)),
            "teacher_level": float(self.selector.teacher_level),
            "student_level": float(self.selector.student_level),
            "confidence_selected": _finite(selection.confidence_selected),
            "confidence_rejected": _finite(selection.confidence_rejected),
            "data_usage": state.data_usage(self.plan.pool_rows),
            "step_compute": asdict(step),
            "compute": self.compute.record(self.unit_flops),
            "elapsed_s": round(state.train_seconds, 3),
            "samples_per_s": state.candidates_seen / state.train_seconds if state.train_seconds else None,
            "attempt": state.attempt,
        }

    def evaluate(self) -> None:
        """Every worker predicts its share of the gold set; rank 0 records the metrics on the curve."""
        from llkd_ray.metrics import classification_metrics

        gold, state = self.gold or {}, self.state
        texts = gold["texts"][self.rank :: self.world]
        predictor = Predictor(_unwrap(self.model), self.tokenizer, max_length=self.ctx.max_length, batch_size=64)
        predicted = predictor.predict_indices(texts)
        self.model.train()
        if self.plan.eval_points:
            state.next_eval = math.floor(self.progress() * self.plan.eval_points + 1e-9) + 1
        shares = self.all_gather(predicted)
        if self.rank != 0:
            return
        merged = [0] * len(gold["texts"])
        for r, share in enumerate(shares):
            merged[r :: self.world] = share
        metrics = classification_metrics(gold["labels"], [self.label_names[i] for i in merged], self.label_names)
        record = {
            "kind": "eval",
            "step": state.step,
            "epoch": state.step / self.plan.steps_per_epoch,
            "progress": self.progress(),
            "flops": self.compute.flops,
            "all_passes": self.compute.flops / self.unit_flops if self.unit_flops else None,
            "elapsed_s": round(state.train_seconds, 3),
            "data_usage": state.data_usage(self.plan.pool_rows)["pool_fraction"],
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "per_class_f1": {name: metrics["per_class"][name]["f1"] for name in self.label_names},
        }
        state.curve.append(record | {"n": metrics["n"]})
        _write_jsonl(self.metrics_path, record)

    # ------------------------------------------------------------------ checkpoints

    def _report(self, final: bool = False, with_checkpoint: bool = False) -> None:
        """``ray.train.report`` on every worker (it is a barrier); rank 0 attaches the checkpoint."""
        import ray.train

        metrics = {
            "step": self.state.step,
            "loss": self.state.last_loss,
            "pool_fraction": self.state.data_usage(self.plan.pool_rows)["pool_fraction"],
            "progress": self.progress(),
        }
        if not (with_checkpoint or final):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                self.save_checkpoint(Path(tmp), final)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None)

    def save_checkpoint(self, directory: Path, final: bool = False) -> None:
        """The student, the training state and the metrics so far; the selections when ``final``."""
        # The training length goes with the student, so serving and pipelines truncate as training did.
        save_classifier(_unwrap(self.model), self.tokenizer, directory / "student", self.ctx.max_length)
        payload = {
            "state": asdict(self.state),
            "compute": asdict(self.compute),
            "selector": self.selector.state_dict(),
            "final": final,
        }
        if not final:
            payload["optimizer"] = self.optimizer.state_dict()
            payload["scheduler"] = self.scheduler.state_dict()
        torch.save(payload, directory / STATE_FILE)
        if self.metrics_path.is_file():
            shutil.copyfile(self.metrics_path, directory / "metrics.jsonl")
        if final:
            ids = sorted(self.state.selected_counts)
            table = pa.table({"id": ids, "times_selected": [self.state.selected_counts[i] for i in ids]})
            pq.write_table(table, directory / "selected_ids.parquet")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: build the recipe and run it."""
    recipe = StudentTrainingRecipe.from_loop_config(loop_config)
    recipe.setup()
    recipe.train()


# =========================================================================== 5. the driver


def _prepared_config(
    config: PipelineConfig, strategy: str | None, workers: int | None, max_steps: int | None, budget: float | None
) -> PipelineConfig:
    if max_steps is not None and budget is not None:
        raise ConfigError("give a step budget (max_steps) or a compute budget (budget), not both")
    raw = config.model_dump(mode="json")
    if strategy is not None:
        raw["selection"]["strategy"] = strategy
    if workers is not None:
        raw["training"]["workers"] = workers
    if max_steps is not None:
        raw["training"]["max_steps"] = max_steps
        raw["training"]["budget"] = None
    if budget is not None:
        raw["training"]["budget"] = budget
        raw["training"]["max_steps"] = None
    return validate_config(raw, "(train options)")


def _gold_payload(config: PipelineConfig, eval_data: str | None) -> dict[str, Any] | None:
    reference = config.data.gold if eval_data == CONFIG_GOLD else eval_data
    if not reference:
        return None
    from llkd_ray.corpus import read_gold

    frame = read_gold(reference, config.task.label_names)
    return {
        "reference": reference,
        "texts": [str(t) for t in frame["text"]],
        "labels": [str(label) for label in frame["label"]],
        "label_names": config.task.label_names,
    }


def build_dataset(pool: LabeledPool, plan: TrainingPlan, seed: int):
    """The labeled Ray Dataset (lazy): ``plan.passes`` copies of the pool, each in its own block order."""
    from llkd_ray.compat import read_parquet

    base = read_parquet(pool.files, columns=LABEL_COLUMNS)
    copies = [base.randomize_block_order(seed=seed + p) for p in range(plan.passes)]
    return copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]


def format_flops(flops: float) -> str:
    """``1.23 PFLOP``-style, for summary lines."""
    for scale, unit in ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.3g} FLOP"


def train_student(
    config: PipelineConfig,
    labels: str | Path,
    output: str | Path,
    *,
    strategy: str | None = None,
    workers: int | None = None,
    max_steps: int | None = None,
    budget: float | None = None,
    eval_data: str | None = CONFIG_GOLD,
    fault_injection: FaultInjection | None = None,
) -> dict[str, Any]:
    """Train a student on the labels in ``labels``; write it and its records to ``output``.

    ``strategy``, ``workers``, ``max_steps`` and ``budget`` (compute, in passes of ``all``) override
    the config. ``eval_data`` is the gold set evaluated during training: the config's ``data.gold``
    by default, another reference, or None. Returns the training summary (also written to
    ``output/training_summary.json``).
    """
    from transformers import AutoTokenizer

    from llkd_ray.models import resolve_model_path
    from llkd_ray.runtime import ensure_ray

    wall_started = time.perf_counter()
    config = _prepared_config(config, strategy, workers, max_steps, budget)
    pool = validate_labels_dir(labels, config.task.label_names)
    student_path = resolve_model_path(config.student.model)
    pool_tokens = estimate_pool_tokens(pool, AutoTokenizer.from_pretrained(student_path), config.student.max_length)
    plan = TrainingPlan.build(config, pool.rows, pool_tokens)
    output = Path(output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)

    ensure_ray(config)
    gold = _gold_payload(config, eval_data)
    state, compute = _fit(config, plan, pool, output, student_path, gold, fault_injection)
    summary = _training_summary(config, plan, pool, pool_tokens, state, compute)
    summary["labels"], summary["student"] = str(labels), str(output / "student")
    summary["gold"] = gold["reference"] if gold else None
    summary["wall_time_s"] = round(time.perf_counter() - wall_started, 3)
    (output / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def _fit(
    config: PipelineConfig,
    plan: TrainingPlan,
    pool: LabeledPool,
    output: Path,
    student_path: str,
    gold: dict[str, Any] | None,
    fault_injection: FaultInjection | None,
) -> tuple[TrainState, ComputeMeter]:
    """Run the Ray Train job; copy the final student and records into ``output``; return its state."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    training = config.training
    dataset = build_dataset(pool, plan, training.seed)
    storage = training.storage_path or str(output / "ray")
    run_name = f"llkd-train-{config.selection.strategy}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "plan": asdict(plan),
            "output": str(output),
            "student_path": student_path,
            "gold": gold,
            "fault": asdict(fault_injection) if fault_injection else None,
        },
        scaling_config=ScalingConfig(
            num_workers=training.workers,
            use_gpu=training.use_gpu,
            resources_per_worker={"CPU": training.cpus_per_worker} | ({"GPU": 1} if training.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a final checkpoint")

    with result.checkpoint.as_directory() as final:
        final = Path(final)
        student_dir = output / "student"
        shutil.rmtree(student_dir, ignore_errors=True)
        shutil.copytree(final / "student", student_dir)
        for name in ("metrics.jsonl", "selected_ids.parquet"):
            if (final / name).is_file():
                shutil.copyfile(final / name, output / name)
        saved = torch.load(final / STATE_FILE, weights_only=False)
    if training.storage_path is None:  # the checkpoints served their purpose
        shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(storage).rmdir()
    return TrainState(**saved["state"]), ComputeMeter(**saved["compute"])


def _training_summary(
    config: PipelineConfig,
    plan: TrainingPlan,
    pool: LabeledPool,
    pool_tokens: int,
    state: TrainState,
    compute: ComputeMeter,
) -> dict[str, Any]:
    """What ``training_summary.json`` records of a finished run; the caller adds the paths, the
    gold set and the wall time, which it alone knows."""
    training = config.training
    unit = all_pass_flops(compute.parameters, pool_tokens) if pool_tokens else None
    spent = compute.flops / (unit * plan.budget) if unit and plan.budget else None
    if plan.budget and spent is not None and spent < 1.0 - 1e-9:
        logger.warning(
            "training stopped at its step cap (%d steps) with %.0f%% of the budget spent", state.step, 100 * spent
        )
    seconds = state.train_seconds
    return {
        "strategy": config.selection.strategy,
        "config_hash": config.section_hash("task", "selection", "student", "training"),
        "student_model": config.student.model,
        "workers": training.workers,
        "batch_size": training.batch_size,
        "candidates_per_step": plan.candidates_per_step,
        "steps": state.step,
        "epochs": state.step / plan.steps_per_epoch,
        "budget": plan.budget,
        "budget_spent": spent,
        "pool_rows": pool.rows,
        "pool_tokens": pool_tokens,
        "student_parameters": compute.parameters,
        "all_pass_flops": unit,
        "compute": compute.record(unit),
        "data_usage": state.data_usage(pool.rows),
        "final_loss": state.last_loss,
        "final_metrics": state.last_eval,
        "curve": state.curve,
        "attempts": state.attempt + 1,
        "resumed_from_steps": state.resumed_from,
        "train_loop_s": round(seconds, 3),
        "scoring_s": round(compute.scoring_s, 3),
        "training_s": round(compute.training_s, 3),
        "selection_s": round(compute.selection_s, 3),
        "selection_share": compute.selection_s / seconds if seconds else None,
        "samples_per_s": state.candidates_seen / seconds if seconds else None,
        "trained_samples_per_s": compute.trained_samples / seconds if seconds else None,
    }
