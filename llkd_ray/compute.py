"""What training costs, in FLOPs, and the compute budget every strategy is held to.

The paper promises a better student for *less computation*; comparing strategies at equal steps
hides what candidate scoring costs. So the trainer counts what it runs, in plain torch:

- **the rule** — a forward pass costs ``2·N`` FLOPs per token and a forward+backward ``6·N``,
  with N the student's non-embedding parameters (Kaplan et al., 2020). Tokens are the real
  tokens of each text after truncation (the attention mask's sum): padding is an artefact of
  batching, not of the method. Attention's own term (``2·layers·context·width`` per token) is
  left out: at the student's lengths (≤ 128) it is a few percent of ``2·N``;
- **the kinds** — inference-mode forwards over candidates (*scoring*: LLKD's information need)
  and training forward+backward passes (*training*), counted apart, with wall time split into
  scoring, training (forward, backward, optimizer step) and selection;
- **the budget** — ``training.budget`` is in units of "one pass of ``all`` over the pool", i.e.
  ``6·N·(the pool's tokens)`` FLOPs. A run stops at the first step whose spent compute, scoring
  included, reaches it, so two strategies given the same budget stop within one step of each
  other; the learning-rate schedule follows the fraction spent (:class:`ProgressSchedule`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

#: FLOPs per token and non-embedding parameter.
FORWARD_FLOPS_PER_TOKEN_PARAM = 2
TRAINING_FLOPS_PER_TOKEN_PARAM = 6


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """The student's parameters less its embedding tables (the N of the FLOPs rule)."""
    embedding = {
        id(p) for module in model.modules() if isinstance(module, torch.nn.Embedding) for p in module.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding)


def all_pass_flops(parameters: int, pool_tokens: int) -> float:
    """One budget unit: the FLOPs of ``all`` training once on every token of the pool."""
    return float(TRAINING_FLOPS_PER_TOKEN_PARAM * parameters * pool_tokens)


@dataclass
class StepCompute:
    """One worker's (or, summed, all workers') work in one optimizer step."""

    scoring_tokens: int = 0
    training_tokens: int = 0
    scored_samples: int = 0
    trained_samples: int = 0
    scoring_s: float = 0.0
    training_s: float = 0.0
    selection_s: float = 0.0

    @staticmethod
    def total(shares: list[StepCompute]) -> StepCompute:
        """Tokens and samples summed over workers; seconds are rank 0's (workers run in parallel)."""
        head = shares[0]
        return StepCompute(
            scoring_tokens=sum(s.scoring_tokens for s in shares),
            training_tokens=sum(s.training_tokens for s in shares),
            scored_samples=sum(s.scored_samples for s in shares),
            trained_samples=sum(s.trained_samples for s in shares),
            scoring_s=head.scoring_s,
            training_s=head.training_s,
            selection_s=head.selection_s,
        )


@dataclass
class ComputeMeter(StepCompute):
    """Cumulative tokens, FLOPs and seconds of one run (global: summed over workers)."""

    parameters: int = 0
    """N: the student's non-embedding parameters."""

    @property
    def scoring_flops(self) -> float:
        return float(FORWARD_FLOPS_PER_TOKEN_PARAM * self.parameters * self.scoring_tokens)

    @property
    def training_flops(self) -> float:
        return float(TRAINING_FLOPS_PER_TOKEN_PARAM * self.parameters * self.training_tokens)

    @property
    def flops(self) -> float:
        return self.scoring_flops + self.training_flops

    def add(self, step: StepCompute) -> None:
        for name in (f.name for f in fields(StepCompute)):
            setattr(self, name, getattr(self, name) + getattr(step, name))

    def record(self, unit_flops: float | None = None) -> dict[str, float | int | None]:
        """The numbers written to ``metrics.jsonl`` and ``training_summary.json``."""
        out: dict[str, float | int | None] = asdict(self)
        out |= {"scoring_flops": self.scoring_flops, "training_flops": self.training_flops, "flops": self.flops}
        out["all_passes"] = self.flops / unit_flops if unit_flops else None
        return out


class ProgressSchedule:
    """Linear warm-up then linear decay to 0, over the *fraction of the run done*.

    The fraction is steps done / step budget, or FLOPs spent / compute budget: one schedule for
    both, so a compute-budgeted run decays its learning rate as its compute runs out, whatever
    its strategy spends per step. A ``torch.optim.lr_scheduler.LambdaLR`` lambda; being an object
    (not a function), its ``progress`` is saved and restored with the scheduler's state.
    """

    def __init__(self, warmup: float) -> None:
        self.warmup = warmup
        self.progress = 0.0

    def __call__(self, _step: int) -> float:
        p = min(max(self.progress, 0.0), 1.0)
        if p < self.warmup:
            return p / self.warmup
        return max(0.0, (1.0 - p) / max(1e-12, 1.0 - self.warmup))
