"""Corpus and gold-set input on Ray Data.

``read_corpus`` streams any corpus Ray Data can read (JSONL, CSV, Parquet, plain text; a file, a
directory, a glob or a URI) into rows of ``id``, ``text`` (and ``gold_label`` when the pool hides
gold labels). Every input row gets a stable ``id`` and a verdict: rows that cannot be used carry a
``reason`` and go to the ``rejected`` dataset, never silently away.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource
from ray.data.expressions import col

from llkd_ray.compat import CSVDatasource, TextDatasource, compute_row_hashes
from llkd_ray.config import DataConfig
from llkd_ray.errors import DataError
from llkd_ray.jsonl import READ_ERROR, READ_ERRORS, JsonLinesDatasource, parse_line

Format = Literal["jsonl", "csv", "parquet", "text"]

#: Reasons a row is rejected, in the order they are checked (a JSONL line's read errors first).
REJECT_REASONS = (*READ_ERRORS, "missing_text", "non_string_text", "empty_text", "whitespace_text", "text_too_long")

_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
_ROW_ID = "_row_id"
_BUILTIN_PREFIX = "builtin:"
_BUILTIN_SETS = {"sst2": ("train", "test"), "trec": ("train", "test")}


@dataclass
class Corpus:
    """A validated corpus: ``classified`` (id, text, reason[, gold_label]: every row once, ``reason``
    None when usable), and its two halves ``rows`` (id, text[, gold_label]) and ``rejected``
    (id, text, reason).

    All three are lazy Ray Datasets; nothing is materialised. Each execution of ``rows`` or
    ``rejected`` reads the input again: a consumer that needs both reads ``classified`` once and
    splits it itself (as ``label_corpus`` does).
    """

    reference: str
    classified: ray.data.Dataset
    columns: list[str] = field(default_factory=list)
    has_gold: bool = False

    @property
    def rows(self) -> ray.data.Dataset:
        return self.classified.filter(expr=col("reason").is_null()).drop_columns(["reason"])

    @property
    def rejected(self) -> ray.data.Dataset:
        rejected = self.classified.filter(expr=col("reason").is_not_null())
        if self.has_gold:
            rejected = rejected.drop_columns(["gold_label"])
        return rejected


# --------------------------------------------------------------------------- references


def builtin_path(reference: str) -> Path:
    """Resolve ``builtin:NAME/SPLIT`` to the JSONL file shipped inside the package."""
    name, _, split = reference.removeprefix(_BUILTIN_PREFIX).partition("/")
    if name not in _BUILTIN_SETS or split not in _BUILTIN_SETS[name]:
        known = ", ".join(f"builtin:{n}/{s}" for n, splits in _BUILTIN_SETS.items() for s in splits)
        raise DataError(f"unknown built-in data set {reference!r}; known: {known}")
    return Path(str(resources.files("llkd_ray") / "builtin" / name / f"{split}.jsonl"))


def resolve_paths(reference: str) -> list[str]:
    """Expand a reference into the paths or URIs Ray Data should read; fail if nothing is there."""
    if reference.startswith(_BUILTIN_PREFIX):
        return [str(builtin_path(reference))]
    if "://" in reference:
        return [reference]
    if any(ch in reference for ch in "*?["):
        matches = sorted(glob.glob(reference, recursive=True))
        if not matches:
            raise DataError(f"no files match {reference!r}")
        return matches
    if not Path(reference).exists():
        raise DataError(f"input not found: {reference}")
    return [reference]


def detect_format(paths: list[str]) -> Format:
    """Infer the format from the file extension; for a directory, from the files inside it."""
    suffixes: set[str] = set()
    for path in paths:
        filesystem, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.Directory:
            listing = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
            suffixes |= {Path(f.path).suffix.lower() for f in listing if f.type == pafs.FileType.File}
        else:
            suffixes.add(Path(inner).suffix.lower())
    formats = {_EXTENSIONS[s] for s in suffixes if s in _EXTENSIONS}
    if len(formats) != 1:
        found = ", ".join(sorted(suffixes)) or "no files"
        raise DataError(
            f"cannot tell the corpus format from {', '.join(paths)} (found {found}); "
            f"use files ending in {', '.join(_EXTENSIONS)} or set data.format"
        )
    return formats.pop()


# --------------------------------------------------------------------------- reading


def _add_row_ids(block: pd.DataFrame | pa.Table, path: str, start: int) -> pd.DataFrame | pa.Table:
    hashes = compute_row_hashes(path, start, len(block))
    if isinstance(block, pd.DataFrame):
        return block.assign(**{_ROW_ID: hashes})
    return block.append_column(_ROW_ID, pa.array(hashes, type=pa.uint64()))


def _with_row_ids(base: type[FileBasedDatasource]) -> type[FileBasedDatasource]:
    """A Ray file datasource that also emits a hash of (file path, row position) for each row."""

    class RowIdDatasource(base):  # type: ignore[misc, valid-type]
        def _read_stream(self, f: pa.NativeFile, path: str):
            position = 0
            for block in super()._read_stream(f, path):
                yield _add_row_ids(block, path, position)
                position += len(block)

    RowIdDatasource.__name__ = f"RowId{base.__name__}"
    return RowIdDatasource


def read_raw(paths: list[str], fmt: Format, text_column: str) -> ray.data.Dataset:
    """Read the corpus with Ray Data's own readers, adding the per-file row id column."""
    if fmt == "parquet":
        return ray.data.read_parquet(paths, include_row_hash=True).rename_columns({"row_hash": _ROW_ID})
    if fmt == "jsonl":
        target = ray.data.DataContext.get_current().target_max_block_size
        datasource = _with_row_ids(JsonLinesDatasource)(paths, target_output_size_bytes=target, file_extensions=None)
    elif fmt == "csv":
        # Every CSV cell is text; pin the text column's type so blocks agree on it.
        convert = pacsv.ConvertOptions(column_types={text_column: pa.string()}, strings_can_be_null=False)
        datasource = _with_row_ids(CSVDatasource)(paths, arrow_csv_args={"convert_options": convert})
    else:
        datasource = _with_row_ids(TextDatasource)(paths, drop_empty_lines=False)
    return ray.data.read_datasource(datasource)


def classify_rows(
    batch: pd.DataFrame,
    *,
    text_column: str,
    id_column: str | None,
    label_column: str | None,
    max_chars: int,
) -> pd.DataFrame:
    """Give every row an ``id`` and a ``reason`` (None when the row is usable). Pure pandas."""
    n = len(batch)
    if id_column and id_column in batch:
        ids = [None if _is_missing(v) else str(v) for v in batch[id_column]]
        ids = [i if i is not None else f"{h:016x}" for i, h in zip(ids, batch[_ROW_ID], strict=True)]
    else:
        ids = [f"{h:016x}" for h in batch[_ROW_ID]]
    raw_texts = batch[text_column] if text_column in batch else pd.Series([None] * n, index=batch.index)
    read_errors = batch[READ_ERROR] if READ_ERROR in batch else pd.Series([None] * n, index=batch.index)
    texts: list[str | None] = []
    reasons: list[str | None] = []
    for value, read_error in zip(raw_texts, read_errors, strict=True):
        reason = read_error if isinstance(read_error, str) else reject_reason(value, max_chars)
        reasons.append(reason)
        texts.append(
            value if isinstance(value, str) else (None if _is_missing(value) else json.dumps(value, default=str))
        )
    out = pd.DataFrame({"id": ids, "text": texts, "reason": reasons})
    if label_column:
        labels = batch[label_column] if label_column in batch else [None] * n
        out["gold_label"] = [None if _is_missing(v) else str(v) for v in labels]
    return out


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def reject_reason(value: Any, max_chars: int) -> str | None:
    if _is_missing(value):
        return "missing_text"
    if not isinstance(value, str):
        return "non_string_text"
    if not value:
        return "empty_text"
    if not value.strip():
        return "whitespace_text"
    if len(value) > max_chars:
        return "text_too_long"
    return None


def _first_columns(dataset: ray.data.Dataset) -> list[str] | None:
    """Column names of the first non-empty block, or None for an empty corpus (a Ray Data run)."""
    for batch in dataset.iter_batches(batch_size=1, batch_format="pandas"):
        return [c for c in batch.columns if c not in (_ROW_ID, READ_ERROR)]
    return None


#: How much of a file the column probe reads at most (JSONL: the keys of these first rows).
_PROBE_ROWS = 1000
_PROBE_BYTES = 1 << 20


class _ProbeUndecided(Exception):
    """The files alone do not tell the columns; ask Ray Data."""


def data_files(paths: list[str]) -> list[tuple[pafs.FileSystem, str]]:
    """The files behind the paths, in Ray Data's order (directories expanded, hidden files skipped)."""
    files: list[tuple[pafs.FileSystem, str]] = []
    for path in paths:
        filesystem, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.Directory:
            listing = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
            names = sorted(
                f.path for f in listing if f.type == pafs.FileType.File and not Path(f.path).name.startswith((".", "_"))
            )
            files += [(filesystem, name) for name in names]
        elif info.type == pafs.FileType.File:
            files.append((filesystem, inner))
    return files


def _file_columns(filesystem: pafs.FileSystem, path: str, fmt: Format) -> list[str] | None:
    """The columns of one file from its first rows (None when it has none)."""
    if fmt == "parquet":
        metadata = pq.read_metadata(path, filesystem=filesystem)
        return metadata.schema.names if metadata.num_rows else None
    with filesystem.open_input_stream(path, compression="detect") as stream:
        head = stream.read(_PROBE_BYTES)
    if fmt == "csv":
        if not head.strip():
            return None
        return pacsv.open_csv(pa.BufferReader(head)).schema.names
    keys: dict[str, None] = {}
    lines = head.splitlines()
    if len(head) == _PROBE_BYTES and lines:
        lines = lines[:-1]  # the last line may be cut
    rows = 0
    for line in lines:
        if not line.strip():
            continue
        value, error = parse_line(line)
        if error:
            continue  # a bad line is a rejected row, not a sign of the columns
        keys.update(dict.fromkeys(value))
        rows += 1
        if rows >= _PROBE_ROWS:
            break
    if not rows and len(head) == _PROBE_BYTES:
        raise _ProbeUndecided  # one line longer than the probe
    return list(keys) if rows else None


def probe_columns(paths: list[str], fmt: Format, raw: ray.data.Dataset) -> list[str] | None:
    """The corpus's column names from the first rows of its first non-empty file, or None if empty.

    Read straight from the files (no Ray Data execution, which would read the corpus's first
    block a second time); falls back to Ray Data when the files do not say (odd JSON).
    """
    try:
        return _probe_files(paths, fmt)
    except _ProbeUndecided:
        return _first_columns(raw)


def _probe_files(paths: list[str], fmt: Format) -> list[str] | None:
    """:func:`probe_columns` without Ray: raises ``_ProbeUndecided`` when the files do not say."""
    if fmt == "text":
        return ["text"]
    try:
        for filesystem, path in data_files(paths):
            columns = _file_columns(filesystem, path, fmt)
            if columns is not None:
                return columns
        return None
    except (OSError, pa.ArrowException):
        raise _ProbeUndecided from None


def _check_text_column(columns: list[str] | None, text_column: str, reference: str) -> None:
    if columns is not None and text_column not in columns:
        raise DataError(f"text column {text_column!r} not found in {reference}; columns found: {', '.join(columns)}")


def check_input(data: DataConfig, *, reference: str | None = None) -> None:
    """The checks :func:`read_corpus` starts with, without Ray (commands run them before starting it):
    the input exists, its format is known, the text column is there (when the files tell)."""
    reference = reference or data.input
    paths = resolve_paths(reference)
    fmt = data.format if data.format != "auto" else detect_format(paths)
    with contextlib.suppress(_ProbeUndecided):  # then read_corpus asks Ray Data
        _check_text_column(_probe_files(paths, fmt), data.text_column, reference)


@contextlib.contextmanager
def read_order(data: DataConfig) -> Iterator[None]:
    """With ``data.limit``, Ray Data keeps read order for the block: the first N rows are the same
    rows on every pass and every rerun (each labeling round, the student's scoring)."""
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    if data.limit:
        context.execution_options.preserve_order = True
    try:
        yield
    finally:
        context.execution_options.preserve_order = preserve_order


def read_corpus(data: DataConfig, *, reference: str | None = None, limit: int | None = None) -> Corpus:
    """Validate and stream the corpus named by ``data.input`` (or ``reference``).

    Fails fast when the input does not exist, its format is unknown, or the text column is absent
    from the data (the message lists the columns found).
    """
    reference = reference or data.input
    paths = resolve_paths(reference)
    fmt = data.format if data.format != "auto" else detect_format(paths)
    raw = read_raw(paths, fmt, data.text_column)
    limit = limit or data.limit
    if limit:
        raw = raw.limit(limit)
    columns = probe_columns(paths, fmt, raw)
    _check_text_column(columns, data.text_column, reference)
    classified = raw.map_batches(
        classify_rows,
        batch_format="pandas",
        fn_kwargs={
            "text_column": data.text_column,
            "id_column": data.id_column,
            "label_column": data.label_column,
            "max_chars": data.max_chars,
        },
    )
    return Corpus(reference=reference, classified=classified, columns=columns or [], has_gold=bool(data.label_column))


# --------------------------------------------------------------------------- gold sets


def read_gold(
    reference: str, label_names: list[str], *, text_column: str = "text", label_column: str = "label"
) -> pd.DataFrame:
    """Load a (small) gold set of ``text``, ``label`` and check every label against the label set."""
    data = DataConfig(input=reference, text_column=text_column, label_column=label_column)
    everything = read_corpus(data).classified.to_pandas()  # one read; a gold set is small
    bad = everything["reason"].notna() if "reason" in everything else pd.Series(dtype=bool)
    rejected = int(bad.sum())
    frame = everything[~bad].drop(columns=["reason"]).reset_index(drop=True) if len(everything) else everything
    if rejected:
        raise DataError(f"gold set {reference} has {rejected} rows without a usable text")
    if frame.empty:
        raise DataError(f"gold set {reference} is empty")
    known = set(label_names)
    for position, label in enumerate(frame["gold_label"]):
        if label not in known:
            text = frame["text"].iloc[position]
            raise DataError(
                f"gold set {reference}: unknown label {label!r} in row {position} ({text[:60]!r}); "
                f"labels are {', '.join(label_names)}"
            )
    return frame.rename(columns={"gold_label": "label"})[["id", "text", "label"]]


# --------------------------------------------------------------------------- inspection


@dataclass
class CorpusStats:
    reference: str
    rows: int
    valid: int
    rejected_by_reason: dict[str, int]
    label_distribution: dict[str, int]
    text_length_percentiles: dict[str, float]

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "rows": self.rows,
            "valid": self.valid,
            "rejected": self.rejected,
            "rejected_by_reason": self.rejected_by_reason,
            "label_distribution": self.label_distribution,
            "text_length_percentiles": self.text_length_percentiles,
        }


def inspect_corpus(data: DataConfig) -> CorpusStats:
    """Stream the corpus once and summarise it (row counts, rejections, labels, text lengths)."""
    corpus = read_corpus(data)
    reasons: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    lengths: list[np.ndarray] = []
    for batch in corpus.classified.iter_batches(batch_format="pandas", batch_size=4096):
        bad = batch["reason"].notna()
        reasons.update(batch.loc[bad, "reason"])
        good = batch[~bad]
        lengths.append(good["text"].str.len().to_numpy())
        if "gold_label" in good:
            labels.update(str(v) for v in good["gold_label"] if v is not None)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0)
    valid = int(all_lengths.size)
    percentiles = (
        {f"p{q}": float(np.percentile(all_lengths, q)) for q in (5, 50, 95, 99)} | {"max": float(all_lengths.max())}
        if valid
        else {}
    )
    return CorpusStats(
        reference=corpus.reference,
        rows=valid + sum(reasons.values()),
        valid=valid,
        rejected_by_reason=dict(sorted(reasons.items())),
        label_distribution=dict(sorted(labels.items())),
        text_length_percentiles=percentiles,
    )
