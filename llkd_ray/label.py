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
import json
import logging
import time
import uuid
import warnings
from collections import Counter
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
from llkd_ray.config import PipelineConfig
from llkd_ray.errors import ConfigError
from llkd_ray.teachers import Sink, TeacherActor, TeacherPlan, VLLMTeacher, check_teacher

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
JOB_FILE = "_job.json"
REJECTED_DIR = "rejected"
_PART_PREFIX = "part-"
_EMPTY_PART = "part-empty.parquet"

#: Settings that change how fast labels come, not what they are: left out of the config hash, so a
#: job can be resumed with more actors or another batch size.
_OPERATIONAL = frozenset(
    {"batch_size", "concurrency", "num_cpus", "num_gpus", "accelerator_type", "tensor_parallel_size", "device"}
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
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the output directory


class OutputStore:
    """The output directory on any filesystem pyarrow reaches (local path or URI); picklable."""

    def __init__(self, output: str | Path):
        output = str(output)
        if "://" in output:
            self.fs, self.root = pafs.FileSystem.from_uri(output)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(output).expanduser().resolve())
        self.uri = output

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
        return [n for n in self.listing(*parts) if n.startswith(_PART_PREFIX) and n.endswith(".parquet")]

    def write_table(self, table: pa.Table, *parts: str) -> None:
        """Write to a temporary name in the same directory, then rename: readers never see half a file."""
        final = self.path(*parts)
        directory, _, name = final.rpartition("/")
        self.fs.create_dir(directory, recursive=True)
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary, filesystem=self.fs)
        self.fs.move(temporary, final)

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(*parts), columns=columns, filesystem=self.fs)

    def schema_names(self, *parts: str) -> list[str]:
        return pq.read_schema(self.path(*parts), filesystem=self.fs).names

    def read_json(self, name: str) -> dict[str, Any] | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self.path(name)) as stream:
            return json.loads(stream.read().decode())

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        self.fs.create_dir(self.root, recursive=True)
        temporary = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
        with self.fs.open_output_stream(temporary) as stream:
            stream.write((json.dumps(payload, indent=2, default=str) + "\n").encode())
        self.fs.move(temporary, self.path(name))

    def delete(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(*parts))

    def remove_temporaries(self) -> None:
        for sub in ((), (REJECTED_DIR,)):
            for name in self.listing(*sub):
                if name.startswith(".") and name.endswith(".tmp"):
                    self.delete(*sub, name)


def _is_ours(name: str) -> bool:
    return (
        name in (MANIFEST, JOB_FILE, REJECTED_DIR)
        or name.startswith(_PART_PREFIX)
        or (name.startswith(".") and name.endswith(".tmp"))
    )


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


def part_name(ids: pd.Series) -> str:
    """A deterministic part name: a hash of the block's ids (a retry rewrites the same file)."""
    digest = hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:24]
    return f"{_PART_PREFIX}{digest}.parquet"


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


_SUMMARY_COLUMNS = ["part", "actor", "labeled", "rejected"]


def commit_block(batch: pd.DataFrame, *, store: OutputStore, label_names: list[str], has_gold: bool) -> pd.DataFrame:
    """Ray Data task: commit one block atomically (its rejected rows, then its labeled rows).

    Returns one summary row per teacher actor that produced the block (counts only, no text).
    """
    if batch.empty:
        return pd.DataFrame(
            {c: pd.Series(dtype=object if c in ("part", "actor") else np.int64) for c in _SUMMARY_COLUMNS}
        )
    name = part_name(batch["id"])
    bad = batch["reason"].notna()
    if bad.any():
        store.write_table(rejected_table(batch[bad]), REJECTED_DIR, name)
    if (~bad).any():
        store.write_table(labeled_table(batch[~bad], label_names, has_gold), name)
    actors = batch["teacher_actor"] if "teacher_actor" in batch else pd.Series("", index=batch.index)
    actors = actors.fillna("").astype(str)
    summary = (
        pd.DataFrame({"actor": actors, "labeled": (~bad).astype(np.int64), "rejected": bad.astype(np.int64)})
        .groupby("actor", as_index=False)
        .sum()
    )
    summary.insert(0, "part", name)
    return summary[_SUMMARY_COLUMNS]


def _compute(concurrency: int | tuple[int, int] | list[int]):
    import ray.data

    if isinstance(concurrency, int):
        return ray.data.ActorPoolStrategy(size=concurrency)
    low, high = concurrency
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


def _check_pool_leaves_room(settings: Any, backend: str) -> None:
    """Warn when the pool's minimum takes every CPU: the tasks that read the corpus then wait for a
    CPU that never frees (a small corpus read before the actors start still goes through)."""
    import ray

    low = settings.concurrency if isinstance(settings.concurrency, int) else settings.concurrency[0]
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus and low * settings.num_cpus >= cpus:
        message = (
            f"teacher.{backend}: {low} actor(s) x num_cpus {settings.num_cpus} take all {cpus:g} CPUs of the "
            "cluster, leaving none to read the corpus, which can stall the job; prefer an autoscaled "
            "concurrency [1, N], fewer actors or a smaller num_cpus"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=3)


def teacher_stage(dataset, plan: TeacherPlan, sink: Sink | None = None):
    """The teacher on a Ray Dataset of ``id``, ``text`` (``gold_label``): adds ``probs``, ``truncated``,
    ``reason`` (None when labeled) and ``teacher_actor``, then applies ``sink`` to each block in the
    same worker. Lazy and streaming."""
    if plan.backend == "vllm":
        return VLLMTeacher(plan).apply(dataset, sink)
    settings = getattr(plan.teacher, plan.backend)
    _check_pool_leaves_room(settings, plan.backend)
    with warnings.catch_warnings():
        # Actor restarts and task retries still go through ray_remote_args in Ray 2.60.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return dataset.map_batches(
            TeacherActor,
            fn_constructor_kwargs={"plan": plan, "sink": sink},
            batch_size=settings.batch_size,
            batch_format="pandas",
            compute=_compute(settings.concurrency),
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus or None,
            max_restarts=plan.teacher.max_restarts,
            max_task_retries=plan.teacher.max_task_retries,
        )


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
            f"{len(run['rows_per_actor'])} actor(s))",
            f"labels: {distribution}",
        ]
        if m["mean_confidence"] is not None:
            parts.append(f"mean confidence {m['mean_confidence']:.3f}")
        if m.get("gold_accuracy") is not None:
            parts.append(f"gold accuracy {m['gold_accuracy']:.3f}")
        if counts["truncated"]:
            parts.append(f"{counts['truncated']} truncated")
        return "; ".join(parts) + f" -> {self.output}"


def label_corpus(config: PipelineConfig, output: str | Path, *, overwrite: bool = False) -> LabelResult:
    """Label ``config.data.input`` (at most ``data.limit`` rows) with ``config.teacher`` into ``output``.

    Resumes a directory written with the same config (labels only the ids not yet committed);
    refuses one written with another config unless ``overwrite``. The teacher (model path,
    tokenizer, verbalizers) is checked before any data is read.
    """
    import ray.data

    from llkd_ray.corpus import read_corpus
    from llkd_ray.runtime import init_ray

    started = time.perf_counter()
    plan = check_teacher(config.task, config.teacher)
    config_hash = label_config_hash(config)
    store = OutputStore(output)
    check_output(store, config_hash, overwrite)
    label_names = plan.label_names
    has_gold = bool(config.data.label_column)
    init_ray()

    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    if config.data.limit:
        # The first N rows in read order, the same rows on every pass and every rerun.
        context.execution_options.preserve_order = True
    try:
        corpus = read_corpus(config.data)
        job = {
            "stage": "label",
            "config_hash": config_hash,
            "input": config.data.input,
            "limit": config.data.limit,
            "teacher": plan.identity.to_dict(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        claim_output(store, job, overwrite)
        committed = committed_ids(store)
        summaries = []
        commit_kwargs = {"store": store, "label_names": label_names, "has_gold": has_gold}
        for kind, dataset in (("rejected", corpus.rejected), ("rows", corpus.rows)):
            if len(committed):
                # Default resources, so Ray Data fuses it into the reading tasks (no extra operator).
                dataset = dataset.map_batches(
                    drop_committed, batch_format="pyarrow", batch_size=None, fn_kwargs={"committed": committed}
                )
            if kind == "rows":
                # Blocks of block_rows rows: the work units the actor pool spreads (and scales) over.
                dataset = dataset.repartition(target_num_rows_per_block=config.teacher.block_rows)
                committed_blocks = teacher_stage(dataset, plan, sink=functools.partial(commit_block, **commit_kwargs))
            else:
                committed_blocks = dataset.map_batches(
                    commit_block, batch_format="pandas", batch_size=None, num_cpus=0.25, fn_kwargs=commit_kwargs
                )
            for batch in committed_blocks.iter_batches(batch_format="pandas", batch_size=None):
                summaries.append(batch)
    finally:
        context.execution_options.preserve_order = preserve_order

    wall = time.perf_counter() - started
    runs = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame(columns=_SUMMARY_COLUMNS)
    runs["rows"] = runs["labeled"].astype(int) + runs["rejected"].astype(int)
    per_actor = runs[runs["actor"] != ""].groupby("actor")["rows"].sum()
    rows_this_run = int(runs["rows"].sum())

    totals = scan_output(store, label_names)
    if not store.parts():
        # Readers of an empty result still find the schema.
        store.write_table(labeled_schema(has_gold).empty_table(), _EMPTY_PART)
    manifest: dict[str, Any] = {
        "stage": "label",
        "llkd_version": __version__,
        "complete": True,
        "input": config.data.input,
        "limit": config.data.limit,
        "output": store.uri,
        "config_hash": config_hash,
        "labels": label_names,
        "teacher": plan.identity.to_dict(),
        **totals,
        "wall_time_s": round(wall, 3),
        "rows_per_s": round(rows_this_run / wall, 3) if wall > 0 else None,
        "run": {
            "rows": rows_this_run,
            "labeled": int(runs["labeled"].astype(int).sum()),
            "rejected": int(runs["rejected"].astype(int).sum()),
            "skipped_already_committed": len(committed),
            "resumed": bool(len(committed)),
            "wall_time_s": round(wall, 3),
            "rows_per_s": round(rows_this_run / wall, 3) if wall > 0 else None,
            "rows_per_actor": {str(k): int(v) for k, v in per_actor.items()},
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
    # Top-level copy for the autoscaling check (how many actors served, and how much each did).
    manifest["rows_per_actor"] = manifest["run"]["rows_per_actor"]
    if not totals["counts"]["read"]:
        manifest["message"] = f"the input {config.data.input} has no rows: wrote an empty label set"
    elif not totals["counts"]["labeled"]:
        manifest["message"] = f"every row of {config.data.input} was rejected: see {REJECTED_DIR}/"
    store.write_json(MANIFEST, manifest)
    return LabelResult(output=store.uri, manifest=manifest)


def read_labels(output: str | Path):
    """The labeled rows of an output directory as a Ray Dataset (``rejected/`` and ``_*`` left out)."""
    import ray.data

    store = OutputStore(output)
    paths = [store.path(name) for name in store.parts()]
    if not paths:
        raise ConfigError(f"no labeled parts in {output}")
    return ray.data.read_parquet(paths, filesystem=store.fs)
