"""The benchmark's inputs: a built-in or custom data set, sampled and written with explicit ids.

The pool and the gold set are sampled once (``--pool-size``, ``--gold-size``, a fixed seed) and
written as JSONL under ``OUTPUT/work/data/``; every row gets an ``id`` so the teacher's labels and
the gold labels join exactly. Label descriptions come from YAML in any of three shapes
(:func:`read_label_specs`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llkd_ray.artifacts import read_jsonl, write_text
from llkd_ray.config import LabelSpec, PipelineConfig, validate_config
from llkd_ray.errors import ConfigError, DataError

#: Built-in data sets: pool and gold splits, label descriptions from the shipped configs.
BUILTIN_DATASETS = {"sst2": "demo.yaml", "trec": "trec.yaml"}


def read_label_specs(path: str | Path) -> list[LabelSpec]:
    """Label names and descriptions from YAML, in any of three shapes.

    A mapping ``name: description``; a list of ``{name, description[, verbalizer]}``; or a file with
    a ``labels`` list at its top or under ``task`` (so a pipeline config works as is).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label descriptions not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"label descriptions {path} are not valid YAML: {error}") from None
    if isinstance(raw, dict) and isinstance(raw.get("task"), dict):
        raw = raw["task"]
    if isinstance(raw, dict) and "labels" in raw:
        raw = raw["labels"]
    if isinstance(raw, dict):
        raw = [{"name": str(name), "description": description} for name, description in raw.items()]
    if not isinstance(raw, list):
        raise DataError(
            f"label descriptions {path}: expected a mapping of label name to description "
            "or a list of {name, description}"
        )
    task = _validated({"task": {"labels": raw}, "data": {"input": "unused"}}, str(path))
    return task.task.labels


def _validated(raw: dict[str, Any], source: str) -> PipelineConfig:
    try:
        return validate_config(raw, source)
    except ConfigError as error:
        raise DataError(str(error)) from None


def _read_rows(path: Path, what: str) -> list[dict[str, Any]]:
    """The rows of a pool or gold JSONL file, each with a non-empty ``text``."""
    rows = read_jsonl(path, strict=True, what=what)
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{what} {path} row {number} has no usable 'text'")
    if not rows:
        raise DataError(f"{what} {path} is empty")
    return rows


def _resolve_file(reference: str) -> Path:
    from llkd_ray.corpus import builtin_path

    path = builtin_path(reference) if reference.startswith("builtin:") else Path(reference).expanduser()
    if not path.is_file():
        raise DataError(f"not found: {reference}")
    return path


def dataset_name(dataset: str | None, pool: str | None) -> str:
    """``sst2`` for ``builtin:sst2``; a custom pool's file stem (its folder's name for ``train``/``pool``)."""
    if dataset:
        return dataset.removeprefix("builtin:")
    path = Path(pool or "custom")
    return path.parent.name if path.stem in ("train", "pool") and path.parent.name else path.stem


@dataclass
class BenchData:
    """The benchmark's inputs, sampled and written to the work directory with explicit ids."""

    name: str
    labels: list[LabelSpec]
    pool_path: Path
    gold_path: Path
    pool_rows: int
    gold_rows: int
    pool_has_labels: bool
    gold_labels: dict[str, str] = field(repr=False)
    pool_labels: dict[str, str] = field(repr=False)
    source: dict[str, str] = field(default_factory=dict)


def prepare_data(
    *,
    dataset: str | None,
    pool: str | None,
    gold: str | None,
    labels_file: str | None,
    pool_size: int | None,
    gold_size: int | None,
    sample_seed: int,
    directory: Path,
) -> BenchData:
    """Resolve the data set, sample the pool (and the gold set when asked) and write both as JSONL.

    Every row gets an ``id`` (``p…`` / ``g…``) so teacher labels and gold labels join exactly.
    """
    if dataset:
        if pool or gold or labels_file:
            raise ConfigError("give either --dataset builtin:NAME or --pool, --gold and --labels, not both")
        name = dataset_name(dataset, None)
        if name not in BUILTIN_DATASETS:
            raise ConfigError(
                f"unknown data set {dataset!r}; built-in: {', '.join('builtin:' + n for n in BUILTIN_DATASETS)}"
            )
        pool, gold = f"builtin:{name}/train", f"builtin:{name}/test"
        label_specs = read_label_specs(Path(__file__).parents[1] / "configs" / BUILTIN_DATASETS[name])
    else:
        missing = [flag for flag, value in (("--pool", pool), ("--gold", gold), ("--labels", labels_file)) if not value]
        if missing:
            raise ConfigError(f"custom data needs {', '.join(missing)} (or use --dataset builtin:sst2|builtin:trec)")
        assert pool and gold and labels_file
        name = dataset_name(None, pool)
        label_specs = read_label_specs(labels_file)
    names = [label.name for label in label_specs]
    pool_all = _read_rows(_resolve_file(pool), "pool")
    gold_all = _read_rows(_resolve_file(gold), "gold set")
    _check_labels(gold_all, names, "gold set", gold, required=True)
    pool_has_labels = all("label" in row for row in pool_all)
    if pool_has_labels:
        _check_labels(pool_all, names, "pool", pool, required=False)
    rng = random.Random(sample_seed)
    pool_rows = _sample(pool_all, pool_size, rng)
    gold_rows = _sample(gold_all, gold_size, rng)
    directory.mkdir(parents=True, exist_ok=True)
    pool_path, gold_path = directory / "pool.jsonl", directory / "gold.jsonl"
    pool_labels = _write_with_ids(pool_path, pool_rows, "p", keep_label=pool_has_labels)
    gold_labels = _write_with_ids(gold_path, gold_rows, "g", keep_label=True)
    return BenchData(
        name=name,
        labels=label_specs,
        pool_path=pool_path,
        gold_path=gold_path,
        pool_rows=len(pool_rows),
        gold_rows=len(gold_rows),
        pool_has_labels=pool_has_labels,
        gold_labels=gold_labels,
        pool_labels=pool_labels,
        source={"pool": pool, "gold": gold, "pool_total": str(len(pool_all)), "gold_total": str(len(gold_all))},
    )


def _check_labels(rows: list[dict[str, Any]], names: list[str], what: str, reference: str, *, required: bool) -> None:
    known = set(names)
    for number, row in enumerate(rows, 1):
        label = row.get("label")
        if label is None and not required:
            continue
        if label is None or str(label) not in known:
            raise DataError(f"{what} {reference} row {number}: label {label!r} is not one of {', '.join(names)}")


def _sample(rows: list[dict[str, Any]], size: int | None, rng: random.Random) -> list[dict[str, Any]]:
    if size is None or size >= len(rows):
        return list(rows)
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), size))]


def _write_with_ids(path: Path, rows: list[dict[str, Any]], prefix: str, *, keep_label: bool) -> dict[str, str]:
    """Write ``rows`` as JSONL with ids ``PREFIX000000``, ...; return the labels by id (when kept)."""
    written = [
        {"id": f"{prefix}{position:06d}", "text": row["text"], **({"label": str(row["label"])} if keep_label else {})}
        for position, row in enumerate(rows)
    ]
    write_text(path, "".join(json.dumps(row) + "\n" for row in written))
    return {row["id"]: row["label"] for row in written} if keep_label else {}
