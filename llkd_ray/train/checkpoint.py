"""What a training checkpoint carries besides the student: :class:`TrainState` and its files.

A worker restored by Ray Train and the driver collecting the final checkpoint read the same
``training_state.pt``; the final checkpoint adds ``selected_ids.parquet`` (how often each pool row
was selected). The recipe writes the student and the state payload
(:meth:`~llkd_ray.train.recipe.StudentTrainingRecipe.save_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

STATE_FILE = "training_state.pt"
WORKER_SUMMARY = "worker_summary.json"
SELECTED_IDS = "selected_ids.parquet"


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


def read_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``training_state.pt``: state, compute and selector, the optimizer and schedule
    unless it is the final one."""
    return torch.load(directory / STATE_FILE, weights_only=False)


def write_selected_ids(directory: Path, selected_counts: dict[str, int]) -> None:
    """``selected_ids.parquet``: each selected pool id and how often it was selected, sorted by id."""
    ids = sorted(selected_counts)
    table = pa.table({"id": ids, "times_selected": [selected_counts[i] for i in ids]})
    pq.write_table(table, directory / SELECTED_IDS)
