"""The training plan: the sizes and budgets every worker agrees on, computed once on the driver.

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

import math
from dataclasses import dataclass
from typing import Literal

from llkd_ray.config import PipelineConfig

#: Copies of the pool the candidate dataset is made of (each in its own block order); a run that
#: draws more starts the stream over with a new shuffle.
MAX_POOL_COPIES = 8


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
    """Copies of the pool the candidate stream is made of (enough for the run, up to ``MAX_POOL_COPIES``)."""
    cycles: bool = False
    """The run may draw more rows than the copies hold: its stream then starts over."""
    anneal: float = 0.0
    """``selection.anneal_fraction`` for ``llkd`` (0 for every other strategy)."""
    score_ttl: float = 0.0
    """Score reuse (``selection.score_ttl``) in selector steps (draws): a pass over the pool is
    ``pool_rows / global candidates per draw`` of them; 0 when the strategy scores nothing."""

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
        wanted = math.ceil(total * training.batch_size * m / pool_rows) + 1
        passes = min(wanted, MAX_POOL_COPIES)
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
            cycles=wanted > passes,
            anneal=selection.anneal_fraction if selection.strategy == "llkd" else 0.0,
            score_ttl=selection.score_ttl * pool_rows / (training.batch_size * (1 if selection.fill_batch else m))
            if scored
            else 0.0,
        )
