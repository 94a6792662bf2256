"""The label stage's output directory and its exactly-once commits.

``label_corpus(config, output)`` (:mod:`llkd_ray.label.run`) writes, in ``output``:

- ``part-<hash>.parquet`` — one row per accepted input row: ``id``, ``text``, ``pseudo_label``,
  ``label_index``, ``confidence`` (= max of ``probs``), ``probs`` (K floats in label-set order,
  summing to 1), ``truncated``, ``teacher_tokens`` (the real tokens the teacher read for the row:
  what labeling it cost); plus ``gold_label`` when the pool carries hidden gold labels
  (``data.label_column``), for measuring the teacher only;
- ``rejected/part-<hash>.parquet`` — ``id``, ``text``, ``reason``, ``teacher_tokens`` (null for
  the rows the corpus reader rejected: empty text, ...; counted for the rows the teacher could not
  label: ``teacher_error: ...``);
- ``_manifest.json`` — counts, label distribution, mean confidence, teacher identity, config hash,
  wall time, rows/s, rows per teacher actor, the teacher's accuracy on the hidden gold labels, and
  the teacher's compute (``teacher_compute``: parameters, tokens, FLOPs);
- ``_job.json`` — the config hash and teacher of the job writing the directory.

Exactly once: every block leaving the teacher is committed by a Ray task that writes its Parquet
to a temporary name and renames it into place; the part name is a hash of the block's ids, so a
retried task rewrites the same file. A rerun with the same config reads the ids already committed
and labels only the others; at the end the stage checks that no id is committed twice (and
repairs it if a retry ever produced two blocks with a shared id: :mod:`llkd_ray.label.scan`). A
directory written with a different config is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llkd_ray.artifacts import (
    MANIFEST,
    PART_PREFIX,
    REJECTED_DIR,
    atomic_output,
    is_label_part,
    is_temporary,
    read_json,
    resolve,
    write_json,
)
from llkd_ray.errors import ConfigError

JOB_FILE = "_job.json"


def labeled_schema(has_gold: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("pseudo_label", pa.string()),
        pa.field("label_index", pa.int64()),
        pa.field("confidence", pa.float64()),
        pa.field("probs", pa.list_(pa.float64())),
        pa.field("truncated", pa.bool_()),
        pa.field("teacher_tokens", pa.int64()),
    ]
    if has_gold:
        fields.append(pa.field("gold_label", pa.string()))
    return pa.schema(fields)


REJECTED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("teacher_tokens", pa.int64()),
    ]
)


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


def rejected_count(store: OutputStore) -> int:
    return sum(
        pq.read_metadata(store.path(REJECTED_DIR, n), filesystem=store.fs).num_rows for n in store.parts(REJECTED_DIR)
    )


#: The reason of a row whose id an earlier row of the corpus, with another text, already has.
DUPLICATE_ID = "duplicate_id"


def _text_hash(text: str | None) -> str:
    return "-" if text is None else hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def row_keys(ids: pa.Array | pa.ChunkedArray, texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Per row, its id and a hash of its text: what makes two rows the same row.

    Ids alone cannot tell a row committed before a resume from another row of the corpus with the
    same id (a repeated id): the first would be labeled twice, the second lost without a trace.
    """
    return pa.array(
        [f"{i}\x1f{_text_hash(t)}" for i, t in zip(ids.to_pylist(), texts.to_pylist(), strict=True)], pa.string()
    )


def committed_row_keys(store: OutputStore) -> pa.Array:
    """:func:`row_keys` of every committed row (labeled or rejected): the rows a resume skips."""
    keys = [
        row_keys(table["id"], table["text"])
        for sub in ((), (REJECTED_DIR,))
        for table in (store.read_table(*sub, name, columns=["id", "text"]) for name in store.parts(*sub))
    ]
    return pa.concat_arrays(keys) if keys else pa.array([], type=pa.string())


def committed_ids(store: OutputStore) -> pa.Array:
    """Ids already committed (labeled or rejected), read from the parts' ``id`` column only."""
    chunks = [store.read_table(name, columns=["id"])["id"] for name in store.parts()]
    chunks += [store.read_table(REJECTED_DIR, name, columns=["id"])["id"] for name in store.parts(REJECTED_DIR)]
    if not chunks:
        return pa.array([], type=pa.string())
    return pa.chunked_array(chunks, type=pa.string()).combine_chunks()


# --------------------------------------------------------------------------- Ray Data tasks: exactly-once commits


def keep_ids(batch: pa.Table, *, ids: pa.Array) -> pa.Table:
    """Ray Data task: only the rows whose id is in ``ids`` (a labeling round's slice of the pool)."""
    return batch.filter(pc.is_in(batch["id"], value_set=ids))


def drop_committed(batch: pa.Table, *, committed: pa.Array) -> pa.Table:
    """Ray Data task: rows whose id is not committed yet."""
    keep = pc.invert(pc.is_in(batch["id"], value_set=committed))
    return batch.filter(keep)


def drop_committed_rows(batch: pa.Table, *, committed: pa.Array) -> pa.Table:
    """Ray Data task: rows not committed yet, by :func:`row_keys` (a resume's filter). A row whose
    id is committed with another text is another row: it goes on, and the end of the run records
    the repeat (:func:`~llkd_ray.label.scan.resolve_repeats`)."""
    return batch.filter(pc.invert(pc.is_in(row_keys(batch["id"], batch["text"]), value_set=committed)))


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
                "teacher_tokens": pa.nulls(rejected.num_rows, pa.int64()),  # the teacher never read them
            },
            schema=REJECTED_SCHEMA,
        )
        store.write_table(table, REJECTED_DIR, part_name(table["id"].to_pylist()))
    return batch.filter(pc.invert(bad)).drop_columns(["reason"])


def part_name(ids: pd.Series | list[str]) -> str:
    """A deterministic part name: a hash of the block's ids (a retry rewrites the same file)."""
    digest = hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}.parquet"


def _teacher_tokens(frame: pd.DataFrame) -> pa.Array:
    """The ``teacher_tokens`` column: null where the backend did not count (-1 or missing)."""
    if "teacher_tokens" not in frame:
        return pa.nulls(len(frame), pa.int64())
    values = frame["teacher_tokens"].fillna(-1).to_numpy(dtype=np.int64)
    return pa.array(values, type=pa.int64(), mask=values < 0)


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
        "teacher_tokens": _teacher_tokens(frame),
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
            "teacher_tokens": _teacher_tokens(frame),
        },
        schema=REJECTED_SCHEMA,
    )


SUMMARY_COLUMNS = ["part", "actor", "labeled", "rejected", "score_s", "threads", "teacher_tokens"]


def commit_block(batch: pd.DataFrame, *, store: OutputStore, label_names: list[str], has_gold: bool) -> pd.DataFrame:
    """Ray Data task: commit one block atomically (its rejected rows, then its labeled rows).

    Returns one summary row per teacher actor that produced the block (counts only, no text): the
    block's record, with the real tokens the teacher read for it (``teacher_tokens``).
    """
    if batch.empty:
        dtypes = {"part": object, "actor": object, "score_s": np.float64}
        return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, np.int64)) for c in SUMMARY_COLUMNS})
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
    tokens = 0  # the real tokens the teacher read (-1: not counted)
    if "teacher_tokens" in batch:
        tokens = batch["teacher_tokens"].fillna(0).clip(lower=0).to_numpy(dtype=np.int64)
    summary = (
        pd.DataFrame(
            {
                "actor": actors,
                "labeled": (~bad).astype(np.int64),
                "rejected": bad.astype(np.int64),
                "score_s": np.broadcast_to(seconds, len(batch)),
                "threads": np.broadcast_to(threads, len(batch)),
                "teacher_tokens": np.broadcast_to(tokens, len(batch)),
            }
        )
        .groupby("actor", as_index=False)
        .agg({"labeled": "sum", "rejected": "sum", "score_s": "sum", "threads": "max", "teacher_tokens": "sum"})
    )
    summary.insert(0, "part", name)
    return summary[SUMMARY_COLUMNS]
