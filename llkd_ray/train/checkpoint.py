"""What a training checkpoint carries besides the student: :class:`TrainState` and its files.

A worker restored by Ray Train and the driver collecting the final checkpoint read the same
``training_state.pt``; the final checkpoint adds ``selected_ids.parquet`` (how often each pool row
was selected). The recipe writes the student and the state payload
(:meth:`~llkd_ray.train.recipe.StudentTrainingRecipe.save_checkpoint`).

Decision: the state file holds plain data only (tensors, numbers, strings, lists, tuples, dicts) and
is read with ``torch.load(..., weights_only=True)``, so a run directory from elsewhere cannot run
code when resumed; anything else in it is refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llkd_ray.errors import LlkdError, first_line

STATE_FILE = "training_state.pt"
WORKER_SUMMARY = "worker_summary.json"
SELECTED_IDS = "selected_ids.parquet"


class CheckpointError(LlkdError):
    """A checkpoint's state file holds more than plain data (or is unreadable): it is not loaded."""


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
    stop: dict[str, Any] = field(default_factory=dict)
    """``training.stop: auto``: its churn checks and, once called, where it stopped (progress, compute)."""

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


def state_payload(
    state: TrainState,
    compute: Any,
    selector: dict[str, Any],
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``training_state.pt`` holds: state, compute (a dataclass) and selector state, the optimizer
    and schedule unless it is the final checkpoint (``optimizer is None``). Plain data only."""
    payload = {"state": asdict(state), "compute": asdict(compute), "selector": selector, "final": optimizer is None}
    if optimizer is not None:
        payload["optimizer"] = optimizer
        payload["scheduler"] = scheduler
    return payload


def write_state(directory: Path, payload: dict[str, Any]) -> None:
    torch.save(payload, directory / STATE_FILE)


def read_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``training_state.pt`` (see :func:`state_payload`), loaded without unpickling code."""
    path = directory / STATE_FILE
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError (or RuntimeError) for a non-plain payload
        raise CheckpointError(
            f"{path}: not loaded: a training state must hold plain tensors, numbers, strings, lists and "
            f"dicts (read with torch.load(weights_only=True)); {first_line(error)}"
        ) from error


def write_selected_ids(directory: Path, selected_counts: dict[str, int]) -> None:
    """``selected_ids.parquet``: each selected pool id and how often it was selected, sorted by id."""
    ids = sorted(selected_counts)
    table = pa.table({"id": ids, "times_selected": [selected_counts[i] for i in ids]})
    pq.write_table(table, directory / SELECTED_IDS)
