"""The labeling pipeline as declared stages: each names the columns it needs, adds and drops.

:data:`LABEL_STAGES` is the pipeline in order; :func:`check_stages` checks that the columns fit
before anything runs and :func:`build_pipeline` applies the stages to the reader's classified
corpus (lazily). The stages themselves are thin: the work is in :mod:`llkd_ray.label.store` (the
commits) and :mod:`llkd_ray.label.pool` (the teacher).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from llkd_ray.label.pool import ActorPool, teacher_stage
from llkd_ray.label.store import (
    SUMMARY_COLUMNS,
    OutputStore,
    commit_block,
    commit_rejected,
    drop_committed_rows,
    keep_ids,
)
from llkd_ray.label.teachers.base import TeacherPlan


@dataclass
class StageContext:
    """What the stages of one labeling run share."""

    plan: TeacherPlan
    store: OutputStore
    committed: pa.Array
    block_rows: int
    has_gold: bool
    pool: ActorPool | None
    ids: pa.Array | None = None
    """Label only these rows (a round's slice, ``labeling.rounds``); None: every row."""
    committed_keys: pa.Array | None = None
    """:func:`~llkd_ray.label.store.row_keys` of the committed rows, which a resume skips."""


@dataclass(frozen=True)
class Stage:
    """One step of the labeling pipeline: the columns it needs, adds and drops, and how to apply it
    to the (lazy) dataset. The list is checked before anything runs (:func:`check_stages`)."""

    name: str
    needs: tuple[str, ...]
    adds: tuple[str, ...]
    apply: Callable[[Any, StageContext], Any]
    drops: tuple[str, ...] = ()
    replaces: bool = False
    """The stage's output is a new table (``adds`` only), not its input plus ``adds``."""


def _keep_ids_stage(dataset, run: StageContext):
    if run.ids is None:
        return dataset
    # Fused into the reading tasks like the next stage: rows outside the slice never leave them.
    return dataset.map_batches(keep_ids, batch_format="pyarrow", batch_size=None, fn_kwargs={"ids": run.ids})


def _drop_committed_stage(dataset, run: StageContext):
    if run.committed_keys is None or not len(run.committed_keys):
        return dataset
    # Default resources, so Ray Data fuses it into the reading tasks (no extra operator).
    return dataset.map_batches(
        drop_committed_rows, batch_format="pyarrow", batch_size=None, fn_kwargs={"committed": run.committed_keys}
    )


def _commit_rejected_stage(dataset, run: StageContext):
    return dataset.map_batches(commit_rejected, batch_format="pyarrow", batch_size=None, fn_kwargs={"store": run.store})


def _repartition_stage(dataset, run: StageContext):
    # Blocks of block_rows rows: the work units the actor pool spreads (and scales) over.
    return dataset.repartition(target_num_rows_per_block=run.block_rows)


def _score_and_commit_stage(dataset, run: StageContext):
    sink = functools.partial(commit_block, store=run.store, label_names=run.plan.label_names, has_gold=run.has_gold)
    return teacher_stage(dataset, run.plan, sink=sink, pool=run.pool)


#: What the corpus reader's ``classified`` dataset carries (``gold_label`` when the pool has gold).
CLASSIFIED_COLUMNS = ("id", "text", "reason")

#: The labeling pipeline, in order. Scoring and committing run in the same actor (the commit is
#: the teacher's sink) so that the teacher is the last operator; see docs/labeling.md.
LABEL_STAGES: tuple[Stage, ...] = (
    Stage("keep_ids", needs=("id",), adds=(), apply=_keep_ids_stage),
    Stage("drop_committed", needs=("id", "text"), adds=(), apply=_drop_committed_stage),
    Stage("commit_rejected", needs=("id", "text", "reason"), adds=(), drops=("reason",), apply=_commit_rejected_stage),
    Stage("repartition", needs=(), adds=(), apply=_repartition_stage),
    Stage(
        "score_and_commit",
        needs=("id", "text"),
        adds=tuple(SUMMARY_COLUMNS),
        replaces=True,
        apply=_score_and_commit_stage,
    ),
)


def check_stages(stages: Sequence[Stage], columns: Sequence[str]) -> list[str]:
    """Check that every stage finds the columns it needs; return the columns of the last output."""
    available = list(columns)
    for stage in stages:
        missing = [c for c in stage.needs if c not in available]
        if missing:
            raise ValueError(f"label stage {stage.name!r} needs {', '.join(missing)}, which no earlier stage adds")
        if stage.replaces:
            available = list(stage.adds)
        else:
            available = [c for c in available if c not in stage.drops] + [c for c in stage.adds if c not in available]
    return available


def build_pipeline(dataset, stages: Sequence[Stage], run: StageContext):
    """Apply the checked stages to the classified corpus (lazy: nothing runs until iterated)."""
    check_stages(stages, CLASSIFIED_COLUMNS)
    for stage in stages:
        dataset = stage.apply(dataset, run)
    return dataset
