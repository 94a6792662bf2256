"""One labeling run: :func:`label_corpus` from a config to a written, checked label directory.

In order: check the teacher (:func:`~llkd_ray.label.teachers.check.check_teacher`), check and
claim the output directory (:mod:`llkd_ray.label.store`), run the declared stages over the rows
not committed yet (:mod:`llkd_ray.label.stages`), total the directory
(:func:`~llkd_ray.label.scan.scan_output`) and write the manifest with this run's record and the
teacher's compute (:mod:`llkd_ray.label.cost`).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llkd_ray import __version__
from llkd_ray.artifacts import MANIFEST, REJECTED_DIR, stable_hash
from llkd_ray.compute import format_flops, forward_flops
from llkd_ray.config import PipelineConfig
from llkd_ray.console import Progress
from llkd_ray.errors import DataError
from llkd_ray.label.cost import teacher_compute, teacher_parameters
from llkd_ray.label.pool import ActorPool, plan_actor_pool, tolerate_actor_deaths
from llkd_ray.label.scan import scan_output
from llkd_ray.label.stages import LABEL_STAGES, StageContext, build_pipeline
from llkd_ray.label.store import (
    SUMMARY_COLUMNS,
    OutputStore,
    check_output,
    claim_output,
    committed_ids,
    committed_row_keys,
    labeled_schema,
    rejected_count,
)
from llkd_ray.label.teachers.base import TeacherPlan
from llkd_ray.label.teachers.check import check_teacher
from llkd_ray.label.teachers.registry import backend_spec

_EMPTY_PART = "part-empty.parquet"

#: Settings that change how fast labels come, not what they are: left out of the config hash, so a
#: job can be resumed with more actors or another batch size.
_OPERATIONAL = frozenset(
    {
        "batch_size",
        "max_concurrent_batches",
        "concurrency",
        "num_cpus",
        "num_gpus",
        "threads",
        "accelerator_type",
        "tensor_parallel_size",
        "device",
    }
)
_DATA_KEYS = ("input", "format", "text_column", "id_column", "label_column", "max_chars", "limit")


def label_config_hash(config: PipelineConfig) -> str:
    """Hash of everything that decides the labels: task, data selection, teacher (not its speed)."""
    teacher = config.teacher
    backend_settings = {
        k: v for k, v in getattr(teacher, teacher.backend).model_dump(mode="json").items() if k not in _OPERATIONAL
    }
    payload = {
        "task": config.task.model_dump(mode="json"),
        "data": {key: getattr(config.data, key) for key in _DATA_KEYS},
        "teacher": {
            "backend": teacher.backend,
            "prompt_template": teacher.prompt_template,
            "scoring": teacher.scoring,
            teacher.backend: backend_settings,
        },
    }
    return stable_hash(payload)


@dataclass
class LabelResult:
    output: str
    manifest: dict[str, Any]

    @property
    def counts(self) -> dict[str, int]:
        return self.manifest["counts"]

    def summary(self) -> str:
        m = self.manifest
        counts = m["counts"]
        if not counts["read"]:
            return f"label: {m['message']} -> {self.output}"
        labeled = counts["labeled"]
        distribution = ", ".join(
            f"{name} {n} ({n / labeled:.0%})" if labeled else f"{name} 0" for name, n in m["label_distribution"].items()
        )
        run = m["run"]
        parts = [
            f"label: {labeled} labeled, {counts['rejected']} rejected of {counts['read']} rows",
            f"{run['rows']} this run in {run['wall_time_s']:.1f} s ({run['rows_per_s']:.1f} rows/s, "
            f"{_machine_use(run)})",
            f"labels: {distribution}",
        ]
        if m["mean_confidence"] is not None:
            parts.append(f"mean confidence {m['mean_confidence']:.3f}")
        if m.get("gold_accuracy") is not None:
            parts.append(f"gold accuracy {m['gold_accuracy']:.3f}")
        if counts["truncated"]:
            parts.append(f"{counts['truncated']} truncated")
        parts.append(describe_teacher_compute(m.get("teacher_compute")))
        return "; ".join(parts) + f" -> {self.output}"


def describe_teacher_compute(record: dict[str, Any] | None) -> str:
    """``teacher compute 1.2 TFLOP (2·N, N 7.0e9 x 1.1e5 tokens)``, or ``not recorded``."""
    if not record or record.get("flops") is None:
        return "teacher compute not recorded"
    text = (
        f"teacher compute {format_flops(record['flops'])} "
        f"(2·N, N {record['parameters']:.3g} x {record['tokens']:,} tokens)"
    )
    if record.get("rows_not_counted"):
        text += f", {record['rows_not_counted']} earlier rows not counted"
    return text


def _machine_use(run: dict[str, Any]) -> str:
    """``2 actor(s) x 1 thread(s) on 2 CPUs``: how much of the cluster the teacher used."""
    actors = len(run["rows_per_actor"])
    threads = sorted({t for t in run.get("threads_per_actor", {}).values() if t})
    text = f"{actors} actor(s)"
    if threads:
        text += f" x {'/'.join(map(str, threads))} thread(s)"
    if run.get("cluster_cpus"):
        text += f" on {run['cluster_cpus']:g} CPUs"
    return text


def label_corpus(
    config: PipelineConfig, output: str | Path, *, overwrite: bool = False, ids: Collection[str] | None = None
) -> LabelResult:
    """Label ``config.data.input`` (at most ``data.limit`` rows) with ``config.teacher`` into ``output``.

    Resumes a directory written with the same config (labels only the ids not yet committed);
    refuses one written with another config unless ``overwrite``. The teacher (model path,
    tokenizer, verbalizers) is checked before any data is read. ``ids`` restricts the run to those
    rows (a labeling round's slice): the directory then grows round by round, each row committed
    once, and its manifest counts every round. The ids are not part of the config hash.
    """
    from llkd_ray.runtime import init_ray

    started = time.perf_counter()
    plan = check_teacher(config.task, config.teacher)
    parameters = teacher_parameters(plan)
    config_hash = label_config_hash(config)
    store = OutputStore(output)
    check_output(store, config_hash, overwrite)
    has_gold = bool(config.data.label_column)
    init_ray()
    job = {
        "stage": "label",
        "config_hash": config_hash,
        "input": config.data.input,
        "limit": config.data.limit,
        "teacher": plan.identity.to_dict(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    wanted = None if ids is None else pa.array(sorted(set(ids)), type=pa.string())
    labelled = _label_pass(config, plan, store, job, overwrite, wanted)
    wall = time.perf_counter() - started
    totals = scan_output(store, plan.label_names)
    if not store.parts():
        # Readers of an empty result still find the schema.
        store.write_table(labeled_schema(has_gold).empty_table(), _EMPTY_PART)
    run = _run_record(labelled, totals, wall, parameters)
    compute = teacher_compute(parameters, totals.pop("teacher_tokens"))
    manifest: dict[str, Any] = {
        "stage": "label",
        "llkd_version": __version__,
        "complete": True,
        "input": config.data.input,
        "limit": config.data.limit,
        "output": store.uri,
        "config_hash": config_hash,
        "labels": plan.label_names,
        "teacher": plan.identity.to_dict(),
        **totals,
        "wall_time_s": round(wall, 3),
        "rows_per_s": run["rows_per_s"],
        "teacher_compute": compute,
        "run": run,
        # Top-level copy for the autoscaling check (how many actors served, and how much each did).
        "rows_per_actor": run["rows_per_actor"],
    }
    if not totals["counts"]["read"]:
        manifest["message"] = f"the input {config.data.input} has no rows: wrote an empty label set"
    elif not totals["counts"]["labeled"]:
        manifest["message"] = f"every row of {config.data.input} was rejected: see {REJECTED_DIR}/"
    store.write_json(MANIFEST, manifest)
    return LabelResult(output=store.uri, manifest=manifest)


@dataclass
class _LabelPass:
    """What one labeling pass did: a summary row per block and teacher actor, and what was there before."""

    blocks: pd.DataFrame
    committed_before: int
    rejected_before: int
    pool: ActorPool | None


def _label_pass(
    config: PipelineConfig,
    plan: TeacherPlan,
    store: OutputStore,
    job: dict[str, Any],
    overwrite: bool,
    ids: pa.Array | None = None,
) -> _LabelPass:
    """Claim the (checked) directory for ``job`` and run the stages over the rows not committed yet
    (of ``ids``, when given)."""
    from llkd_ray.corpus import read_corpus, read_order

    with read_order(config.data), tolerate_actor_deaths(config.teacher.max_task_retries):
        corpus = read_corpus(config.data)
        claim_output(store, job, overwrite)
        committed = committed_ids(store)
        rejected_before = rejected_count(store)
        run = StageContext(
            plan=plan,
            store=store,
            committed=committed,
            block_rows=config.teacher.block_rows,
            has_gold=bool(config.data.label_column),
            pool=plan_actor_pool(getattr(config.teacher, plan.backend)) if backend_spec(plan.backend).local else None,
            ids=ids,
            committed_keys=committed_row_keys(store) if len(committed) else None,
        )
        committed_blocks = build_pipeline(corpus.classified, LABEL_STAGES, run)
        summaries = []
        if ids is None:
            total = _rows_to_label(config, len(committed))
        else:
            total = len(ids) - int(pc.sum(pc.is_in(ids, value_set=committed)).as_py() or 0)
        with Progress("label", total, "rows") as progress:
            for summary in committed_blocks.iter_batches(batch_format="pandas", batch_size=None):
                summaries.append(summary)
                progress.update(progress.done + int(summary["labeled"].sum()) + int(summary["rejected"].sum()))
    blocks = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame(columns=SUMMARY_COLUMNS)
    return _LabelPass(blocks, len(committed), rejected_before, run.pool)


def _rows_to_label(config: PipelineConfig, committed: int) -> int | None:
    """The rows this pass will label, for the progress bar: the limit, or the lines of local JSONL
    files; None (a bar without a total) otherwise."""
    from llkd_ray.corpus import resolve_paths

    rows = config.data.limit
    if rows is None:
        try:
            paths = [Path(p) for p in resolve_paths(config.data.input)]
        except DataError:  # nothing there yet: the read will say so
            return None
        if not paths or not all(p.suffix == ".jsonl" and p.is_file() for p in paths):
            return None
        rows = sum(1 for p in paths for line in p.open("rb") if line.strip())
    return max(rows - committed, 0)


def _run_record(labelled: _LabelPass, totals: dict[str, Any], wall: float, parameters: int | None) -> dict[str, Any]:
    """The manifest's ``run``: rows this pass, its speed, rows and threads per teacher actor, and the
    tokens the teacher read in this pass (the blocks' records) and their FLOPs."""
    import ray

    runs = labelled.blocks
    runs["rows"] = runs["labeled"].astype(int) + runs["rejected"].astype(int)
    by_actor = runs[runs["actor"] != ""].groupby("actor")
    per_actor = by_actor["rows"].sum()
    threads_per_actor = by_actor["threads"].max() if len(per_actor) else pd.Series(dtype=np.int64)
    labeled = int(runs["labeled"].astype(int).sum())
    # The reader's rejections are committed in the read tasks, the teacher's by its actors: both
    # are the rejected rows the directory gained in this run.
    rejected = max(totals["counts"]["rejected"] - labelled.rejected_before, 0)
    rows = labeled + rejected
    tokens = int(runs["teacher_tokens"].astype(np.int64).sum())
    pool = labelled.pool
    return {
        "rows": rows,
        "labeled": labeled,
        "rejected": rejected,
        "skipped_already_committed": labelled.committed_before,
        "resumed": bool(labelled.committed_before),
        "wall_time_s": round(wall, 3),
        "rows_per_s": round(rows / wall, 3) if wall > 0 else None,
        "rows_per_actor": {str(k): int(v) for k, v in per_actor.items()},
        # Seconds the teacher actors spent scoring (summed over actors): the rest of
        # wall_time_s x actors is start-up, reading, committing and waiting.
        "teacher_busy_s": round(float(runs["score_s"].astype(float).sum()), 3),
        # Torch threads of each actor (0 for the vLLM engines, which manage their own).
        "threads_per_actor": {str(k): int(v) for k, v in threads_per_actor.items()},
        "blocks": int(runs["part"].nunique()),
        "teacher_tokens": tokens,
        "teacher_flops": forward_flops(parameters, tokens) if parameters is not None else None,
        "cluster_cpus": pool.cluster_cpus if pool else float(ray.cluster_resources().get("CPU", 0)),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
