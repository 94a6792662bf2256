"""What the report reads from a run directory: :class:`RunData`, loaded by :func:`load_run`.

Missing inputs load as empty (or ``None``) so the plots and the page can leave them out; only a
missing run directory is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llkd_ray.artifacts import MANIFEST, RunLayout, read_json, read_jsonl, read_label_rows
from llkd_ray.errors import LlkdError


@dataclass
class RunData:
    """Everything the report reads from one run directory (empty or ``None`` where it is missing)."""

    root: Path
    steps: list[dict[str, Any]]
    gold_evals: list[dict[str, Any]]
    evaluation: dict[str, Any]
    summary: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    labels: Any  # pandas.DataFrame | None
    selected_ids: set[str] | None
    label_names: list[str]
    label_manifest: dict[str, Any] = field(default_factory=dict)


def load_run(run_dir: str | Path) -> RunData:
    layout = RunLayout(Path(run_dir))
    if not layout.root.is_dir():
        raise LlkdError(f"run directory not found: {layout.root}")
    records = read_jsonl(layout.metrics)
    steps = _last_per_step(r for r in records if r.get("kind", "step") == "step")
    gold_evals = _last_per_step(r for r in records if r.get("kind") == "eval")
    evaluation = read_json(layout.eval_json) or {}
    summary = read_json(layout.training_summary) or {}
    stages = {p.stem: read_json(p) or {} for p in sorted(layout.stages.glob("*.json"))}
    labels = None
    if layout.labels.is_dir():
        try:
            labels = read_label_rows(layout.labels)
        except LlkdError:
            labels = None
    selected_ids = None
    if layout.selected_ids.is_file():
        import pyarrow.parquet as pq

        selected_ids = {str(v) for v in pq.read_table(layout.selected_ids, columns=["id"]).column("id").to_pylist()}
    names = evaluation.get("labels") or _label_names_from_config(layout.config) or []
    manifest = read_json(layout.labels / MANIFEST) or {}
    return RunData(layout.root, steps, gold_evals, evaluation, summary, stages, labels, selected_ids, names, manifest)


def _last_per_step(records) -> list[dict[str, Any]]:
    """One record per step, the latest: a training attempt restored from a checkpoint re-records
    the steps after it."""
    latest = {record.get("step"): record for record in records}
    return [latest[step] for step in sorted(latest, key=lambda step: (step is None, step or 0))]


def _label_names_from_config(path: Path) -> list[str] | None:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
        return [label["name"] for label in raw["task"]["labels"]]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
