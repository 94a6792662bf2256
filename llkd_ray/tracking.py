"""Experiment tracking in MLflow (``tracking.backend: mlflow``; see docs/tracking.md).

One MLflow run per ``llkd run`` / ``llkd train`` (nested runs per strategy and seed under one
parent in ``llkd bench quality``): the resolved config as params, the per-step records and the
gold-set curve of ``metrics.jsonl`` as metrics (``step`` = optimizer step; compute spent is logged
next to them, so the UI can plot against either), the student, ``training_summary.json``,
``eval.json`` and the report as artifacts.

Decisions:

- Plain ``mlflow.MlflowClient`` with explicit run ids, no fluent (process-global) active run: the
  driver creates and ends the run and logs params and artifacts; rank 0 inside the Ray Train
  workers logs the metrics to the same run by id (:class:`TrackingRun` travels in the loop config).
- ``mlflow-skinny`` is enough (the ``tracking`` extra): no server, no SQL dependencies. Its local
  ``file:`` store is the offline default; MLflow 3.18 keeps that store behind
  ``MLFLOW_ALLOW_FILE_STORE=true``, which we set for ``file:`` URIs only.
- The tracking URI: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``file:RUN/mlruns``
  (absolute). On a cluster the workers must reach it: a server, or a file store every node sees.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llkd_ray.config import PipelineConfig
from llkd_ray.errors import ConfigError

MLRUNS = "mlruns"
_PARAM_LIMIT = 6000  # MLflow's longest param value
_BATCH = 100  # params per log_batch call
_UNSAFE = re.compile(r"[^0-9A-Za-z_\-./ ]")


@dataclass(frozen=True)
class TrackingRun:
    """An open MLflow run: where it lives and its id (plain strings, so Ray can ship it)."""

    uri: str
    run_id: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @staticmethod
    def from_dict(payload: dict[str, str] | None) -> TrackingRun | None:
        return TrackingRun(**payload) if payload else None

    def client(self) -> Any:
        return _client(self.uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics at ``step`` (one ``log_batch``); None values are left out."""
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(_key(k), float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self.client().log_batch(self.run_id, metrics=batch)

    def log_record(self, record: dict[str, Any]) -> None:
        """A ``metrics.jsonl`` record: a step's loss, selection and compute, or a gold-set evaluation."""
        if record.get("kind") == "eval":
            self.log_metrics(eval_metrics(record), int(record["step"]))
        elif "kind" not in record and "step" in record:
            self.log_metrics(step_metrics(record), int(record["step"]))

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Files (at the root) and directories (under their name) that exist."""
        client = self.client()
        for path in map(Path, paths):
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                client.log_artifact(self.run_id, str(path))

    def end(self, failed: bool = False) -> None:
        self.client().set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def ending(run: TrackingRun | None) -> Iterator[TrackingRun | None]:
    """Ends ``run`` (when there is one) as the block leaves: FAILED on any exception, interrupts
    included, FINISHED otherwise — so no command leaves an MLflow run marked running."""
    try:
        yield run
    except BaseException:
        if run is not None:
            run.end(failed=True)
        raise
    if run is not None:
        run.end()


def step_metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """What a step record contributes: loss, learning rate, selected fraction, thresholds, compute."""
    compute = record.get("compute") or {}
    usage = record.get("data_usage") or {}
    metrics: dict[str, float | None] = {
        "loss": record.get("loss"),
        "lr": record.get("lr"),
        "selected_fraction": record.get("selected_fraction"),
        "progress": record.get("progress"),
        "compute_flops": compute.get("flops"),
        "compute_all_passes": compute.get("all_passes"),
        "pool_fraction": usage.get("pool_fraction"),
    }
    for side in ("teacher", "student"):
        for label, value in (record.get(f"{side}_thresholds") or {}).items():
            metrics[f"{side}_threshold/{label}"] = value
    return metrics


def eval_metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """A gold-set evaluation: accuracy, macro-F1, per-class F1, and the compute spent when it ran."""
    metrics: dict[str, float | None] = {
        "gold_accuracy": record.get("accuracy"),
        "gold_macro_f1": record.get("macro_f1"),
        "gold_compute_flops": record.get("flops"),
        "gold_compute_all_passes": record.get("all_passes"),
    }
    for label, value in (record.get("per_class_f1") or {}).items():
        metrics[f"gold_f1/{label}"] = value
    return metrics


def tracking_uri(config: PipelineConfig, run_dir: Path) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``file:RUN_DIR/mlruns`` (absolute)."""
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return (Path(run_dir).resolve() / MLRUNS).as_uri()
    if "://" not in uri and not uri.startswith("file:"):  # a bare path is a file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def start_run(
    config: PipelineConfig,
    run_dir: Path,
    name: str,
    *,
    parent: TrackingRun | None = None,
    tags: dict[str, str] | None = None,
) -> TrackingRun | None:
    """Open an MLflow run (nested under ``parent``) with the resolved config as params; None when
    ``tracking.backend`` is ``none``."""
    if config.tracking.backend == "none":
        return None
    uri = parent.uri if parent else tracking_uri(config, run_dir)
    client = _client(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.tracking.experiment)
    run_tags = dict(tags or {}) | ({"mlflow.parentRunId": parent.run_id} if parent else {})
    run = client.create_run(experiment_id, run_name=name, tags=run_tags)
    from mlflow.entities import Param

    params = [Param(_key(k), str(v)[:_PARAM_LIMIT]) for k, v in flatten(config.model_dump(mode="json")).items()]
    for start in range(0, len(params), _BATCH):
        client.log_batch(run.info.run_id, params=params[start : start + _BATCH])
    return TrackingRun(uri, run.info.run_id)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _client(uri: str) -> Any:
    try:
        import mlflow
    except ImportError as error:
        raise ConfigError(
            "tracking.backend: mlflow needs MLflow: pip install 'llkd-ray[tracking]' (mlflow-skinny)"
        ) from error
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return mlflow.MlflowClient(tracking_uri=uri)


def _key(name: str) -> str:
    return _UNSAFE.sub("_", name)


def _now_ms() -> int:
    return int(time.time() * 1000)
