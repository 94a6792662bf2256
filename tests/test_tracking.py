"""MLflow tracking without Ray: the config key, the run and its params, records as metrics with
steps, nested runs, artifacts, all read back from a local ``file:`` store with MlflowClient."""

from __future__ import annotations

from pathlib import Path

import pytest

from llkd_ray.config import load_config
from llkd_ray.errors import ConfigError
from llkd_ray.tracking import TrackingRun, flatten, start_run, tracking_uri

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"
mlflow = pytest.importorskip("mlflow")


def test_tracking_is_off_by_default_and_a_bad_backend_names_the_key(tmp_path):
    config = load_config(CONFIG)
    assert config.tracking.backend == "none"
    assert start_run(config, tmp_path, "x") is None
    with pytest.raises(ConfigError, match=r"tracking\.backend"):
        load_config(CONFIG, ["tracking.backend=wandb"])


def test_the_uri_comes_from_the_config_then_the_environment_then_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(CONFIG, ["tracking.backend=mlflow"])
    assert tracking_uri(config, tmp_path) == (tmp_path.resolve() / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking_uri(config, tmp_path) == "http://tracker:5000"
    config = load_config(CONFIG, ["tracking.backend=mlflow", f"tracking.uri={tmp_path / 'store'}"])
    assert tracking_uri(config, tmp_path) == (tmp_path / "store").resolve().as_uri()


def test_a_run_with_params_step_and_eval_metrics_nested_runs_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(CONFIG, ["tracking.backend=mlflow", "tracking.experiment=unit"])
    parent = start_run(config, tmp_path, "bench")
    child = start_run(config, tmp_path, "llkd-seed0", parent=parent, tags={"llkd.seed": "0"})
    assert isinstance(child, TrackingRun) and TrackingRun.from_dict(child.to_dict()) == child
    for step in (1, 2):
        child.log_record(
            {
                "step": step,
                "loss": 1.0 / step,
                "selected_fraction": 0.5,
                "teacher_thresholds": {"negative": 0.6, "positive": 0.7},
                "student_thresholds": {"negative": 0.5, "positive": 0.4},
                "compute": {"flops": 1e9 * step, "all_passes": 0.1 * step},
                "data_usage": {"pool_fraction": 0.01},
            }
        )
    child.log_record({"kind": "eval", "step": 2, "accuracy": 0.8, "macro_f1": 0.75, "flops": 2e9, "all_passes": 0.2})
    child.log_record({"kind": "resume", "step": 1, "attempt": 1})  # not a metric
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    child.log_artifacts([tmp_path / "summary.json", tmp_path / "student", tmp_path / "missing.json"])
    child.end()
    parent.end()

    client = mlflow.MlflowClient(tracking_uri=parent.uri)
    run = client.get_run(child.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params["selection.strategy"] == config.selection.strategy
    assert run.data.params["task.labels"].startswith("[{")
    assert [(m.step, m.value) for m in client.get_metric_history(child.run_id, "loss")] == [(1, 1.0), (2, 0.5)]
    assert [m.value for m in client.get_metric_history(child.run_id, "teacher_threshold/positive")] == [0.7, 0.7]
    assert [(m.step, m.value) for m in client.get_metric_history(child.run_id, "gold_macro_f1")] == [(2, 0.75)]
    assert [m.value for m in client.get_metric_history(child.run_id, "gold_compute_all_passes")] == [0.2]
    assert {a.path for a in client.list_artifacts(child.run_id)} == {"summary.json", "student"}


def test_flatten_keeps_lists_as_values():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
