"""What the stages leave on disk, and the one way to read and write it.

- :class:`RunLayout` — where each stage of a run directory writes (``llkd run``, ``llkd demo``);
- the **labels directory** (``llkd label``): its accepted rows are the top-level
  ``part-*.parquet`` files; ``rejected/``, ``_manifest.json`` and other ``_*``/``.*`` files are not
  rows. :func:`label_files` lists them; :func:`read_label_table` / :func:`read_label_rows` read
  them (training, the pipeline, the report, the benchmark and ``label.scan.read_labels`` all go through
  :func:`label_files`);
- JSON and JSONL documents and :func:`atomic_output`, the one atomic writer (a temporary name in
  the same directory, then a rename: a reader sees all of a file or none of it);
- :func:`stable_hash`, the short hash of a JSON-able payload every config and cache key uses.

Decided here:

- **Paths or URIs.** The labels readers and the JSON readers and writers take a local path or a
  URI pyarrow reaches (``s3://...``): a labels directory on object storage reads like a local one.
  JSONL (the trainer's metrics, the benchmark's inputs) is local.
- **Lenient readers by default.** A missing or unparsable JSON document reads as ``None`` and a
  JSONL line cut short by an interrupted run is skipped: the report and the stage markers describe
  what is there. ``strict=True`` raises :class:`~llkd_ray.errors.DataError` instead, for inputs a
  stage cannot do without.
- **The hash keeps its values.** ``sha256`` of the sorted-key JSON, first 16 hex digits; values
  that are not JSON (paths) hash as their ``str``. Stage markers, label manifests and the
  benchmark's run keys written before this module existed still match.

No Ray, no torch; pyarrow is imported where a file is read or written, so importing the config
(which hashes through this module) stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llkd_ray.errors import DataError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.fs as pafs

#: Stages of a run, in order, each recorded by a marker. ``serve`` may follow them: it runs only
#: when asked for and is never skipped or recorded (it blocks until interrupted).
STAGES = ("label", "train", "evaluate", "report")

#: A labels directory: its manifest, its rejected rows' folder, the prefix of its Parquet parts.
MANIFEST = "_manifest.json"
REJECTED_DIR = "rejected"
PART_PREFIX = "part-"
#: The training stage's summary, next to the student (``RUN/train/``); serving shows it.
TRAINING_SUMMARY = "training_summary.json"

Reference = str | Path


# --------------------------------------------------------------------------- the run directory


@dataclass(frozen=True)
class RunLayout:
    """Where each stage writes inside a run directory (see :mod:`llkd_ray.pipeline.run`)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def rounds(self) -> Path:
        """Student-guided labeling rounds (``labeling``): ``round-K/`` each, and ``rounds.json``."""
        return self.root / "rounds"

    def round_dir(self, index: int) -> Path:
        return self.rounds / f"round-{index}"

    @property
    def rounds_json(self) -> Path:
        return self.rounds / "rounds.json"

    @property
    def tracking(self) -> Path:
        """The MLflow run of the latest ``llkd run`` (``tracking.backend: mlflow``): uri and run id."""
        return self.root / "tracking.json"

    @property
    def logs(self) -> Path:
        """Ray's own logs of the run (``llkd_ray.console``), unless ``--verbose``."""
        return self.root / "logs"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def student(self) -> Path:
        return self.train / "student"

    @property
    def metrics(self) -> Path:
        return self.train / "metrics.jsonl"

    @property
    def training_summary(self) -> Path:
        return self.train / TRAINING_SUMMARY

    @property
    def selected_ids(self) -> Path:
        return self.train / "selected_ids.parquet"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def teacher_gold(self) -> Path:
        return self.eval_dir / "teacher_gold"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_index(self) -> Path:
        return self.report / "index.html"

    @property
    def stages(self) -> Path:
        return self.root / "_stages"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def outputs(self, stage: str) -> list[Path]:
        """The paths a stage writes (removed before the stage is redone from scratch)."""
        return {
            "label": [self.labels, self.rounds],
            "train": [self.train],
            "evaluate": [self.eval_dir, self.eval_json],
            "report": [self.report],
        }[stage]

    def complete(self, stage: str) -> bool:
        """Whether the outputs a finished stage leaves behind are all there."""
        checks = {
            "label": [self.labels],
            "train": [self.student / "config.json"],
            "evaluate": [self.eval_json],
            "report": [self.report_index],
        }[stage]
        return all(path.exists() for path in checks)


# --------------------------------------------------------------------------- files, local or remote


def resolve(reference: Reference) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path (made absolute) or a URI."""
    import pyarrow.fs as pafs

    reference = str(reference)
    if "://" in reference:
        return pafs.FileSystem.from_uri(reference)
    return pafs.LocalFileSystem(), str(Path(reference).expanduser().resolve())


def _located(reference: Reference, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """``reference`` on ``filesystem`` as given, or resolved when no filesystem is."""
    return (filesystem, str(reference)) if filesystem is not None else resolve(reference)


def is_temporary(name: str) -> bool:
    """A file :func:`atomic_output` has not renamed into place (yet, or ever: its writer died)."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_output(path: Reference, filesystem: pafs.FileSystem | None = None) -> Iterator[pa.NativeFile]:
    """A stream whose bytes appear at ``path`` all at once when the block ends without error.

    They go to ``.NAME.<random>.tmp`` in the same directory, renamed into place at the end; a
    retried writer rewrites the whole file. On an error the temporary file is removed.
    """
    fs, final = _located(path, filesystem)
    directory, _, name = final.rpartition("/")
    fs.create_dir(directory, recursive=True)
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(temporary) as stream:
            yield stream
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(temporary)
        raise
    fs.move(temporary, final)


def write_text(path: Reference, text: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_output(path, filesystem) as stream:
        stream.write(text.encode("utf-8"))


def write_json(path: Reference, payload: Any, filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``payload`` as indented JSON atomically (values that are not JSON as their ``str``)."""
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n", filesystem)


def _read_bytes(path: Reference, filesystem: pafs.FileSystem | None) -> bytes | None:
    import pyarrow.fs as pafs

    fs, located = _located(path, filesystem)
    if fs.get_file_info(located).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(located) as stream:
        return stream.read()


def read_json(path: Reference, filesystem: pafs.FileSystem | None = None, *, strict: bool = False) -> Any:
    """The JSON document at ``path``; ``None`` when there is none or (unless ``strict``) it does not parse."""
    raw = _read_bytes(path, filesystem)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as error:
        if strict:
            raise DataError(f"{path} is not valid JSON: {error}") from None
        return None


def read_jsonl(path: Reference, *, strict: bool = False, what: str = "file") -> list[Any]:
    """The records of a JSONL file (``[]`` when there is none), blank lines skipped.

    A line that does not parse is skipped (a record cut short by an interrupted run) or, with
    ``strict``, a :class:`DataError` naming ``what``, the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if strict:
                    raise DataError(f"{what} {path} line {number} is not JSON: {error.msg}") from None
    return records


def training_summary_file(model_dir: Reference) -> Path | None:
    """The training summary of a model directory: in it (an export) or next to it (``RUN/train/``)."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / TRAINING_SUMMARY, model_dir.parent / TRAINING_SUMMARY):
        if candidate.is_file():
            return candidate
    return None


def stable_hash(payload: Any) -> str:
    """Short stable hash of a JSON-able payload: 16 hex digits of the SHA-256 of its sorted-key JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the labels directory


def is_label_part(name: str) -> bool:
    """A Parquet part of labeled (or, under ``rejected/``, rejected) rows, by its file name."""
    return name.startswith(PART_PREFIX) and name.endswith(".parquet")


def label_files(directory: Reference) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the sorted paths of a labels directory's accepted-row parts.

    Only top-level ``part-*.parquet`` files count; ``[]`` when the directory is missing.
    """
    import pyarrow.fs as pafs

    fs, root = resolve(directory)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return fs, []
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    parts = (e.path for e in entries if e.type == pafs.FileType.File and is_label_part(Path(e.path).name))
    return fs, sorted(parts)


def read_label_table(directory: Reference, columns: list[str] | None = None) -> pa.Table:
    """The accepted rows of a labels directory (``columns`` only, when given) as one Arrow table."""
    import pyarrow.parquet as pq

    fs, parts = label_files(directory)
    if not parts:
        raise DataError(f"no labeled rows in {directory}")
    return pq.read_table(parts, columns=columns, filesystem=fs)


def read_label_rows(directory: Reference, columns: list[str] | None = None) -> pd.DataFrame:
    """The accepted rows of a labels directory as a pandas DataFrame."""
    return read_label_table(directory, columns).to_pandas()


# --------------------------------------------------------------------------- recorded numbers


def percent(value: Any, missing: str = "n/a") -> str:
    """A fraction as ``12.3%``; ``missing`` for anything that is not a number (None, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return missing
    return f"{100 * value:.1f}%"
