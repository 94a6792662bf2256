"""Student training on Ray Train: DDP workers, LLKD selection computed across shards, weighted loss.

Read it top to bottom, like a recipe:

1. **Inputs** — ``validate_labels_dir`` checks the labeling stage's output before anything starts
   (top-level ``part-*.parquet`` files, ``_manifest.json`` labels equal to the config's).
2. **Plan** — ``TrainingPlan``: global batch, per-worker batch, step budget, warm-up, epochs, how
   many passes over the pool the candidate stream needs.
3. **One step, plain torch** — ``train_round``: forward, the student's information need, the
   selection (``llkd_ray.selection``, all-reduced across shards), the weighted loss, backward. The
   equivalence test runs exactly this function in a 2-process gloo group.
4. **The worker loop** — ``train_loop_per_worker``: reads its shard with
   ``ray.train.get_dataset_shard``, restores from ``ray.train.get_checkpoint()``, trains, writes
   ``metrics.jsonl``, evaluates on the gold set each epoch, checkpoints through
   ``ray.train.report``.
5. **The driver** — ``train_student``: builds the Ray Dataset (lazily, from the Parquet parts),
   the ``TorchTrainer`` (``ScalingConfig``, ``RunConfig`` with ``FailureConfig`` and
   ``CheckpointConfig``), runs it, and writes ``OUTPUT/student/``, ``OUTPUT/metrics.jsonl``,
   ``OUTPUT/selected_ids.parquet`` and ``OUTPUT/training_summary.json``.

Terms: a **step** is one optimizer step over ``training.batch_size`` rows (the global batch, split
evenly over the workers). With ``gradient_accumulation_steps`` G > 1 a step is G **rounds** of
``batch_size / G`` rows; selection (thresholds, mask, normaliser) works per round. With
``candidates_per_step`` M > 1 every round draws M times its rows as candidates, scores them in
inference mode and back-propagates at most one round's worth of the selected. An **epoch** is
``pool rows // batch_size`` steps (with M = 1 one pass over the pool); the gold set is evaluated
at the end of each epoch and of training.
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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from llkd_ray.config import PipelineConfig, validate_config
from llkd_ray.errors import ConfigError, LlkdError
from llkd_ray.selection import Selection, Selector, normalized_entropy, selection_loss

logger = logging.getLogger(__name__)

#: Columns the trainer reads from the labeling output.
LABEL_COLUMNS = ["id", "text", "label_index", "confidence", "probs"]
MANIFEST = "_manifest.json"
STATE_FILE = "training_state.pt"
WORKER_SUMMARY = "worker_summary.json"
#: Placeholder for "evaluate on ``config.data.gold``" in :func:`train_student`.
CONFIG_GOLD = "config"


# =========================================================================== 1. inputs


@dataclass(frozen=True)
class LabeledPool:
    """The labeling stage's output: its Parquet parts and row count (read from footers only)."""

    directory: str
    files: list[str]
    rows: int


def _filesystem(reference: str) -> tuple[pafs.FileSystem, str]:
    if "://" in reference:
        return pafs.FileSystem.from_uri(reference)
    return pafs.LocalFileSystem(), str(Path(reference).expanduser().resolve())


def validate_labels_dir(labels: str | Path, label_names: list[str]) -> LabeledPool:
    """Check a labels directory before any training starts; raise :class:`LlkdError` if unusable.

    It must exist, hold top-level ``part-*.parquet`` files with at least one row and the columns
    the trainer reads, and (when ``_manifest.json`` is there) have been labeled with the config's
    label set, in the same order.
    """
    reference = str(labels)
    filesystem, root = _filesystem(reference)
    info = filesystem.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise LlkdError(f"labels directory not found: {reference} (write one with `llkd label`)")
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=False))
    names = {Path(e.path).name: e for e in entries}
    manifest_info = names.get(MANIFEST)
    if manifest_info is not None and manifest_info.type == pafs.FileType.File:
        with filesystem.open_input_stream(manifest_info.path) as stream:
            try:
                manifest = json.loads(stream.read())
            except ValueError as error:
                raise LlkdError(f"{reference}/{MANIFEST} is not valid JSON: {error}") from None
        labeled_with = manifest.get("labels")
        if labeled_with is not None and list(labeled_with) != list(label_names):
            raise LlkdError(
                f"labels directory {reference} was labeled with labels {list(labeled_with)}, "
                f"but the config's task.labels are {list(label_names)}; relabel or use the matching config"
            )
    parts = sorted(
        e.path
        for name, e in names.items()
        if name.startswith("part-") and name.endswith(".parquet") and e.type == pafs.FileType.File
    )
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


# =========================================================================== 2. plan


@dataclass(frozen=True)
class TrainingPlan:
    """Sizes and budgets every worker agrees on (computed once, on the driver)."""

    workers: int
    batch_size: int
    """Global rows per optimizer step."""
    accumulation: int
    candidates_per_step: int
    pool_rows: int
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    passes: int
    """Copies of the pool the candidate stream is made of (enough for ``total_steps``)."""

    @property
    def round_rows(self) -> int:
        """Rows one worker trains on per round (at most)."""
        return self.batch_size // (self.workers * self.accumulation)

    @property
    def round_candidates(self) -> int:
        """Candidates one worker draws per round."""
        return self.round_rows * self.candidates_per_step

    @staticmethod
    def build(config: PipelineConfig, pool_rows: int) -> TrainingPlan:
        training, m = config.training, config.selection.candidates_per_step
        steps_per_epoch = max(1, pool_rows // training.batch_size)
        total = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
        # Equal shards drop at most workers-1 rows of the stream; one spare pass covers that.
        needed = total * training.batch_size * m
        passes = math.ceil(needed / pool_rows) + 1
        return TrainingPlan(
            workers=training.workers,
            batch_size=training.batch_size,
            accumulation=training.gradient_accumulation_steps,
            candidates_per_step=m,
            pool_rows=pool_rows,
            total_steps=total,
            steps_per_epoch=steps_per_epoch,
            warmup_steps=math.ceil(training.warmup_ratio * total),
            passes=passes,
        )


# =========================================================================== 3. one step, plain torch


@dataclass
class Batch:
    """One worker's rows for a round, as the labeling stage wrote them."""

    ids: list[str]
    texts: list[str]
    labels: torch.Tensor
    """Pseudo-label index y_i (int64)."""
    confidence: torch.Tensor
    """Teacher confidence c_i (float32)."""
    probs: torch.Tensor
    """Teacher distribution q_i (float32, N x K)."""

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
    """What a round needs besides the model and the rows."""

    tokenizer: Any
    max_length: int
    device: torch.device
    world_size: int = 1
    soft_loss: bool = False
    autocast_dtype: torch.dtype | None = None
    scaler: Any = None
    """A ``torch.amp.GradScaler`` for fp16, else None."""
    loss_scale: float = 1.0
    """1 / gradient-accumulation rounds."""

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


@dataclass
class RoundResult:
    selection: Selection
    loss: float
    """This worker's loss term (its share of the global ``L``; the mean over workers is ``L``)."""
    selected_ids: list[str]
    trained_rows: int
    selection_seconds: float
    """Time spent on the information need and the selection (its all-reduces included)."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def score_candidates(model: torch.nn.Module, batch: Batch, ctx: StepContext, chunk: int) -> torch.Tensor:
    """The student's information need ``u_i`` for every candidate: inference mode, no dropout, no graph."""
    module = _unwrap(model)
    was_training = module.training
    module.eval()
    needs = []
    with torch.inference_mode(), ctx.autocast():
        for start in range(0, len(batch.texts), chunk):
            logits = module(**ctx.encode(batch.texts[start : start + chunk])).logits
            needs.append(normalized_entropy(logits))
    module.train(was_training)
    return torch.cat(needs) if needs else torch.zeros(0)


def train_round(
    model: torch.nn.Module,
    batch: Batch,
    selector: Selector,
    ctx: StepContext,
    *,
    capacity: int | None = None,
) -> RoundResult:
    """Select, weight and back-propagate one round of this worker's rows (gradients accumulate).

    ``capacity`` is None for M = 1: the information need comes from the training forward pass
    itself, over the whole batch, and unselected rows get weight 0. With M > 1 (``capacity`` =
    rows per round), candidates are scored in inference mode and only the kept rows (at most
    ``capacity``) go through forward and backward.
    """
    model.train()
    if capacity is None:
        with ctx.autocast():
            logits = model(**ctx.encode(batch.texts)).logits
        clock = time.perf_counter()
        uncertainty = normalized_entropy(logits)
        selection = selector.select(batch.confidence, batch.labels, uncertainty)
        selection_seconds = time.perf_counter() - clock
        rows, weights = batch, selection.weights
    else:
        uncertainty = score_candidates(model, batch, ctx, chunk=max(capacity, 1))
        clock = time.perf_counter()
        selection = selector.select(batch.confidence, batch.labels, uncertainty, capacity=capacity)
        selection_seconds = time.perf_counter() - clock
        keep = selection.mask.nonzero().squeeze(1).cpu()
        if len(keep):
            rows, weights = batch.take(keep), selection.weights[keep]
        else:
            # Nothing kept here: one row with weight 0 keeps this worker in DDP's gradient all-reduce.
            rows, weights = batch.take(torch.tensor([0])), torch.zeros(1)
        with ctx.autocast():
            logits = model(**ctx.encode(rows.texts)).logits
    loss = selection_loss(
        logits,
        weights.to(ctx.device),
        selection.normaliser,
        labels=rows.labels.to(ctx.device),
        teacher_probs=rows.probs.to(ctx.device) if ctx.soft_loss else None,
        world_size=ctx.world_size,
    )
    scaled = loss * ctx.loss_scale
    if ctx.scaler is not None:
        scaled = ctx.scaler.scale(scaled)
    scaled.backward()
    mask = selection.mask.cpu().tolist()
    return RoundResult(
        selection=selection,
        loss=float(loss.detach()) / ctx.world_size,
        selected_ids=[i for i, keep in zip(batch.ids, mask, strict=True) if keep],
        trained_rows=int(sum(mask)),
        selection_seconds=selection_seconds,
    )


def build_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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


# =========================================================================== 4. the worker loop


@dataclass(frozen=True)
class FaultInjection:
    """A testing hook: the worker of ``rank`` exits (like a lost process) right after ``step``,
    on the first attempt only — the ``marker`` file it writes records that it did."""

    step: int
    marker: str
    rank: int = 1


@dataclass
class TrainState:
    """Everything a restored worker needs besides the model, optimizer and scheduler."""

    step: int = 0
    rounds_consumed: int = 0
    """Rounds this worker has read from its shard: the data position to fast-forward to."""
    attempt: int = 0
    candidates_seen: int = 0
    rows_selected: int = 0
    trained_rows: int = 0
    selected_counts: dict[str, int] = field(default_factory=dict)
    """Rank 0 only: how often each pool id was selected (the data usage)."""
    train_seconds: float = 0.0
    selection_seconds: float = 0.0
    """Rank 0's time in the selection (information need, select with its all-reduces, id gathering)."""
    resumed_from: list[int] = field(default_factory=list)
    last_eval: dict[str, Any] | None = None
    last_loss: float | None = None

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
    """This worker's rounds from its dataset shard, skipping what a restored run already consumed.

    The first round is fetched on construction: Ray Data's start-up (seconds) is not training time.
    """

    def __init__(self, shard: Any, rows: int, seed: int, skip: int) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            shard.iter_batches(
                batch_size=rows,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=max(4 * rows, 256),
                local_shuffle_seed=seed,
            )
        )
        for _ in range(skip):
            self._fetch()
        self._ready: dict[str, np.ndarray] | None = self._fetch()

    def _fetch(self) -> dict[str, np.ndarray]:
        try:
            return next(self._batches)
        except StopIteration:
            raise RuntimeError("the candidate stream ran out before the step budget (plan.passes too small)") from None

    def next(self) -> Batch:
        batch, self._ready = (self._ready, None) if self._ready is not None else (self._fetch(), None)
        return Batch.from_numpy(batch)


def _collectives(world_size: int) -> tuple[Callable[[torch.Tensor], Any] | None, Callable[[Any], list[Any]]]:
    """The all-reduce for the selector and an all-gather of Python objects (identity on 1 worker)."""
    if world_size == 1:
        return None, lambda obj: [obj]
    import torch.distributed as dist

    def all_reduce(tensor: torch.Tensor) -> None:
        # gloo and NCCL both take a CPU float64 tensor on gloo; NCCL needs it on the GPU.
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


def _evaluate_gold(
    model: torch.nn.Module, ctx: StepContext, gold: dict[str, Any], rank: int, world: int, all_gather: Callable
) -> dict[str, Any] | None:
    """Every worker predicts its share of the gold set; rank 0 gets the metrics."""
    from llkd_ray.evaluate import classification_metrics, predict_indices

    texts = gold["texts"][rank::world]
    predicted = predict_indices(_unwrap(model), ctx.tokenizer, texts, max_length=ctx.max_length, device=ctx.device)
    shares = all_gather(predicted)
    if rank != 0:
        return None
    merged = [0] * len(gold["texts"])
    for r, share in enumerate(shares):
        merged[r::world] = share
    names = gold["label_names"]
    return classification_metrics(gold["labels"], [names[i] for i in merged], names)


def _save_checkpoint(directory: Path, model, tokenizer, optimizer, scheduler, selector, state, metrics_path, final):
    student = directory / "student"
    _unwrap(model).save_pretrained(student)
    tokenizer.save_pretrained(student)
    payload = {"state": asdict(state), "selector": selector.state_dict(), "final": final}
    if not final:
        payload["optimizer"] = optimizer.state_dict()
        payload["scheduler"] = scheduler.state_dict()
    torch.save(payload, directory / STATE_FILE)
    if metrics_path.is_file():
        shutil.copyfile(metrics_path, directory / "metrics.jsonl")
    if final:
        ids = sorted(state.selected_counts)
        table = pa.table({"id": ids, "times_selected": [state.selected_counts[i] for i in ids]})
        pq.write_table(table, directory / "selected_ids.parquet")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (also usable under any launcher that sets up Ray Train's context)."""
    import ray.train
    import ray.train.torch
    from transformers import get_linear_schedule_with_warmup

    config = PipelineConfig.model_validate(loop_config["config"])
    plan = TrainingPlan(**loop_config["plan"])
    training, selection = config.training, config.selection
    label_names = config.task.label_names
    output = Path(loop_config["output"])
    metrics_path = output / "metrics.jsonl"
    fault = FaultInjection(**loop_config["fault"]) if loop_config.get("fault") else None

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(training.cpus_per_worker)))
    all_reduce, all_gather = _collectives(world)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)

    # ---- model, optimizer, schedule, selection state: fresh or from the latest checkpoint
    checkpoint = ray.train.get_checkpoint()
    state, saved = TrainState(), None
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as restored:
        source = str(Path(restored) / "student") if restored else loop_config["student_path"]
        model, tokenizer = load_student(source, label_names, training.seed)
        if restored:
            saved = torch.load(Path(restored) / STATE_FILE, weights_only=False)
            state = TrainState(**saved["state"])
            if rank == 0:  # the metrics as of the checkpoint: steps after it are redone
                shutil.copyfile(Path(restored) / "metrics.jsonl", metrics_path)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model, training.learning_rate, training.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
    selector = Selector(
        len(label_names),
        strategy=selection.strategy,
        momentum=selection.momentum,
        weighting=selection.weighting,
        seed=training.seed,
        all_reduce=all_reduce,
        rank=rank,
        world_size=world,
    )
    if saved is not None:
        selector.load_state_dict(saved["selector"])
        if "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        state.attempt += 1
        state.resumed_from.append(state.step)
    if rank == 0:
        if saved is None:
            metrics_path.unlink(missing_ok=True)
        else:
            _write_jsonl(metrics_path, {"kind": "resume", "step": state.step, "attempt": state.attempt})

    autocast_dtype = _autocast_dtype(training.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    ctx = StepContext(
        tokenizer=tokenizer,
        max_length=config.student.max_length,
        device=device,
        world_size=world,
        soft_loss=selection.loss == "soft",
        autocast_dtype=autocast_dtype,
        scaler=scaler,
        loss_scale=1.0 / plan.accumulation,
    )
    capacity = plan.round_rows if plan.candidates_per_step > 1 else None
    stream = _Stream(
        ray.train.get_dataset_shard("train"), plan.round_candidates, training.seed + rank, state.rounds_consumed
    )
    gold = loop_config.get("gold")

    def report(metrics: dict[str, Any], final: bool = False, with_checkpoint: bool = False) -> None:
        """``ray.train.report`` on every worker (it is a barrier); rank 0 attaches the checkpoint."""
        if not (with_checkpoint or final):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _save_checkpoint(
                    Path(tmp), model, tokenizer, optimizer, scheduler, selector, state, metrics_path, final
                )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    # ---- the loop
    model.train()
    started = time.perf_counter() - state.train_seconds
    while state.step < plan.total_steps:
        step_loss, step_selected, step_candidates, step_ids = 0.0, 0, 0, []
        for round_index in range(plan.accumulation):
            batch = stream.next()
            state.rounds_consumed += 1
            last = round_index == plan.accumulation - 1
            sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
            with sync:
                result = train_round(model, batch, selector, ctx, capacity=capacity)
            step_loss += result.loss / plan.accumulation
            step_selected += result.selection.selected
            step_candidates += result.selection.candidates
            step_ids.extend(result.selected_ids)
            state.trained_rows += result.trained_rows
            state.selection_seconds += result.selection_seconds
        if step_selected > 0:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a step that selected nothing skips optimizer.step()
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
        state.step += 1
        state.candidates_seen += step_candidates
        state.rows_selected += step_selected

        clock = time.perf_counter()
        gathered = all_gather((step_ids, step_loss))
        loss = sum(share[1] for share in gathered)
        state.last_loss = loss
        if rank == 0:
            for ids, _ in gathered:
                for row_id in ids:
                    state.selected_counts[row_id] = state.selected_counts.get(row_id, 0) + 1
        state.selection_seconds += time.perf_counter() - clock
        state.train_seconds = time.perf_counter() - started
        sel = result.selection
        record = {
            "step": state.step,
            "epoch": state.step / plan.steps_per_epoch,
            "loss": _finite(loss),
            "lr": scheduler.get_last_lr()[0],
            "selected_fraction": step_selected / step_candidates if step_candidates else 0.0,
            "selected": step_selected,
            "candidates": step_candidates,
            "teacher_thresholds": dict(zip(label_names, sel.teacher_thresholds.tolist(), strict=True)),
            "student_thresholds": dict(zip(label_names, sel.student_thresholds.tolist(), strict=True)),
            "teacher_level": float(selector.teacher_level),
            "student_level": float(selector.student_level),
            "confidence_selected": _finite(sel.confidence_selected),
            "confidence_rejected": _finite(sel.confidence_rejected),
            "data_usage": state.data_usage(plan.pool_rows),
            "elapsed_s": round(state.train_seconds, 3),
            "samples_per_s": state.candidates_seen / state.train_seconds if state.train_seconds else None,
            "attempt": state.attempt,
        }
        if rank == 0:
            _write_jsonl(metrics_path, record)

        end_of_epoch = state.step % plan.steps_per_epoch == 0 or state.step == plan.total_steps
        if gold and end_of_epoch:
            metrics = _evaluate_gold(model, ctx, gold, rank, world, all_gather)
            model.train()
            if rank == 0 and metrics is not None:
                state.last_eval = {"step": state.step, "epoch": record["epoch"], **metrics}
                _write_jsonl(
                    metrics_path,
                    {
                        "kind": "eval",
                        "step": state.step,
                        "epoch": record["epoch"],
                        "accuracy": metrics["accuracy"],
                        "macro_f1": metrics["macro_f1"],
                        "per_class_f1": {name: metrics["per_class"][name]["f1"] for name in label_names},
                    },
                )
            started = time.perf_counter() - state.train_seconds  # evaluation is not training time

        if fault and rank == fault.rank and state.step == fault.step and not Path(fault.marker).exists():
            Path(fault.marker).write_text(f"worker {rank} exited after step {state.step}\n")
            os._exit(1)

        summary_metrics = {k: record[k] for k in ("step", "loss", "selected_fraction")}
        summary_metrics["pool_fraction"] = record["data_usage"]["pool_fraction"]
        if state.step == plan.total_steps:
            break
        if state.step % training.checkpoint_every == 0:
            report(summary_metrics, with_checkpoint=True)
        elif state.step % training.report_every == 0:
            report(summary_metrics)

    # ---- the end: the student, its metrics and selections, in one final checkpoint
    final_summary = {
        "step": state.step,
        "loss": state.last_loss,
        "pool_fraction": state.data_usage(plan.pool_rows)["pool_fraction"],
    }
    report(final_summary, final=True)


# =========================================================================== 5. the driver


def _prepared_config(
    config: PipelineConfig, strategy: str | None, workers: int | None, max_steps: int | None
) -> PipelineConfig:
    raw = config.model_dump(mode="json")
    if strategy is not None:
        raw["selection"]["strategy"] = strategy
    if workers is not None:
        raw["training"]["workers"] = workers
    if max_steps is not None:
        raw["training"]["max_steps"] = max_steps
    return validate_config(raw, "(train options)")


def ensure_ray(config: PipelineConfig) -> None:
    """Start a local Ray with room for the workers *and* Ray Data's readers, or check the one we have."""
    import ray

    from llkd_ray.runtime import init_ray

    training = config.training
    needed = training.workers * training.cpus_per_worker
    if not ray.is_initialized():
        local = not os.environ.get("RAY_ADDRESS")
        init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(needed) + 1) if local else None)
    if os.environ.get("RAY_ADDRESS"):
        return  # a cluster (maybe autoscaling): its scheduler decides
    total = ray.cluster_resources().get("CPU", 0)
    if total - needed < 0.5:
        raise ConfigError(
            f"Ray has {total:g} CPUs and the trainer takes {training.workers} workers x "
            f"{training.cpus_per_worker:g} CPU, leaving none for Ray Data to read the labels; "
            "lower training.cpus_per_worker or training.workers"
        )


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
    import ray.data

    base = ray.data.read_parquet(pool.files, columns=LABEL_COLUMNS)
    copies = [base.randomize_block_order(seed=seed + p) for p in range(plan.passes)]
    return copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]


def train_student(
    config: PipelineConfig,
    labels: str | Path,
    output: str | Path,
    *,
    strategy: str | None = None,
    workers: int | None = None,
    max_steps: int | None = None,
    eval_data: str | None = CONFIG_GOLD,
    fault_injection: FaultInjection | None = None,
) -> dict[str, Any]:
    """Train a student on the labels in ``labels``; write it and its records to ``output``.

    ``strategy``, ``workers`` and ``max_steps`` override the config. ``eval_data`` is the gold set
    evaluated each epoch: the config's ``data.gold`` by default, another reference, or None.
    Returns the training summary (also written to ``output/training_summary.json``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llkd_ray.models import resolve_model_path

    wall_started = time.perf_counter()
    config = _prepared_config(config, strategy, workers, max_steps)
    training = config.training
    pool = validate_labels_dir(labels, config.task.label_names)
    student_path = resolve_model_path(config.student.model)
    plan = TrainingPlan.build(config, pool.rows)
    output = Path(output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)

    ensure_ray(config)
    gold = _gold_payload(config, eval_data)
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
    state = TrainState(**saved["state"])
    if training.storage_path is None:  # the checkpoints served their purpose
        shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(storage).rmdir()

    wall = time.perf_counter() - wall_started
    summary = {
        "strategy": config.selection.strategy,
        "config_hash": config.section_hash("task", "selection", "student", "training"),
        "labels": str(labels),
        "student": str(output / "student"),
        "student_model": config.student.model,
        "workers": training.workers,
        "batch_size": training.batch_size,
        "candidates_per_step": config.selection.candidates_per_step,
        "steps": state.step,
        "epochs": state.step / plan.steps_per_epoch,
        "pool_rows": pool.rows,
        "data_usage": state.data_usage(pool.rows),
        "final_loss": state.last_loss,
        "final_metrics": state.last_eval,
        "gold": gold["reference"] if gold else None,
        "attempts": state.attempt + 1,
        "resumed_from_steps": state.resumed_from,
        "wall_time_s": round(wall, 3),
        "train_loop_s": round(state.train_seconds, 3),
        "selection_s": round(state.selection_seconds, 3),
        "selection_share": state.selection_seconds / state.train_seconds if state.train_seconds else None,
        "samples_per_s": state.candidates_seen / state.train_seconds if state.train_seconds else None,
        "trained_samples_per_s": state.trained_rows / state.train_seconds if state.train_seconds else None,
    }
    (output / "training_summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
