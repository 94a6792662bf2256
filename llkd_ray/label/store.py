"""The labeling stage: Ray Data streams the corpus through teacher actors into Parquet pseudo-labels.

``label_corpus(config, output)`` writes, in ``output``:

- ``part-<hash>.parquet`` — one row per accepted input row: ``id``, ``text``, ``pseudo_label``,
  ``label_index``, ``confidence`` (= max of ``probs``), ``probs`` (K floats in label-set order,
  summing to 1), ``truncated``; plus ``gold_label`` when the pool carries hidden gold labels
  (``data.label_column``), for measuring the teacher only;
- ``rejected/part-<hash>.parquet`` — ``id``, ``text``, ``reason`` for the rows the corpus reader
  rejected (empty text, ...) and the rows the teacher could not label (``teacher_error: ...``);
- ``_manifest.json`` — counts, label distribution, mean confidence, teacher identity, config hash,
  wall time, rows/s, rows per teacher actor, and the teacher's accuracy on the hidden gold labels;
- ``_job.json`` — the config hash and teacher of the job writing the directory.

Exactly once: every block leaving the teacher is committed by a Ray task that writes its Parquet
to a temporary name and renames it into place; the part name is a hash of the block's ids, so a
retried task rewrites the same file. A rerun with the same config reads the ids already committed
and labels only the others; at the end the stage checks that no id is committed twice (and
repairs it if a retry ever produced two blocks with a shared id). A directory written with a
different config is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llkd_ray import __version__
from llkd_ray.artifacts import (
    MANIFEST,
    PART_PREFIX,
    REJECTED_DIR,
    atomic_output,
    is_label_part,
    is_temporary,
    label_files,
    read_json,
    resolve,
    stable_hash,
    write_json,
)
from llkd_ray.config import PipelineConfig
from llkd_ray.errors import ConfigError
from llkd_ray.teachers import Sink, TeacherActor, TeacherPlan, backend_spec, check_teacher

logger = logging.getLogger(__name__)

JOB_FILE = "_job.json"
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


def labeled_schema(has_gold: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("pseudo_label", pa.string()),
        pa.field("label_index", pa.int64()),
        pa.field("confidence", pa.float64()),
        pa.field("probs", pa.list_(pa.float64())),
        pa.field("truncated", pa.bool_()),
    ]
    if has_gold:
        fields.append(pa.field("gold_label", pa.string()))
    return pa.schema(fields)


REJECTED_SCHEMA = pa.schema(
    [pa.field("id", pa.string()), pa.field("text", pa.string()), pa.field("reason", pa.string())]
)


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


# --------------------------------------------------------------------------- the output directory


class OutputStore:
    """The output directory on any filesystem pyarrow reaches (local path or URI); picklable."""

    def __init__(self, output: str | Path):
        self.fs, self.root = resolve(output)
        self.uri = str(output)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def listing(self, *parts: str) -> list[str]:
        """Names of the entries of a directory (empty when it does not exist)."""
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), recursive=False))
        return sorted(Path(info.path).name for info in infos)

    def parts(self, *parts: str) -> list[str]:
        return [n for n in self.listing(*parts) if is_label_part(n)]

    def write_table(self, table: pa.Table, *parts: str) -> None:
        """Write atomically: readers never see half a file."""
        with atomic_output(self.path(*parts), self.fs) as stream:
            pq.write_table(table, stream)

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(*parts), columns=columns, filesystem=self.fs)

    def schema_names(self, *parts: str) -> list[str]:
        return pq.read_schema(self.path(*parts), filesystem=self.fs).names

    def read_json(self, name: str) -> dict[str, Any] | None:
        return read_json(self.path(name), self.fs)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        write_json(self.path(name), payload, self.fs)

    def delete(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(*parts))

    def remove_temporaries(self) -> None:
        for sub in ((), (REJECTED_DIR,)):
            for name in self.listing(*sub):
                if is_temporary(name):
                    self.delete(*sub, name)


def _is_ours(name: str) -> bool:
    return name in (MANIFEST, JOB_FILE, REJECTED_DIR) or name.startswith(PART_PREFIX) or is_temporary(name)


def check_output(store: OutputStore, config_hash: str, overwrite: bool) -> None:
    """Refuse a directory holding other files, or another config's labels unless ``overwrite``."""
    names = store.listing()
    foreign = [n for n in names if not _is_ours(n)]
    if foreign:
        raise ConfigError(
            f"output {store.uri} holds other files ({', '.join(foreign[:3])}); label into an empty or new directory"
        )
    if not names or overwrite:
        return
    recorded = store.read_json(JOB_FILE) or store.read_json(MANIFEST)
    if recorded is None:
        raise ConfigError(f"output {store.uri} holds label parts of an unknown config; --overwrite replaces them")
    if recorded.get("config_hash") != config_hash:
        raise ConfigError(
            f"output {store.uri} holds labels of a different config (hash {recorded.get('config_hash')}, "
            f"this one {config_hash}); pass --overwrite to replace them or choose another directory"
        )


def claim_output(store: OutputStore, job: dict[str, Any], overwrite: bool) -> None:
    """Take the (checked) directory for this job: clear it if ``overwrite``, record the job."""
    if overwrite:
        for name in store.listing():
            store.delete(name)
    store.remove_temporaries()
    store.write_json(JOB_FILE, job)


def _rejected_count(store: OutputStore) -> int:
    return sum(
        pq.read_metadata(store.path(REJECTED_DIR, n), filesystem=store.fs).num_rows for n in store.parts(REJECTED_DIR)
    )


def committed_ids(store: OutputStore) -> pa.Array:
    """Ids already committed (labeled or rejected), read from the parts' ``id`` column only."""
    chunks = [store.read_table(name, columns=["id"])["id"] for name in store.parts()]
    chunks += [store.read_table(REJECTED_DIR, name, columns=["id"])["id"] for name in store.parts(REJECTED_DIR)]
    if not chunks:
        return pa.array([], type=pa.string())
    return pa.chunked_array(chunks, type=pa.string()).combine_chunks()


# --------------------------------------------------------------------------- Ray Data stages


def drop_committed(batch: pa.Table, *, committed: pa.Array) -> pa.Table:
    """Ray Data task: rows whose id is not committed yet."""
    keep = pc.invert(pc.is_in(batch["id"], value_set=committed))
    return batch.filter(keep)


def commit_rejected(batch: pa.Table, *, store: OutputStore) -> pa.Table:
    """Ray Data task, fused into the read: commit the block's rejected rows, pass the others on.

    This is what lets one read of the corpus feed both outputs. The part name is a hash of the
    rejected ids, so a retried read task rewrites the same file.
    """
    bad = pc.is_valid(batch["reason"])
    rejected = batch.filter(bad)
    if rejected.num_rows:
        table = pa.table(
            {
                "id": rejected["id"].cast(pa.string()),
                "text": rejected["text"].cast(pa.string()),
                "reason": rejected["reason"].cast(pa.string()),
            },
            schema=REJECTED_SCHEMA,
        )
        store.write_table(table, REJECTED_DIR, part_name(table["id"].to_pylist()))
    return batch.filter(pc.invert(bad)).drop_columns(["reason"])


def part_name(ids: pd.Series | list[str]) -> str:
    """A deterministic part name: a hash of the block's ids (a retry rewrites the same file)."""
    digest = hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}.parquet"


def labeled_table(frame: pd.DataFrame, label_names: list[str], has_gold: bool) -> pa.Table:
    probs = np.array(frame["probs"].tolist(), dtype=np.float64).reshape(len(frame), len(label_names))
    index = probs.argmax(axis=1)
    columns: dict[str, Any] = {
        "id": frame["id"].astype(str).tolist(),
        "text": frame["text"].tolist(),
        "pseudo_label": [label_names[i] for i in index],
        "label_index": index.astype(np.int64),
        "confidence": probs.max(axis=1),
        "probs": list(probs),
        "truncated": frame["truncated"].astype(bool).to_numpy(),
    }
    if has_gold:
        columns["gold_label"] = [None if pd.isna(v) else str(v) for v in frame.get("gold_label", [None] * len(frame))]
    return pa.Table.from_pydict(columns, schema=labeled_schema(has_gold))


def rejected_table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "id": frame["id"].astype(str).tolist(),
            "text": [None if pd.isna(v) else str(v) for v in frame["text"]],
            "reason": frame["reason"].astype(str).tolist(),
        },
        schema=REJECTED_SCHEMA,
    )


_SUMMARY_COLUMNS = ["part", "actor", "labeled", "rejected", "score_s", "threads"]


def commit_block(batch: pd.DataFrame, *, store: OutputStore, label_names: list[str], has_gold: bool) -> pd.DataFrame:
    """Ray Data task: commit one block atomically (its rejected rows, then its labeled rows).

    Returns one summary row per teacher actor that produced the block (counts only, no text).
    """
    if batch.empty:
        dtypes = {"part": object, "actor": object, "score_s": np.float64}
        return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, np.int64)) for c in _SUMMARY_COLUMNS})
    name = part_name(batch["id"])
    bad = batch["reason"].notna()
    if bad.any():
        store.write_table(rejected_table(batch[bad]), REJECTED_DIR, name)
    if (~bad).any():
        store.write_table(labeled_table(batch[~bad], label_names, has_gold), name)
    actors = batch["teacher_actor"] if "teacher_actor" in batch else pd.Series("", index=batch.index)
    actors = actors.fillna("").astype(str)
    # The teacher's own seconds per row (the actor class records them): the manifest's profile.
    seconds = batch["teacher_s"].fillna(0.0).to_numpy(dtype=np.float64) if "teacher_s" in batch else 0.0
    threads = batch["teacher_threads"].fillna(0).to_numpy(dtype=np.int64) if "teacher_threads" in batch else 0
    summary = (
        pd.DataFrame(
            {
                "actor": actors,
                "labeled": (~bad).astype(np.int64),
                "rejected": bad.astype(np.int64),
                "score_s": np.broadcast_to(seconds, len(batch)),
                "threads": np.broadcast_to(threads, len(batch)),
            }
        )
        .groupby("actor", as_index=False)
        .agg({"labeled": "sum", "rejected": "sum", "score_s": "sum", "threads": "max"})
    )
    summary.insert(0, "part", name)
    return summary[_SUMMARY_COLUMNS]


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


# --------------------------------------------------------------------------- the declared stages


@dataclass
class StageContext:
    """What the stages of one labeling run share."""

    plan: TeacherPlan
    store: OutputStore
    committed: pa.Array
    block_rows: int
    has_gold: bool
    pool: ActorPool | None


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


def _drop_committed_stage(dataset, run: StageContext):
    if not len(run.committed):
        return dataset
    # Default resources, so Ray Data fuses it into the reading tasks (no extra operator).
    return dataset.map_batches(
        drop_committed, batch_format="pyarrow", batch_size=None, fn_kwargs={"committed": run.committed}
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
    Stage("drop_committed", needs=("id",), adds=(), apply=_drop_committed_stage),
    Stage("commit_rejected", needs=("id", "text", "reason"), adds=(), drops=("reason",), apply=_commit_rejected_stage),
    Stage("repartition", needs=(), adds=(), apply=_repartition_stage),
    Stage(
        "score_and_commit",
        needs=("id", "text"),
        adds=tuple(_SUMMARY_COLUMNS),
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


# --------------------------------------------------------------------------- totals and exactly-once


def _dedupe(store: OutputStore, sub: tuple[str, ...], seen: set[str]) -> int:
    """Drop from the parts of ``sub`` every id already in ``seen`` (first part wins); add the rest."""
    removed = 0
    for name in store.parts(*sub):
        ids = store.read_table(*sub, name, columns=["id"])["id"].to_pylist()
        repeated = [i for i in ids if i in seen] + [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            table = store.read_table(*sub, name)
            id_column = table["id"].to_pylist()
            first_seen: set[str] = set()
            keep = []
            for row_id in id_column:
                keep.append(row_id not in seen and row_id not in first_seen)
                first_seen.add(row_id)
            table = table.filter(pa.array(keep))
            removed += len(id_column) - table.num_rows
            if table.num_rows:
                store.write_table(table, *sub, name)
            else:
                store.delete(*sub, name)
            logger.warning("removed %d repeated ids from %s", len(id_column) - table.num_rows, "/".join((*sub, name)))
        seen.update(ids)
    return removed


def scan_output(store: OutputStore, label_names: list[str]) -> dict[str, Any]:
    """Totals of the committed output, after making sure every id is there exactly once."""
    seen: set[str] = set()
    duplicates = _dedupe(store, (), seen) + _dedupe(store, (REJECTED_DIR,), seen)
    label_counts = np.zeros(len(label_names), dtype=np.int64)
    confidences: list[np.ndarray] = []
    correct: list[np.ndarray] = []
    gold_confidence: list[np.ndarray] = []
    truncated = 0
    for name in store.parts():
        columns = store.schema_names(name)
        wanted = ["label_index", "confidence", "truncated", "pseudo_label"]
        wanted += ["gold_label"] if "gold_label" in columns else []
        table = store.read_table(name, columns=wanted)
        if not table.num_rows:
            continue
        label_counts += np.bincount(table["label_index"].to_numpy(), minlength=len(label_names))[: len(label_names)]
        confidence = table["confidence"].to_numpy()
        confidences.append(confidence)
        truncated += int(pc.sum(table["truncated"]).as_py() or 0)
        if "gold_label" in wanted:
            gold = table["gold_label"]
            known = pc.is_valid(gold).to_numpy(zero_copy_only=False)
            hits = pc.equal(table["pseudo_label"], gold).fill_null(False).to_numpy(zero_copy_only=False)
            correct.append(hits[known])
            gold_confidence.append(confidence[known])
    reasons: Counter[str] = Counter()
    for name in store.parts(REJECTED_DIR):
        reasons.update(store.read_table(REJECTED_DIR, name, columns=["reason"])["reason"].to_pylist())
    labeled = int(label_counts.sum())
    rejected = sum(reasons.values())
    totals: dict[str, Any] = {
        "counts": {
            "read": labeled + rejected,
            "labeled": labeled,
            "rejected": rejected,
            "truncated": truncated,
            "rejected_by_reason": dict(sorted(reasons.items())),
            "duplicates_removed": duplicates,
        },
        "label_distribution": dict(zip(label_names, map(int, label_counts), strict=True)),
        "mean_confidence": float(np.concatenate(confidences).mean()) if labeled else None,
        "gold_accuracy": None,
    }
    if correct and sum(map(len, correct)):
        hits = np.concatenate(correct)
        conf = np.concatenate(gold_confidence)
        order = np.argsort(-conf, kind="stable")
        half = len(order) // 2
        totals["gold_accuracy"] = float(hits.mean())
        totals["gold_rows"] = len(hits)
        if half:
            totals["gold_accuracy_by_confidence"] = {
                "more_confident_half": float(hits[order[:half]].mean()),
                "less_confident_half": float(hits[order[half:]].mean()),
            }
    return totals


# --------------------------------------------------------------------------- the stage


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
        return "; ".join(parts) + f" -> {self.output}"


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


def label_corpus(config: PipelineConfig, output: str | Path, *, overwrite: bool = False) -> LabelResult:
    """Label ``config.data.input`` (at most ``data.limit`` rows) with ``config.teacher`` into ``output``.

    Resumes a directory written with the same config (labels only the ids not yet committed);
    refuses one written with another config unless ``overwrite``. The teacher (model path,
    tokenizer, verbalizers) is checked before any data is read.
    """
    from llkd_ray.runtime import init_ray

    started = time.perf_counter()
    plan = check_teacher(config.task, config.teacher)
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
    labelled = _label_pass(config, plan, store, job, overwrite)
    wall = time.perf_counter() - started
    totals = scan_output(store, plan.label_names)
    if not store.parts():
        # Readers of an empty result still find the schema.
        store.write_table(labeled_schema(has_gold).empty_table(), _EMPTY_PART)
    run = _run_record(labelled, totals, wall)
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
    config: PipelineConfig, plan: TeacherPlan, store: OutputStore, job: dict[str, Any], overwrite: bool
) -> _LabelPass:
    """Claim the (checked) directory for ``job`` and run the stages over the rows not committed yet."""
    import ray.data

    from llkd_ray.corpus import read_corpus

    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    if config.data.limit:
        # The first N rows in read order, the same rows on every pass and every rerun.
        context.execution_options.preserve_order = True
    try:
        corpus = read_corpus(config.data)
        claim_output(store, job, overwrite)
        committed = committed_ids(store)
        rejected_before = _rejected_count(store)
        run = StageContext(
            plan=plan,
            store=store,
            committed=committed,
            block_rows=config.teacher.block_rows,
            has_gold=bool(config.data.label_column),
            pool=plan_actor_pool(getattr(config.teacher, plan.backend)) if backend_spec(plan.backend).local else None,
        )
        committed_blocks = build_pipeline(corpus.classified, LABEL_STAGES, run)
        summaries = list(committed_blocks.iter_batches(batch_format="pandas", batch_size=None))
    finally:
        context.execution_options.preserve_order = preserve_order
    blocks = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame(columns=_SUMMARY_COLUMNS)
    return _LabelPass(blocks, len(committed), rejected_before, run.pool)


def _run_record(labelled: _LabelPass, totals: dict[str, Any], wall: float) -> dict[str, Any]:
    """The manifest's ``run``: rows this pass, its speed, rows and threads per teacher actor."""
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
        "cluster_cpus": pool.cluster_cpus if pool else float(ray.cluster_resources().get("CPU", 0)),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def read_labels(output: str | Path):
    """The labeled rows of an output directory as a Ray Dataset (``rejected/`` and ``_*`` left out)."""
    from llkd_ray.compat import read_parquet

    filesystem, paths = label_files(output)
    if not paths:
        raise ConfigError(f"no labeled parts in {output}")
    return read_parquet(paths, filesystem=filesystem)
