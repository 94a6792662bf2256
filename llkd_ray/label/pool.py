"""The teacher as one Ray Data operator: :func:`teacher_stage`.

For the in-process backends (``embedding``, ``hf``) it is an actor pool of :class:`TeacherActor`,
sized from the cluster by :func:`plan_actor_pool`; a backend that runs as its own stage
(``vllm``) applies itself. Either way each scored block goes to the ``sink`` (the commit) in the
worker that scored it, so the teacher is the last operator and the autoscaler can give it the
whole cluster.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from llkd_ray.label.teachers.base import Sink, TeacherPlan, label_frame
from llkd_ray.label.teachers.registry import backend_spec, build_local_teacher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorPool:
    """How the teacher actors of the ``embedding`` and ``hf`` backends use the cluster."""

    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float
    threads: int | None
    """Torch threads per actor; None: its node's CPUs / ``actors_per_node`` (worked out in the actor)."""
    actors_per_node: int
    cluster_cpus: float

    def compute(self):
        import ray.data

        if self.min_size == self.max_size:
            return ray.data.ActorPoolStrategy(size=self.min_size)
        return ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size)

    def describe(self) -> str:
        size = str(self.max_size) if self.min_size == self.max_size else f"{self.min_size}-{self.max_size}"
        threads = "node CPUs" if self.threads is None else str(self.threads)
        return f"{size} actor(s) x {threads} thread(s), {self.cluster_cpus:g} CPUs"


def plan_actor_pool(settings: Any) -> ActorPool:
    """Size the teacher's actor pool from the cluster for ``concurrency: auto`` / ``threads: auto``.

    ``auto`` uses the whole machine in the layout the backend's ``AUTO_LAYOUT`` names, both
    measured in docs/labeling.md: ``actor_per_cpu`` (the embedding teacher) runs one
    single-thread actor per CPU, each reserving (C - 1) / C of a C-CPU node so that one CPU stays
    free for the tasks reading the corpus; ``actor_per_node`` (hf) runs one actor per node whose
    torch threads take the node's CPUs. With ``num_gpus``, one actor per GPU share, with
    ``num_cpus`` threads.
    """
    import ray

    requested = None if settings.num_cpus == "auto" else float(settings.num_cpus)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= (requested or 0.5)]
    cluster = ray.cluster_resources()
    cpus = float(cluster.get("CPU", 0))
    num_cpus = requested or 1.0
    per_cpu = settings.AUTO_LAYOUT == "actor_per_cpu" and settings.num_gpus == 0 and bool(nodes)
    if settings.concurrency == "auto" and per_cpu:
        node_cpus = [int(n["Resources"]["CPU"]) for n in nodes]
        high = low = sum(max(1, c) for c in node_cpus)
        if requested is None:
            smallest = max(1, min(node_cpus))
            num_cpus = max(0.5, (smallest - 1) / smallest)
    elif settings.concurrency == "auto":
        gpus = float(cluster.get("GPU", 0))
        high = max(1, int(gpus // settings.num_gpus) if settings.num_gpus > 0 else len(nodes))
        low = 1
    elif isinstance(settings.concurrency, int):
        low = high = settings.concurrency
    else:
        low, high = settings.concurrency
    per_node = max(1, -(-high // max(1, len(nodes))))
    if settings.threads != "auto":
        threads: int | None = int(settings.threads)
    elif settings.concurrency == "auto" and per_cpu:
        threads = 1
    elif settings.num_gpus > 0:
        threads = max(1, int(num_cpus))  # the GPU does the work
    else:
        threads = None
    return ActorPool(low, high, num_cpus, settings.num_gpus, threads, per_node, cpus)


def _check_pool_leaves_room(pool: ActorPool, backend: str) -> None:
    """Warn when the pool's minimum takes every CPU: the tasks that read the corpus then wait for a
    CPU that never frees (a small corpus read before the actors start still goes through)."""
    if pool.cluster_cpus and pool.min_size * pool.num_cpus >= pool.cluster_cpus:
        message = (
            f"teacher.{backend}: {pool.min_size} actor(s) x num_cpus {pool.num_cpus} take all "
            f"{pool.cluster_cpus:g} CPUs of the cluster, leaving none to read the corpus, which can stall the "
            "job; prefer concurrency: auto (which leaves a CPU free), an autoscaled [1, N], fewer actors or a "
            "smaller num_cpus"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=3)


@contextlib.contextmanager
def tolerate_actor_deaths(in_a_row: int) -> Iterator[None]:
    """Within: a teacher actor that dies while it starts (killed, OOM while loading its model) is
    replaced, up to ``in_a_row`` times in a row, instead of failing the job.

    Ray restarts an actor that dies while working (``max_restarts``), but not one whose start
    failed: Ray Data then fails the whole execution unless ``max_consecutive_actor_init_deaths``
    allows a replacement (0 by default). The count resets when an actor starts, so a teacher that
    can never start still fails the job. A restarted actor starts again, model load included, so
    a second fault in that window is not rare on a long job.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.max_consecutive_actor_init_deaths
    if before >= 0:
        context.max_consecutive_actor_init_deaths = max(before, in_a_row)
    try:
        yield
    finally:
        context.max_consecutive_actor_init_deaths = before


def teacher_stage(dataset, plan: TeacherPlan, sink: Sink | None = None, pool: ActorPool | None = None):
    """The teacher on a Ray Dataset of ``id``, ``text`` (``gold_label``): adds ``probs``, ``truncated``,
    ``reason`` (None when labeled), ``teacher_actor`` and ``teacher_s``, then applies ``sink`` to each
    block in the same worker. Lazy and streaming. Each actor call gets one block of
    ``teacher.block_rows`` rows (one committed part)."""
    spec = backend_spec(plan.backend)
    if spec.local is None:
        return spec.stage(plan).apply(dataset, sink)
    settings = getattr(plan.teacher, plan.backend)
    pool = pool or plan_actor_pool(settings)
    _check_pool_leaves_room(pool, plan.backend)
    with warnings.catch_warnings():
        # Actor restarts and task retries still go through ray_remote_args in Ray 2.60.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return dataset.map_batches(
            TeacherActor,
            fn_constructor_kwargs={
                "plan": plan,
                "sink": sink,
                "threads": pool.threads,
                "actors_per_node": pool.actors_per_node,
            },
            batch_size=plan.teacher.block_rows,
            batch_format="pandas",
            compute=pool.compute(),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            max_restarts=plan.teacher.max_restarts,
            max_task_retries=plan.teacher.max_task_retries,
        )


# --------------------------------------------------------------------------- the actor class


def actor_threads(actors_per_node: int = 1) -> int:
    """The CPUs of the node this process runs on, shared among ``actors_per_node`` actors."""
    import os

    import ray

    cpus = 0.0
    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
        cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0.0)
    cpus = cpus or len(os.sched_getaffinity(0))
    return max(1, int(cpus // max(1, actors_per_node)))


class TeacherActor:
    """The Ray Data actor class of the ``embedding`` and ``hf`` backends (one teacher per actor).

    Each block is scored and handed to ``sink`` in the actor itself, so the teacher is the last
    operator of the pipeline and Ray Data's autoscaler can give it the whole cluster.
    """

    def __init__(
        self, plan: TeacherPlan, sink: Sink | None = None, threads: int | None = None, actors_per_node: int = 1
    ):
        import ray
        import torch

        self.threads = threads or actor_threads(actors_per_node)
        torch.set_num_threads(self.threads)
        self.teacher = build_local_teacher(plan)
        self.sink = sink
        self.actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else ""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.perf_counter()
        output = self.teacher.score(batch["text"].tolist())
        frame = label_frame(batch, output, self.actor)
        # The teacher's own seconds, spread over the rows: where the stage's time goes (manifest).
        frame["teacher_s"] = (time.perf_counter() - started) / max(len(frame), 1)
        frame["teacher_threads"] = self.threads
        return self.sink(frame) if self.sink else frame
