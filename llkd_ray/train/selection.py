"""The LLKD selection rule and weighted loss, in plain torch (no Ray, no DDP).

This module implements ``docs/method.md`` (the project's copy of the method spec) exactly:

- :class:`Selector` holds the threshold state (global and per-class teacher and student levels),
  identical on every worker because it is updated only from **globally reduced** sums;
- :meth:`Selector.select` packs the local statistics into one tensor, all-reduces it, applies the
  update, computes the thresholds, the mask of the configured strategy and the weights;
- :func:`selection_loss` is the weighted loss with the **global** normaliser, multiplied by the
  world size (DDP averages gradients over workers, so the averaged gradient is the gradient of
  the loss over the global batch).

The all-reduce is injected (``all_reduce``: a callable that sums a tensor over all shards in
place), so the whole rule is testable without Ray or a process group: ``None`` is one shard.

Two points the spec leaves open, decided here:

- **A class seen for the first time** after step 1: until a class appears in a global batch its
  level *is* the global level (the spec's "a class not yet seen takes the global level"); when it
  appears, the ordinary EMA update applies to that level (it is not re-initialised).
- **The candidate pool** (``candidates_per_step`` M > 1): the "at most one batch" cap is applied
  per shard (each worker back-propagates at most its local batch, first selected in stream
  order), which keeps DDP workers balanced. Thresholds and masks before the cap do not depend on
  the sharding; with M = 1 the cap never binds, so the equivalence property holds exactly.
  ``random`` draws its budget (the global number ``llkd`` keeps) over global candidate positions
  with a generator seeded by (seed, step), so its mask too is shard-invariant at M = 1.
- **Gated scoring** (``selection.gated_scoring``, ``docs/method.md``): ``llkd`` keeps a row only
  if the teacher passes it, and the teacher thresholds need no student, so only those rows need
  ``u_i``. :meth:`Selector.teacher_gate` gives that gate before any scoring (the same all-reduced
  update :meth:`Selector.select` then applies). The student levels still need ``u`` over the
  *whole* batch: the rows outside the gate are scored on a uniform sample (:func:`scoring_sample`,
  keyed by row id, seed and step, so shard-invariant), and :meth:`Selector.fill_unscored` gives
  each unscored row the mean ``u`` of the sampled rows of its class over the global batch (a
  post-stratified estimate; inverse-probability weights were tried first and measured biased, see
  docs/method.md). A filled row is outside the teacher gate, so it is never kept.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llkd_ray.config import DEFAULT_MOMENTUM, STRATEGIES

#: Sums a tensor over all shards in place (``torch.distributed.all_reduce`` with SUM).
AllReduce = Callable[[torch.Tensor], Any]

#: Statistics are reduced and thresholds compared in float64 on the CPU, so that the order in
#: which shards add up their sums cannot flip a comparison that 1 worker would make.
_STAT_DTYPE = torch.float64


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``u = H(softmax(logits)) / log K`` in [0, 1], per row (float32 on the CPU, no grad)."""
    log_p = F.log_softmax(logits.detach().float().cpu(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1) / math.log(logits.shape[-1])
    return entropy.clamp_(0.0, 1.0)


def scoring_sample(ids: list[str], rate: float, seed: int, step: int) -> torch.Tensor:
    """A uniform Bernoulli(``rate``) sample of rows, keyed by (seed, step, row id).

    The key makes the draw independent of how the batch is sharded over workers (and of the
    order of rows), so gated scoring keeps the 2-workers = 1-worker equivalence.
    """
    limit = rate * 2**64
    keys = (hashlib.blake2b(f"{seed}:{step}:{i}".encode(), digest_size=8).digest() for i in ids)
    return torch.tensor([int.from_bytes(k, "big") < limit for k in keys], dtype=torch.bool)


def _cap(mask: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Keep at most ``capacity`` of the selected rows, the first ones in order."""
    if capacity is None:
        return mask
    return mask & (mask.cumsum(dim=0) <= capacity)


def _stat(values: torch.Tensor, dtype: torch.dtype = _STAT_DTYPE) -> torch.Tensor:
    return values.detach().to(device="cpu", dtype=dtype)


@dataclass
class Selection:
    """The outcome of one selection step on one shard (masks and weights are local, the rest global)."""

    mask: torch.Tensor
    """Local rows to train on (bool)."""
    weights: torch.Tensor
    """Local loss weights ``w_i`` (0 where not selected; mean 1 over the global selected set)."""
    normaliser: float
    """``max(1, sum_B m)`` over the global batch."""
    teacher_thresholds: torch.Tensor
    """``tauT[k]`` (K, float64)."""
    student_thresholds: torch.Tensor
    """``tauS[k]`` (K, float64)."""
    candidates: int
    """Rows in the global batch (candidates)."""
    selected: int
    """``sum_B m``: selected rows in the global batch."""
    confidence_selected: float
    """Mean teacher confidence of the selected rows (NaN when none)."""
    confidence_rejected: float
    """Mean teacher confidence of the rows not selected (NaN when none)."""

    @property
    def selected_fraction(self) -> float:
        return self.selected / self.candidates if self.candidates else 0.0


class Selector:
    """Adaptive thresholds and the mask/weights of one strategy, identical on every shard.

    ``rank``/``world_size`` only place this shard's rows in the global batch (for ``random``);
    ``all_reduce`` sums over shards (``None``: a single shard).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        strategy: str = "llkd",
        momentum: float = DEFAULT_MOMENTUM,
        weighting: str = "confidence_uncertainty",
        seed: int = 0,
        all_reduce: AllReduce | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        if num_classes < 2:
            raise ValueError("selection needs at least 2 classes")
        self.num_classes = num_classes
        self.strategy = strategy
        self.momentum = momentum
        self.weighting = weighting
        self.seed = seed
        self.all_reduce = all_reduce
        self.rank = rank
        self.world_size = world_size
        # State: levels T, T[k], S, S[k]; which classes were seen; steps taken.
        self.teacher_level = torch.tensor(0.0, dtype=_STAT_DTYPE)
        self.student_level = torch.tensor(0.0, dtype=_STAT_DTYPE)
        self.teacher_class = torch.zeros(num_classes, dtype=_STAT_DTYPE)
        self.student_class = torch.zeros(num_classes, dtype=_STAT_DTYPE)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)
        self.steps = 0
        self.annealing = False
        """The end phase (``selection.anneal_fraction``): ``llkd`` keeps what the teacher passes, weight 1."""

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher_level": self.teacher_level.clone(),
            "student_level": self.student_level.clone(),
            "teacher_class": self.teacher_class.clone(),
            "student_class": self.student_class.clone(),
            "seen": self.seen.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher_level = torch.as_tensor(state["teacher_level"], dtype=_STAT_DTYPE).clone()
        self.student_level = torch.as_tensor(state["student_level"], dtype=_STAT_DTYPE).clone()
        self.teacher_class = torch.as_tensor(state["teacher_class"], dtype=_STAT_DTYPE).clone()
        self.student_class = torch.as_tensor(state["student_class"], dtype=_STAT_DTYPE).clone()
        self.seen = torch.as_tensor(state["seen"], dtype=torch.bool).clone()
        self.steps = int(state["steps"])

    # ------------------------------------------------------------------ statistics

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """SUM over shards, in place."""
        if self.all_reduce is not None and self.world_size > 1:
            self.all_reduce(stats)
        return stats

    def pack_local_stats(
        self,
        confidence: torch.Tensor,
        labels: torch.Tensor,
        uncertainty: torch.Tensor,
    ) -> torch.Tensor:
        """``[sum c, sum u, n, sum c per class (K), sum u per class (K), n per class (K), n per rank (W), scored]``.

        The rank segment (this shard's row count at its rank) gives every shard the offsets of all
        shards in the global batch after the SUM all-reduce. ``u`` sums skip unscored rows (NaN:
        ``teacher_confidence`` scores nothing); ``scored`` counts the others.
        """
        k = self.num_classes
        scored = ~torch.isnan(uncertainty)
        weighted_u = torch.nan_to_num(uncertainty, nan=0.0)
        stats = torch.zeros(4 + 3 * k + self.world_size, dtype=_STAT_DTYPE)
        stats[0], stats[1], stats[2] = confidence.sum(), weighted_u.sum(), len(confidence)
        stats[3 : 3 + k] = torch.bincount(labels, weights=confidence, minlength=k)[:k]
        stats[3 + k : 3 + 2 * k] = torch.bincount(labels, weights=weighted_u, minlength=k)[:k]
        stats[3 + 2 * k : 3 + 3 * k] = torch.bincount(labels, minlength=k)[:k]
        stats[3 + 3 * k + self.rank] = len(confidence)
        stats[-1] = scored.sum()
        return stats

    def _teacher_stats(self, confidence: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The statistics with no ``u`` at all (every row unscored)."""
        return self.pack_local_stats(confidence, labels, torch.full_like(confidence, math.nan))

    def _advanced(
        self,
        level: torch.Tensor,
        per_class: torch.Tensor,
        sums: torch.Tensor,
        class_sums: torch.Tensor,
        stats: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One signal's levels after this batch (the spec's EMA; nothing is stored)."""
        k = self.num_classes
        n, class_n = stats[2], stats[3 + 2 * k : 3 + 3 * k]
        present = class_n > 0
        mean = sums / n
        class_mean = torch.where(present, class_sums / class_n.clamp(min=1), 0.0)
        if self.steps == 0:
            # First step: every level is that step's batch statistic; absent classes take the global level.
            return mean, torch.where(present, class_mean, mean)
        lam = self.momentum
        # A class not seen before sits at the global level; the EMA starts from there.
        old = torch.where(self.seen, per_class, level)
        new_level = lam * level + (1 - lam) * mean
        absent = torch.where(self.seen, old, new_level)
        return new_level, torch.where(present, lam * old + (1 - lam) * class_mean, absent)

    def _advanced_teacher(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.num_classes
        return self._advanced(self.teacher_level, self.teacher_class, stats[0], stats[3 : 3 + k], stats)

    def update(self, stats: torch.Tensor) -> None:
        """Apply the EMA update from globally reduced statistics (the output of ``pack_local_stats``).

        The student levels move only when some row of the batch was scored (``teacher_confidence``
        scores nothing: its student levels are never used).
        """
        k = self.num_classes
        if stats[2] <= 0:
            return
        self.teacher_level, self.teacher_class = self._advanced_teacher(stats)
        if stats[-1] > 0:
            self.student_level, self.student_class = self._advanced(
                self.student_level, self.student_class, stats[1], stats[3 + k : 3 + 2 * k], stats
            )
        self.seen = self.seen | (stats[3 + 2 * k : 3 + 3 * k] > 0)
        self.steps += 1

    @staticmethod
    def _scaled(level: torch.Tensor, per_class: torch.Tensor) -> torch.Tensor:
        top = per_class.max()
        return level * per_class / top if top > 0 else torch.zeros_like(per_class)

    def teacher_gate(self, confidence: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``c_i >= tauT[y_i]`` with the thresholds :meth:`select` will use for this batch.

        Computed before the student scores anything (one extra all-reduce of the teacher's sums);
        nothing is stored: :meth:`select` applies the same update.
        """
        c, y = _stat(confidence), _stat(labels, torch.int64)
        stats = self._reduce(self._teacher_stats(c, y))
        if stats[2] <= 0:
            return torch.zeros(len(c), dtype=torch.bool)
        tau_t = self._scaled(*self._advanced_teacher(stats))
        return c >= tau_t[y]

    def fill_unscored(self, uncertainty: torch.Tensor, labels: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        """``u`` with every unscored row (NaN) set to the mean ``u`` of the ``sampled`` rows of its class.

        The means are over the global batch (one small all-reduce), so every sharding fills the
        same values; a class with no sampled row takes the mean of all sampled rows, and a batch
        with none the mean of the scored rows. This is the student levels' estimate of the rows
        outside the teacher gate: it keeps their batch means within sampling noise of the full
        rule without the upward bias noisy per-class sums give ``max_j S[j]``.
        """
        k = self.num_classes
        u, y, s = _stat(uncertainty), _stat(labels, torch.int64), sampled.cpu()
        scored = ~torch.isnan(u)
        stats = torch.zeros(2 * k + 2, dtype=_STAT_DTYPE)
        stats[:k] = torch.bincount(y[s], weights=u[s], minlength=k)[:k]
        stats[k : 2 * k] = torch.bincount(y[s], minlength=k)[:k]
        stats[2 * k], stats[2 * k + 1] = u[scored].sum(), scored.sum()
        stats = self._reduce(stats)
        class_sum, class_n = stats[:k], stats[k : 2 * k]
        if class_n.sum() > 0:
            pooled = class_sum.sum() / class_n.sum()
        else:
            pooled = stats[2 * k] / stats[2 * k + 1] if stats[2 * k + 1] > 0 else torch.tensor(0.0, dtype=_STAT_DTYPE)
        fill = torch.where(class_n > 0, class_sum / class_n.clamp(min=1), pooled)
        return torch.where(scored, u, fill[y]).to(uncertainty.dtype)

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``tauT[k] = T * T[k] / max_j T[j]`` and ``tauS[k] = S * S[k] / max_j S[j]`` (float64)."""
        return self._scaled(self.teacher_level, self.teacher_class), self._scaled(
            self.student_level, self.student_class
        )

    # ------------------------------------------------------------------ selection

    def _random_mask(self, budget: int, offset: int, local: int, total: int) -> torch.Tensor:
        """``budget`` rows drawn uniformly from the global batch; this shard's slice of that draw.

        Every shard draws the same keys (a generator seeded by seed and step) for all ``total``
        global positions, so the draw does not depend on how the batch is sharded.
        """
        if budget <= 0 or total <= 0:
            return torch.zeros(local, dtype=torch.bool)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps)
        keys = torch.rand(total, generator=generator, dtype=_STAT_DTYPE)
        cutoff = keys.kthvalue(min(budget, total)).values
        return keys[offset : offset + local] <= cutoff

    def select(
        self,
        confidence: torch.Tensor,
        labels: torch.Tensor,
        uncertainty: torch.Tensor,
        *,
        capacity: int | None = None,
    ) -> Selection:
        """One step: update the thresholds from the global batch, then mask and weight the local rows.

        ``confidence`` (c_i), ``labels`` (pseudo-label index y_i) and ``uncertainty`` (u_i) are this
        shard's rows; ``capacity`` caps how many local rows may be kept (the M > 1 candidate pool).
        ``u_i`` is NaN where the row was not scored (``teacher_confidence``): such rows never pass
        the student bar, and a batch with no scored row leaves the student levels where they are.
        """
        device = confidence.device
        c = _stat(confidence)
        y = _stat(labels, torch.int64)
        u = _stat(uncertainty)

        stats = self._reduce(self.pack_local_stats(c, y, u))
        self.update(stats)
        total = round(float(stats[2]))
        offset = round(float(stats[3 + 3 * self.num_classes : -1][: self.rank].sum()))

        tau_t, tau_s = self.thresholds()
        teacher_ok = c >= tau_t[y]
        student_ok = u >= tau_s[y]  # False where u is NaN (not scored)
        strategy = "teacher_confidence" if self.annealing and self.strategy == "llkd" else self.strategy
        if strategy == "llkd":
            mask = _cap(teacher_ok & student_ok, capacity)
        elif strategy == "all":
            mask = _cap(torch.ones_like(teacher_ok), capacity)
        elif strategy == "teacher_confidence":
            mask = _cap(teacher_ok, capacity)
        elif strategy == "student_uncertainty":
            mask = _cap(student_ok, capacity)
        else:  # random: as many as llkd keeps over the global batch, drawn uniformly
            llkd_kept = _cap(teacher_ok & student_ok, capacity).sum().to(_STAT_DTYPE).reshape(1)
            budget = round(float(self._reduce(llkd_kept)[0]))
            mask = _cap(self._random_mask(budget, offset, len(c), total), capacity)

        m = mask.to(_STAT_DTYPE)
        use_cu = strategy == "llkd" and self.weighting == "confidence_uncertainty"
        raw = c * torch.nan_to_num(u, nan=0.0) if use_cu else torch.ones_like(c)
        sums = self._reduce(torch.stack([m.sum(), (m * raw).sum(), (m * c).sum(), ((1 - m) * c).sum()]))
        selected, selected_raw, c_selected, c_rejected = sums.tolist()
        n_selected = round(selected)
        # w_i = m_i c_i u_i / mean over the selected of c u (or m_i alone)
        weights = m * raw * (selected / selected_raw) if use_cu and selected_raw > 0 else m
        rejected = total - n_selected
        return Selection(
            mask=mask.to(device),
            weights=weights.to(device=device, dtype=torch.float32),
            normaliser=max(1.0, selected),
            teacher_thresholds=tau_t,
            student_thresholds=tau_s,
            candidates=total,
            selected=n_selected,
            confidence_selected=c_selected / n_selected if n_selected else math.nan,
            confidence_rejected=c_rejected / rejected if rejected else math.nan,
        )


def selection_loss(
    logits: torch.Tensor,
    weights: torch.Tensor,
    normaliser: float,
    *,
    labels: torch.Tensor | None = None,
    teacher_probs: torch.Tensor | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """``world_size * sum_i w_i * CE_i / normaliser`` over this shard's rows.

    ``CE`` is cross-entropy to the hard pseudo-label (``labels``) or, when ``teacher_probs`` is
    given, to the teacher's full distribution (``loss: soft``). With DDP averaging gradients over
    ``world_size`` workers, the result is the gradient of the spec's ``L`` over the global batch.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    if teacher_probs is not None:
        per_row = -(teacher_probs.to(log_p.dtype) * log_p).sum(dim=-1)
    else:
        if labels is None:
            raise ValueError("selection_loss needs labels (hard loss) or teacher_probs (soft loss)")
        per_row = F.nll_loss(log_p, labels.to(torch.int64), reduction="none")
    return (weights.to(per_row.dtype) * per_row).sum() * (world_size / normaliser)
