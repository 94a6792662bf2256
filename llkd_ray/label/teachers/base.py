"""The teacher interface every backend shares, and what a teacher is built from.

A teacher turns a batch of texts into a K-class distribution per text (:class:`TeacherOutput`),
built from a checked :class:`TeacherPlan`. This module imports no backend, so the backends, the
registry and the label stages all build on it without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from llkd_ray.config import TaskConfig, TeacherConfig


@dataclass
class TeacherOutput:
    """A teacher's answer for a batch of n texts.

    ``probs`` is (n, K), each row summing to 1 over the label set (label-set order); rows the teacher
    could not score hold NaN and a ``reasons`` entry (None for rows that are fine). ``tokens`` is
    the real (unpadded) tokens the teacher's forward read for each text: what labeling costs
    (:func:`llkd_ray.compute.forward_flops`); None when the backend did not count them.
    """

    probs: np.ndarray
    truncated: np.ndarray
    reasons: list[str | None]
    tokens: np.ndarray | None = None


class Teacher(Protocol):
    """The interface every backend implements."""

    def score(self, texts: Sequence[str]) -> TeacherOutput: ...


@dataclass(frozen=True)
class TeacherIdentity:
    """What the manifest records about the teacher that produced a label set."""

    backend: str
    model: str
    model_path: str
    prompt_hash: str
    scoring: str | None = None
    verbalizers: dict[str, list[int]] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "backend": self.backend,
            "model": self.model,
            "model_path": self.model_path,
            "prompt_hash": self.prompt_hash,
        }
        if self.scoring:
            payload["scoring"] = self.scoring
        if self.verbalizers is not None:
            payload["verbalizer_token_ids"] = self.verbalizers
        return payload | self.details


def normalise_scores(scores: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """Softmax over the K label scores (log-probabilities or logits), row by row, in float64.

    Rows with a non-finite score get NaN probabilities and the reason ``teacher_non_finite``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores).all(axis=1)
    probs = np.full_like(scores, np.nan)
    if finite.any():
        good = scores[finite]
        shifted = np.exp(good - good.max(axis=1, keepdims=True))
        probs[finite] = shifted / shifted.sum(axis=1, keepdims=True)
    reasons = [None if ok else "teacher_non_finite" for ok in finite]
    return probs, reasons


def label_frame(batch: pd.DataFrame, output: TeacherOutput, actor: str | Sequence[str]) -> pd.DataFrame:
    """The teacher stage's output rows: ``id``, ``text`` (``gold_label``) plus ``probs``, ``truncated``,
    ``reason`` (None when labeled), ``teacher_tokens`` (-1 when not counted) and ``teacher_actor``."""
    frame = batch[[c for c in ("id", "text", "gold_label") if c in batch]].copy()
    frame["probs"] = [row.tolist() for row in output.probs]
    frame["truncated"] = np.asarray(output.truncated, dtype=bool)
    frame["reason"] = pd.Series(output.reasons, index=frame.index, dtype=object)
    tokens = output.tokens if output.tokens is not None else np.full(len(frame), -1)
    frame["teacher_tokens"] = np.asarray(tokens, dtype=np.int64)
    frame["teacher_actor"] = actor
    return frame


@dataclass
class TeacherPlan:
    """A checked teacher: resolved model path, identity, and what the workers need to build it."""

    task: TaskConfig
    teacher: TeacherConfig
    model_path: str
    identity: TeacherIdentity
    max_len: int | None = None
    first_tokens: list[int] | None = None

    @property
    def backend(self) -> str:
        return self.teacher.backend

    @property
    def label_names(self) -> list[str]:
        return self.task.label_names


Sink = Callable[[pd.DataFrame], pd.DataFrame]
"""What the teacher stage does with each scored block, in the same worker (e.g. commit it to disk)."""
