"""What one benchmark run is: its variants (strategy and M), its settings, its pipeline config.

:class:`BenchSettings` is recorded in ``results.json`` and decides whether an earlier run can be
reused; :func:`base_config` turns the settings and the data into the pipeline config every run
starts from, :func:`run_config` sets one variant and seed on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llkd_ray.bench.data import BenchData
from llkd_ray.config import (
    DEFAULT_MOMENTUM,
    MINILM,
    STRATEGIES,
    PipelineConfig,
    _apply_override,
    validate_config,
)
from llkd_ray.errors import ConfigError

# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One trained configuration: a selection strategy and, for ``llkd``, its candidate factor M
    (with ``fill``: adaptive M, draws of one batch until the kept rows fill one, at most M)."""

    strategy: str
    candidates_per_step: int = 1
    fill: bool = False

    @property
    def name(self) -> str:
        if self.strategy != "llkd":
            return self.strategy
        return f"llkd (fill, M≤{self.candidates_per_step})" if self.fill else f"llkd (M={self.candidates_per_step})"

    @property
    def slug(self) -> str:
        if self.strategy != "llkd":
            return self.strategy
        return f"llkd-fill{self.candidates_per_step}" if self.fill else f"llkd-m{self.candidates_per_step}"


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


# --------------------------------------------------------------------------- settings


#: The default budget, in passes of ``all`` over the pool. Sized so that ``all``'s curve has
#: peaked or plateaued on the built-in sets (``results.md`` says whether it did) while one data
#: set's full run (five strategies x 3 seeds) takes about 70-100 minutes on a 2-core machine.
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


def run_config(base: PipelineConfig, variant: Variant, seed: int) -> PipelineConfig:
    config = base.model_copy(deep=True)
    config.selection.strategy = variant.strategy  # type: ignore[assignment]
    config.selection.candidates_per_step = variant.candidates_per_step
    config.selection.fill_batch = variant.fill
    config.training.seed = seed
    return config
