"""What one benchmark run is: its variants (strategy and M), its settings, its pipeline config.

:class:`BenchSettings` is recorded in ``results.json`` and decides whether an earlier run can be
reused; :func:`base_config` turns the settings and the data into the pipeline config every run
starts from, :func:`run_config` sets one variant and seed on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from llkd_ray.config import (
    DEFAULT_MOMENTUM,
    MINILM,
    STRATEGIES,
    Choose,
    PipelineConfig,
    _apply_override,
    validate_config,
)
from llkd_ray.errors import ConfigError
from llkd_ray.pipeline.choice import HEAD_RULES, scoring_passes
from llkd_ray.pipeline.rounds import slice_sizes
from llkd_ray.quality.data import BenchData

# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One trained configuration: a selection strategy and, for ``llkd``, its candidate factor M
    (with ``fill``: adaptive M, draws of one batch until the kept rows fill one, at most M)."""

    strategy: str
    candidates_per_step: int = 1
    fill: bool = False
    labeled: float = 1.0
    """The labeling axis: the fraction B of the pool the teacher labels (1: all of it, as always)."""
    rounds: int = 1
    """With ``labeled`` < 1: 1 = a random subset of B, then training; R > 1 = student-guided rounds."""
    explore: float = 0.0
    """The rounds' ``labeling.explore``: the share of each later slice drawn at random."""
    choose: str = "entropy"
    """The rounds' ``labeling.choose``: how later rounds rank the unlabeled rows."""
    first: str = "random"
    """The rounds' ``labeling.first``: round 0 random or typical."""
    clip: float = 0.0
    """The rounds' ``labeling.clip``: the share of the most uncertain rows set aside."""

    @property
    def labeling(self) -> bool:
        return self.labeled < 1.0

    @property
    def name(self) -> str:
        if self.strategy != "llkd":
            name = self.strategy
        elif self.fill:
            name = f"llkd (fill, M≤{self.candidates_per_step})"
        else:
            name = f"llkd (M={self.candidates_per_step})"
        if not self.labeling:
            return name
        how = "random subset" if self.rounds == 1 else ", ".join([f"{self.rounds} rounds", *self._rules()])
        if self.rounds > 1 and self.explore:
            how += f", {100 * self.explore:g} % random"
        return f"{name}, {100 * self.labeled:g} % labeled ({how})"

    def _rules(self) -> list[str]:
        """The rounds' rules that differ from the defaults (entropy, a random first slice, no clip)."""
        return [
            *([self.choose] if self.choose != "entropy" else []),
            *(["typical first"] if self.first == "typical" else []),
            *([f"clip {100 * self.clip:g} %"] if self.clip else []),
        ]

    @property
    def slug(self) -> str:
        if self.strategy != "llkd":
            slug = self.strategy
        else:
            slug = f"llkd-fill{self.candidates_per_step}" if self.fill else f"llkd-m{self.candidates_per_step}"
        if not self.labeling:
            return slug
        how = "random" if self.rounds == 1 else f"rounds{self.rounds}"
        if self.rounds > 1:
            how += "".join(
                "-" + rule.replace(" first", "").replace(" %", "").replace(" ", "") for rule in self._rules()
            )
        if self.rounds > 1 and self.explore:
            how += f"-explore{100 * self.explore:g}"
        return f"{slug}-{how}-{100 * self.labeled:g}pct"


def parse_candidates(text: str) -> list[tuple[int, bool]]:
    """``--candidates 1,4,fill8``: fixed M values, and ``fillN`` for adaptive M capped at N."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        fill = part.startswith("fill")
        try:
            out.append((int(part.removeprefix("fill")), fill))
        except ValueError:
            raise ConfigError(f"--candidates takes M values and fillN entries, e.g. 1,4,fill8; got {part!r}") from None
    return out


def build_variants(strategies: Sequence[str], candidates: Sequence[int | tuple[int, bool]]) -> list[Variant]:
    """``llkd`` once per M in ``candidates``; every baseline once, with M = 1 (their usual setting)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategy {', '.join(unknown)}; known: {', '.join(STRATEGIES)}")
    if not strategies:
        raise ConfigError("no strategy to benchmark")
    pairs = [c if isinstance(c, tuple) else (c, False) for c in candidates]
    if any(m < 1 for m, _ in pairs) or not pairs:
        raise ConfigError("--candidates takes positive integers, e.g. 1,4")
    variants: list[Variant] = []
    for strategy in dict.fromkeys(strategies):
        if strategy == "llkd":
            variants.extend(Variant("llkd", m, fill) for m, fill in dict.fromkeys(pairs))
        else:
            variants.append(Variant(strategy))
    return variants


def parse_fractions(text: str) -> list[float]:
    """``--labeling-budgets 0.1,0.2,0.3,0.5``: fractions of the pool in (0, 1)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--labeling-budgets takes fractions of the pool, e.g. 0.1,0.3; got {text!r}") from None
    if not values or any(not 0.0 < value < 1.0 for value in values):
        raise ConfigError(f"--labeling-budgets takes fractions of the pool in (0, 1), e.g. 0.1,0.3; got {text!r}")
    return list(dict.fromkeys(values))


def labeling_variants(
    strategy: str,
    budgets: Sequence[float],
    rounds: int,
    explore: float = 0.0,
    chooses: Sequence[str] = ("entropy",),
    first: str = "random",
    clip: float = 0.0,
) -> list[Variant]:
    """The labeling axis: for each fraction B, a random subset of B then ``strategy``, and for each
    rule in ``chooses`` ``rounds`` student-guided rounds to the same B (M = 1, the default), ``explore``
    of each later slice drawn at random, round 0 ``first``, ``clip`` of the most uncertain rows set aside."""
    known = get_args(Choose)
    if not chooses or any(c not in known for c in chooses):
        raise ConfigError(f"--labeling-choose takes rules of {', '.join(known)}; got {', '.join(chooses) or 'none'}")
    if first not in ("random", "typical"):
        raise ConfigError(f"--labeling-first takes random or typical; got {first}")
    if not 0.0 <= clip < 0.5:
        raise ConfigError(f"--labeling-clip takes a share of the unlabeled rows in [0, 0.5), e.g. 0.05; got {clip:g}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown --labeling-strategy {strategy}; known: {', '.join(STRATEGIES)}")
    if rounds < 2:
        raise ConfigError("--labeling-rounds must be at least 2 (1 round is the random subset, always compared)")
    if not 0.0 <= explore < 1.0:
        raise ConfigError(f"--labeling-explore takes a share of a slice in [0, 1), e.g. 0.5; got {explore:g}")
    out = []
    for b in budgets:
        out.append(Variant(strategy, labeled=b))
        out += [Variant(strategy, labeled=b, rounds=rounds, explore=explore, choose=c, first=first, clip=clip)
                for c in dict.fromkeys(chooses)]  # fmt: skip
    return out


# --------------------------------------------------------------------------- settings


#: The default budget, in passes of ``all`` over the pool. Sized so that ``all``'s curve has
#: peaked or plateaued on the built-in sets (``results.md`` says whether it did) while one data
#: set's full run (five strategies x 3 seeds) stays within a couple of hours on a small CPU machine
#: (docs/quality.md, "Results at equal compute").
DEFAULT_BUDGET = 5.0


@dataclass
class BenchSettings:
    """Everything one benchmark run depends on (recorded in ``results.json``)."""

    teacher: str = "embedding"
    teacher_model: str | None = None
    student: str = MINILM
    seeds: int = 3
    budget: float | None = DEFAULT_BUDGET
    """Compute budget of every strategy, in passes of ``all`` over the pool (scoring included)."""
    steps: int | None = None
    """A fixed step budget instead (the equal-steps comparison); replaces ``budget``."""
    eval_points: int = 8
    """Gold-set evaluations along each run, at 1/n ... n/n of its budget: the learning curves."""
    batch_size: int = 32
    learning_rate: float = 1e-4
    max_length: int = 64
    momentum: float = DEFAULT_MOMENTUM
    workers: int = 1
    cpus_per_worker: float = field(default_factory=lambda: float(max(1, os.cpu_count() or 1)))
    """Torch threads per training worker (default: every core, for the 1 worker)."""
    pool_size: int | None = 1500
    gold_size: int | None = None
    sample_seed: int = 0
    overrides: list[str] = field(default_factory=list)
    labeling_budgets: list[float] = field(default_factory=list)
    """The labeling axis: fractions of the pool a teacher labels (none: the axis is off)."""
    labeling_rounds: int = 3
    labeling_strategy: str = "llkd"
    labeling_explore: float = 0.0
    labeling_choose: list[str] = field(default_factory=lambda: ["entropy"])
    labeling_first: str = "random"
    labeling_clip: float = 0.0
    count_teacher: bool = False
    """Count the teacher's FLOPs in the labeling table's total compute."""

    @property
    def budget_text(self) -> str:
        if self.steps is not None:
            return f"{self.steps} steps of batch {self.batch_size} for every strategy (equal steps)"
        return f"a compute budget of {self.budget:g} passes of `all` over the pool for every strategy (equal compute)"


def base_config(data: BenchData, settings: BenchSettings) -> PipelineConfig:
    """The pipeline config every run starts from (strategy, M and seed are set per run)."""
    raw: dict[str, Any] = {
        "task": {"name": data.name, "labels": [label.model_dump(exclude_none=True) for label in data.labels]},
        "data": {
            "input": str(data.pool_path),
            "format": "jsonl",
            "id_column": "id",
            "label_column": "label" if data.pool_has_labels else None,
            "gold": str(data.gold_path),
        },
        "teacher": {"backend": settings.teacher},
        "student": {"model": settings.student, "max_length": settings.max_length},
        "selection": {"momentum": settings.momentum},
        "training": {
            "workers": settings.workers,
            "cpus_per_worker": settings.cpus_per_worker,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "max_steps": settings.steps,
            "budget": None if settings.steps is not None else settings.budget,
            "eval_points": settings.eval_points,
            "checkpoint_every": 1_000_000,  # one run is minutes; a lost one is simply redone
        },
    }
    if settings.teacher_model:
        raw["teacher"][settings.teacher] = {"model": settings.teacher_model}
    for override in settings.overrides:
        _apply_override(raw, override)
    return validate_config(raw, "benchmark settings")


#: Settings that change no run of a fully labeled pool: ``--reuse`` ignores them.
LABELING_SETTINGS = (
    "labeling_budgets", "labeling_rounds", "labeling_strategy", "labeling_explore", "labeling_choose",
    "labeling_first", "labeling_clip", "count_teacher",
)  # fmt: skip


def run_config(base: PipelineConfig, variant: Variant, seed: int, pool_rows: int) -> PipelineConfig:
    """One run's config; a labeling variant also gets the teacher's share and the equal-compute budget."""
    config = base.model_copy(deep=True)
    config.selection.strategy = variant.strategy  # type: ignore[assignment]
    config.selection.candidates_per_step = variant.candidates_per_step
    config.selection.fill_batch = variant.fill
    config.training.seed = seed
    if variant.labeling:
        config.labeling.budget = variant.labeled
        config.labeling.rounds = variant.rounds
        config.labeling.explore = variant.explore
        config.labeling.choose = variant.choose  # type: ignore[assignment]
        config.labeling.first = variant.first  # type: ignore[assignment]
        config.labeling.clip = variant.clip
        if config.training.budget is not None:
            config.training.budget = labeling_training_budget(
                config.training.budget, pool_rows, variant, config.labeling.dropout_passes
            )
    return config


def labeling_training_budget(budget: float, pool_rows: int, variant: Variant, dropout_passes: int) -> float:
    """``training.budget`` (passes over the labeled rows) that gives a labeling variant the student
    compute of ``budget`` passes of ``all`` over the whole pool: the rounds' training spends
    ``training.budget`` passes of the labeled rows in all (:func:`llkd_ray.pipeline.rounds.round_training`),
    and every round after the first also scores the unlabeled rows (2·N a token against 6·N
    trained: a third of a pass per row, times the forward passes of the round's rule), which
    comes out of the same budget; so do the labeled rows' pass of the head rules (``HEAD_RULES``)
    and the whole pool's pass of a typical round 0. Rows stand in for tokens; the
    run's FLOPs as recorded are what the benchmark reports."""
    sizes = slice_sizes(pool_rows, variant.labeled, variant.rounds)
    choose: Any = variant.choose
    passes = [
        (pool_rows - sum(sizes[:k])) * scoring_passes(choose, k, dropout_passes)
        + sum(sizes[:k]) * (choose in HEAD_RULES)
        for k in range(1, len(sizes))
    ]
    scoring = (sum(passes) + pool_rows * (variant.rounds > 1 and variant.first == "typical")) / 3
    training_rows = budget * pool_rows - scoring
    if training_rows <= 0:
        raise ConfigError(
            f"--budget {budget:g} is too small for {variant.rounds} labeling rounds: scoring the pool "
            f"{variant.rounds - 1} time(s) alone costs {scoring / pool_rows:.2f} passes of `all`"
        )
    return training_rows / sum(sizes)
