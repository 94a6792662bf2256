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
from typing import Any

import torch

#: FLOPs per token and non-embedding parameter.
FORWARD_FLOPS_PER_TOKEN_PARAM = 2
TRAINING_FLOPS_PER_TOKEN_PARAM = 6


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """A model's parameters less its embedding tables and vocabulary projection (the N of the FLOPs rule).

    Works on a model built on the ``meta`` device (no weights loaded): only shapes are read.
    """
    embedding = {
        id(p) for module in model.modules() if isinstance(module, torch.nn.Embedding) for p in module.parameters()
    }
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(output, torch.nn.Module):
        embedding |= {id(p) for p in output.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding)


def forward_flops(parameters: int, tokens: int) -> float:
    """FLOPs of inference-mode forwards over ``tokens`` real tokens (the teacher's labeling, the scoring)."""
    return float(FORWARD_FLOPS_PER_TOKEN_PARAM * parameters * tokens)


def all_pass_flops(parameters: int, pool_tokens: int) -> float:
    """One budget unit: the FLOPs of ``all`` training once on every token of the pool."""
    return float(TRAINING_FLOPS_PER_TOKEN_PARAM * parameters * pool_tokens)


#: The seconds a run's compute meter keeps, by kind (rank 0's, whose workers run in parallel): what a
#: user pays for the FLOPs, which depend on the machine and its load where FLOPs do not.
COMPUTE_SECONDS = ("scoring_s", "training_s", "selection_s")


def compute_seconds(record: dict[str, Any]) -> float | None:
    """Scoring, training and selection seconds of a record (a curve point, a summary) added up;
    None for a record written before they were kept."""
    if any(record.get(kind) is None for kind in COMPUTE_SECONDS):
        return None
    return float(sum(record[kind] for kind in COMPUTE_SECONDS))


@dataclass
class StepCompute:
    """One worker's (or, summed, all workers') work in one optimizer step."""

    scoring_tokens: int = 0
    training_tokens: int = 0
    scored_samples: int = 0
    trained_samples: int = 0
    reused_samples: int = 0
    """Candidates whose kept score was reused instead of scored (0 FLOPs; ``selection.score_ttl``)."""
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
            reused_samples=sum(s.reused_samples for s in shares),
            scoring_s=head.scoring_s,
            training_s=head.training_s,
            selection_s=head.selection_s,
        )


@dataclass
class ComputeMeter(StepCompute):
    """Cumulative tokens, FLOPs and seconds of one run (global: summed over workers)."""

    parameters: int = 0
    """N: the student's non-embedding parameters."""
    probe_tokens: int = 0
    """Tokens predicted by ``training.stop: auto``'s churn probe (inference mode, 2·N each)."""

    @property
    def scoring_flops(self) -> float:
        return forward_flops(self.parameters, self.scoring_tokens)

    @property
    def training_flops(self) -> float:
        return float(TRAINING_FLOPS_PER_TOKEN_PARAM * self.parameters * self.training_tokens)

    @property
    def probe_flops(self) -> float:
        return float(FORWARD_FLOPS_PER_TOKEN_PARAM * self.parameters * self.probe_tokens)

    @property
    def flops(self) -> float:
        return self.scoring_flops + self.training_flops + self.probe_flops

    def add(self, step: StepCompute) -> None:
        for name in (f.name for f in fields(StepCompute)):
            setattr(self, name, getattr(self, name) + getattr(step, name))

    def record(self, unit_flops: float | None = None) -> dict[str, float | int | None]:
        """The numbers written to ``metrics.jsonl`` and ``training_summary.json``."""
        out: dict[str, float | int | None] = asdict(self)
        out |= {"scoring_flops": self.scoring_flops, "training_flops": self.training_flops, "flops": self.flops}
        out["probe_flops"] = self.probe_flops
        out["all_passes"] = self.flops / unit_flops if unit_flops else None
        return out


def format_flops(flops: float) -> str:
    """``1.23 PFLOP``-style, for summary lines."""
    for scale, unit in ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.3g} FLOP"


#: The stages of a run whose compute is counted, in order, with the name shown for each.
COMPUTE_STAGES = {
    "teacher_labeling": "teacher labeling",
    "student_scoring": "student scoring",
    "student_training": "student training",
}


def compute_by_stage(label_manifest: dict[str, Any], training_summary: dict[str, Any]) -> dict[str, Any]:
    """FLOPs per stage of a run and each stage's share of their total (``eval.json``'s ``compute``).

    From the label directory's manifest (``teacher_compute``) and ``training_summary.json``
    (``compute``). A stage whose record is missing (a run written before it was counted) is None,
    and then no shares are given: a share of an unknown total would mislead.
    """
    teacher = label_manifest.get("teacher_compute") or {}
    student = training_summary.get("compute") or {}
    flops = {
        "teacher_labeling": teacher.get("flops"),
        "student_scoring": student.get("scoring_flops"),
        "student_training": student.get("training_flops"),
    }
    known = all(isinstance(v, int | float) for v in flops.values())
    total = float(sum(flops.values())) if known else None
    return {
        "flops": flops,
        "total_flops": total,
        "shares": {k: v / total for k, v in flops.items()} if total else None,
        "teacher_parameters": teacher.get("parameters"),
        "teacher_tokens": teacher.get("tokens"),
        "student_parameters": student.get("parameters"),
        "rule": "2·N FLOPs per token forward, 6·N forward+backward (llkd_ray/compute.py)",
    }


def compute_rows(section: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(stage, FLOPs, share) per stage for summary lines and the report; ``not recorded`` where unknown."""
    section = section or {}
    flops = section.get("flops") or {}
    shares = section.get("shares") or {}
    rows = []
    for key, name in COMPUTE_STAGES.items():
        value = flops.get(key)
        share = shares.get(key)
        rows.append(
            (
                name,
                format_flops(value) if isinstance(value, int | float) else "not recorded",
                f"{share:.1%}" if isinstance(share, int | float) else "n/a",
            )
        )
    return rows


class ProgressSchedule:
    """Linear warm-up then linear decay to 0, over the *fraction of the run done*.

    The fraction is steps done / step budget, or FLOPs spent / compute budget: one schedule for
    both, so a compute-budgeted run decays its learning rate as its compute runs out, whatever
    its strategy spends per step. A ``torch.optim.lr_scheduler.LambdaLR`` lambda; being an object
    (not a function), its ``progress`` is saved and restored with the scheduler's state.

    A stop called early (``training.stop: auto``; :meth:`stop`) ends the schedule there: from its
    value at the stop, the factor decays linearly to 0 at ``end``.
    """

    def __init__(self, warmup: float) -> None:
        self.warmup = warmup
        self.progress = 0.0
        self.stop_at: float | None = None
        self.end = 1.0

    def stop(self, at: float, end: float) -> None:
        """Decay from the factor at ``at`` to 0 at ``end`` (the run ends there)."""
        self.stop_at, self.end = at, max(end, at)

    def factor(self, progress: float) -> float:
        """The budgeted schedule: linear warm-up, then linear decay to 0 at the end of the budget."""
        p = min(max(progress, 0.0), 1.0)
        if p < self.warmup:
            return p / self.warmup
        return max(0.0, (1.0 - p) / max(1e-12, 1.0 - self.warmup))

    def __call__(self, _step: int) -> float:
        if self.stop_at is None:
            return self.factor(self.progress)
        span = self.end - self.stop_at
        left = (self.end - self.progress) / span if span > 0 else 0.0
        return self.factor(self.stop_at) * min(1.0, max(0.0, left))
