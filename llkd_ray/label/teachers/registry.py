"""The backend registry: one :class:`Backend` entry per ``teacher.backend``, keyed by its name.

It imports the three backends, so no backend imports it; what needs to ask about a backend
(checking a teacher, the teacher stage) sits above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llkd_ray.errors import ConfigError
from llkd_ray.label.teachers.base import Teacher, TeacherPlan
from llkd_ray.label.teachers.embedding import EmbeddingTeacher
from llkd_ray.label.teachers.hf import HFTeacher
from llkd_ray.label.teachers.vllm import VLLMTeacher


@dataclass(frozen=True)
class Backend:
    """What the labeling stage needs to know about a teacher backend: one entry per backend, so
    adding one is one registration, not another ``if backend == ...`` at each call site."""

    name: str
    llm: bool
    """Prompted LLM (tokenizer, verbalizers, truncation checked up front); else label descriptions."""
    sequence_scoring: bool
    """Whether ``teacher.scoring: sequence`` is offered."""
    local: Callable[[TeacherPlan], Teacher] | None
    """An in-process teacher that :class:`~llkd_ray.label.pool.TeacherActor` runs in a Ray Data actor pool."""
    stage: Callable[[TeacherPlan], Any] | None = None
    """Otherwise, an object whose ``apply(dataset, sink)`` is its own Ray Data stage (vLLM)."""


BACKENDS: dict[str, Backend] = {
    "embedding": Backend("embedding", llm=False, sequence_scoring=False, local=EmbeddingTeacher),
    "hf": Backend("hf", llm=True, sequence_scoring=True, local=HFTeacher),
    "vllm": Backend("vllm", llm=True, sequence_scoring=False, local=None, stage=VLLMTeacher),
}


def backend_spec(name: str) -> Backend:
    """The registry entry of a backend (the config already restricts ``teacher.backend``)."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown teacher backend {name!r}; known: {', '.join(BACKENDS)}") from None


def build_local_teacher(plan: TeacherPlan) -> Teacher:
    """The in-process teacher for a plan (the backends :class:`~llkd_ray.label.pool.TeacherActor` runs)."""
    spec = backend_spec(plan.backend)
    if spec.local is None:
        raise ValueError(f"the {plan.backend} backend runs as its own Ray Data stage; use backend_spec(...).stage")
    return spec.local(plan)
