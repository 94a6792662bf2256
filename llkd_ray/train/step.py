"""One training step on one worker, in plain torch: score, select, weight, back-propagate.

``train_step`` is a step over one draw of candidates: the information need ``u_i`` in inference
mode (``score_candidates``, only the rows the strategy's :data:`~llkd_ray.train.plan.Scoring` needs),
the selection (:mod:`llkd_ray.train.selection`, all-reduced across shards), the weighted loss and
the backward pass on the kept rows (``backward_weighted``). ``fill_step`` is adaptive M: draws until
the kept rows fill a batch. Neither takes the optimizer step. What stays the same over a run — the
tokenizer, the precision, the selector, the accumulation, the sample rate, the score store — lives
on :class:`StepContext`; what a step changes is an argument (``capacity``, and ``scoring``, which
the recipe turns to ``none`` while annealing). The Ray Train workers run exactly these functions,
and so does the equivalence test, in a 2-process gloo group: this module imports no Ray.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch

from llkd_ray.compute import StepCompute
from llkd_ray.student.predictor import inference
from llkd_ray.train.data import Batch, pad_token_ids
from llkd_ray.train.plan import Scoring
from llkd_ray.train.scores import ScoreStore
from llkd_ray.train.selection import Selection, Selector, normalized_entropy, scoring_sample, selection_loss


@dataclass
class StepContext:
    """What a step needs besides the model and the rows: one per run, the same on every step.

    The selector and the score store are the run's state, updated in place by each step; the
    recipe's checkpoint saves and restores those same objects.
    """

    tokenizer: Any
    max_length: int
    device: torch.device
    world_size: int = 1
    soft_loss: bool = False
    autocast_dtype: torch.dtype | None = None
    scaler: Any = None
    """A ``torch.amp.GradScaler`` for fp16, else None."""
    pad_to_max_length: bool = False
    """Pad every batch to ``max_length`` (a compiled student: one shape, no recompilation)."""
    _: KW_ONLY
    selector: Selector
    """The threshold state (identical on every worker: updated only from all-reduced sums)."""
    micro_batches: int = 1
    """Gradient accumulation: the kept rows go through forward and backward in this many chunks."""
    sample_rate: float = 1.0
    """``gated`` scoring: the share of the rows outside the teacher gate that is scored."""
    scores: ScoreStore | None = None
    """Score reuse (``selection.score_ttl``); None: every row to score is scored afresh."""

    def encode(self, rows: Batch) -> dict[str, torch.Tensor]:
        """The rows' token ids (as they arrived, or tokenised now), padded and on the device.

        On CUDA the padded tensors go through pinned memory and are copied without blocking.
        """
        ids = rows.token_ids(self.tokenizer, self.max_length)
        encoded = pad_token_ids(ids, self.tokenizer, self.max_length if self.pad_to_max_length else None)
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in encoded.items()}
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


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the model itself when unwrapped)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _tokens(encoded: dict[str, torch.Tensor]) -> int:
    """Real tokens of a tokenised batch (padding excluded): what the FLOPs rule counts."""
    mask = encoded.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(encoded["input_ids"].numel())


def score_candidates(model: torch.nn.Module, batch: Batch, ctx: StepContext, chunk: int) -> tuple[torch.Tensor, int]:
    """The student's information need ``u_i`` for every candidate, and the tokens scored.

    Inference mode: no dropout, no graph (about a third of a training pass's FLOPs per token).
    The rows keep their order (chunks of ``chunk`` rows, padded per chunk, as the FLOPs rule and the
    equivalence over workers assume), so this is not :class:`~llkd_ray.student.predictor.Predictor`'s
    length-sorted batching; the eval-mode/inference-mode switch is the same.
    """
    needs, tokens = [], 0
    batch.token_ids(ctx.tokenizer, ctx.max_length)  # a Batch from texts: tokenised once, its chunks share it
    with inference(unwrap_model(model)) as module, ctx.autocast():
        for start in range(0, len(batch), chunk):
            rows = batch if chunk >= len(batch) else batch.take(torch.arange(start, min(start + chunk, len(batch))))
            encoded = ctx.encode(rows)
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
) -> tuple[float, int, torch.Tensor]:
    """Forward and backward ``rows`` with the spec's weighted loss, in ``ctx.micro_batches``.

    Gradients accumulate over the micro-batches; under DDP only the last one all-reduces them.
    Each micro-batch's loss already carries the step's global normaliser, so their sum is the
    step's loss. Returns this worker's loss term, the tokens trained and the logits (detached).
    """
    loss_total, tokens, logits_out = 0.0, 0, []
    chunks = _micro_batches(len(rows), ctx.micro_batches)
    for number, index in enumerate(chunks):
        part = rows.take(index) if len(chunks) > 1 else rows
        last = number == len(chunks) - 1
        sync = model.no_sync() if not last and isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        with sync or contextlib.nullcontext():
            encoded = ctx.encode(part)
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
    ctx: StepContext,
    *,
    capacity: int | None = None,
    scoring: Scoring = "full",
) -> StepResult:
    """Select, weight and back-propagate one optimizer step's rows on this worker (no optimizer step).

    Selecting strategies (``scoring`` other than ``train``): the candidates are scored in inference
    mode as ``scoring`` says, ``ctx.selector`` chooses among all of them at once — one selection per
    optimizer step, whatever the gradient accumulation — and only the kept rows (at most
    ``capacity``) go through forward and backward, in ``ctx.micro_batches``. ``train`` (``all``): every
    row trains, weight 1, and the information need for the thresholds' record comes from the
    training forward pass itself.
    """
    model.train()
    compute = StepCompute()
    candidates.token_ids(ctx.tokenizer, ctx.max_length)  # scoring and training share the rows' tokens
    if scoring != "train":
        selection, rows, weights = _score_and_select(model, candidates, ctx, capacity, compute, scoring=scoring)
        kept = len(rows)
        if not kept:
            # Nothing kept here: one row with weight 0 keeps this worker in DDP's gradient all-reduce.
            rows, weights = candidates.take(torch.tensor([0])), torch.zeros(1)
        clock = time.perf_counter()
        loss, compute.training_tokens, logits = backward_weighted(model, rows, weights, selection.normaliser, ctx)
        compute.training_s = time.perf_counter() - clock
        compute.trained_samples = kept
        _keep_training_scores(ctx, rows, logits, kept)
    else:
        clock = time.perf_counter()
        weights = torch.ones(len(candidates))
        normaliser = max(1.0, float(len(candidates) * ctx.world_size))  # equal shards: the global batch
        loss, compute.training_tokens, logits = backward_weighted(model, candidates, weights, normaliser, ctx)
        compute.training_s = time.perf_counter() - clock
        compute.trained_samples = len(candidates)
        clock = time.perf_counter()
        selection = ctx.selector.select(candidates.confidence, candidates.labels, normalized_entropy(logits))
        compute.selection_s = time.perf_counter() - clock
    mask = selection.mask.cpu().tolist()
    return StepResult(
        selection=selection,
        loss=loss,
        selected_ids=[i for i, keep in zip(candidates.ids, mask, strict=True) if keep],
        compute=compute,
    )


def _keep_training_scores(ctx: StepContext, rows: Batch, logits: torch.Tensor, kept: int) -> None:
    """The kept rows' ``u_i`` from their training forward (logits it computed anyway), for reuse."""
    scores = ctx.scores
    if scores is not None and scores.enabled and kept:
        scores.record(rows.ids, normalized_entropy(logits.float()).cpu(), ctx.selector.steps)


def _score_and_select(
    model: torch.nn.Module,
    candidates: Batch,
    ctx: StepContext,
    capacity: int | None,
    compute: StepCompute,
    *,
    scoring: Scoring = "full",
) -> tuple[Selection, Batch, torch.Tensor]:
    """Score the candidates in inference mode as ``scoring`` says and select; the kept rows and weights.

    Unscored rows carry ``u = NaN``; with ``gated`` scoring, the rows outside the teacher gate
    that the sample left out get their class's mean over the sampled ones (``fill_unscored``).
    Rows with a fresh kept score in ``ctx.scores`` (:mod:`llkd_ray.train.scores`) reuse it unscored.
    """
    selector, scores = ctx.selector, ctx.scores
    clock = time.perf_counter()
    uncertainty = torch.full((len(candidates),), math.nan)
    sampled = None
    if scoring == "full":
        to_score = torch.ones(len(candidates), dtype=torch.bool)
    elif scoring == "gated":
        gate = selector.teacher_gate(candidates.confidence, candidates.labels)
        sampled = ~gate & scoring_sample(candidates.ids, ctx.sample_rate, selector.seed, selector.steps)
        to_score = gate | sampled
    else:
        to_score = torch.zeros(len(candidates), dtype=torch.bool)
    index = to_score.nonzero().squeeze(1)
    if scores is not None and scores.enabled and len(index):
        kept = scores.lookup([candidates.ids[i] for i in index.tolist()], selector.steps)
        fresh = ~torch.isnan(kept)
        uncertainty[index[fresh]] = kept[fresh]
        compute.reused_samples += int(fresh.sum())
        index = index[~fresh]
    if len(index):
        scored = candidates.take(index) if len(index) < len(candidates) else candidates
        needs, tokens = score_candidates(model, scored, ctx, chunk=max(capacity or 0, 32))
        uncertainty[index] = needs
        if scores is not None:
            scores.record(scored.ids, needs, selector.steps)
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
    ctx: StepContext,
    *,
    capacity: int,
    target: int,
    max_draws: int,
    scoring: Scoring = "full",
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
        candidates.token_ids(ctx.tokenizer, ctx.max_length)
        selection, rows, weights = _score_and_select(model, candidates, ctx, capacity - kept, compute, scoring=scoring)
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
    loss, compute.training_tokens, logits = backward_weighted(model, rows, weights, selection.normaliser, ctx)
    compute.training_s = time.perf_counter() - clock
    compute.trained_samples = kept
    _keep_training_scores(ctx, rows, logits, kept)
    mask = selection.mask.cpu().tolist()
    return StepResult(
        selection=selection,
        loss=loss,
        selected_ids=[i for i, keep in zip(ids, mask, strict=True) if keep],
        compute=compute,
    )
