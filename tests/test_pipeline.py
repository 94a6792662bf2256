"""Pipeline orchestration: stage markers, skip on the same config hash, resume, --force, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llkd_ray.artifacts import STAGES, RunLayout
from llkd_ray.config import load_config
from llkd_ray.errors import ConfigError
from llkd_ray.pipeline import run as pipeline
from llkd_ray.pipeline.run import plan_stages, run_pipeline

ROOT = Path(__file__).resolve().parent.parent


class FakeStages:
    """Stand-ins for the four stages that write their outputs and count their calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_in: str | None = None
        self.seen_existing: dict[str, bool] = {}

    def __call__(self, name: str):
        def stage(run: pipeline.StageRun) -> dict:
            layout = run.layout
            self.calls.append(name)
            outputs = {
                "label": layout.labels,
                "train": layout.train,
                "evaluate": layout.eval_dir,
                "report": layout.report,
            }
            self.seen_existing[name] = outputs[name].exists()
            outputs[name].mkdir(parents=True, exist_ok=True)
            (outputs[name] / "partial").write_text("x")
            if self.fail_in == name:
                raise RuntimeError(f"{name} died")
            if name == "train":
                (layout.student).mkdir(parents=True, exist_ok=True)
                (layout.student / "config.json").write_text("{}")
            elif name == "evaluate":
                layout.eval_json.write_text(
                    json.dumps(
                        {"teacher": {"accuracy": 0.7, "macro_f1": 0.69}, "student": {"accuracy": 0.8, "macro_f1": 0.79}}
                    )
                )
            elif name == "report":
                layout.report_index.write_text("<html></html>")
            return {"rows": 3}

        return stage


@pytest.fixture
def fake(monkeypatch) -> FakeStages:
    stages = FakeStages()
    monkeypatch.setattr(pipeline, "STAGE_FUNCTIONS", {name: stages(name) for name in STAGES})
    monkeypatch.setattr("llkd_ray.runtime.ensure_ray", lambda *a, **k: None)
    return stages


@pytest.fixture
def config():
    return load_config(ROOT / "configs" / "quick.yaml")


def statuses(result) -> dict[str, str]:
    return {name: record.status for name, record in result.stages.items()}


def test_first_run_runs_every_stage_then_everything_is_skipped(fake, config, tmp_path):
    first = run_pipeline(config, tmp_path, log=lambda _: None)
    assert fake.calls == list(STAGES)
    assert set(statuses(first).values()) == {"ran"}
    for stage in STAGES:
        marker = json.loads((tmp_path / "_stages" / f"{stage}.json").read_text())
        assert marker["status"] == "done"
        assert marker["hash"] == config.section_hash(*pipeline.STAGE_SECTIONS[stage])
        assert marker["wall_s"] >= 0
    assert (tmp_path / "config.yaml").is_file()
    assert first.eval["student"]["accuracy"] == 0.8
    assert not list(tmp_path.rglob("*.tmp")), "markers are written through a temporary file and a rename"

    fake.calls.clear()
    second = run_pipeline(config, tmp_path, log=lambda _: None)
    assert fake.calls == []
    assert set(statuses(second).values()) == {"skipped"}
    assert second.eval == first.eval


def test_a_changed_section_reruns_the_stages_that_depend_on_it(fake, config, tmp_path):
    run_pipeline(config, tmp_path, log=lambda _: None)
    fake.calls.clear()
    config.training.learning_rate = 1e-4
    result = run_pipeline(config, tmp_path, log=lambda _: None)
    assert fake.calls == ["train", "evaluate", "report"]
    assert statuses(result)["label"] == "skipped"

    fake.calls.clear()
    config.teacher.embedding.temperature = 0.1
    run_pipeline(config, tmp_path, log=lambda _: None)
    assert fake.calls == list(STAGES)

    fake.calls.clear()
    config.serving.port = 9000  # no recorded stage depends on serving
    run_pipeline(config, tmp_path, log=lambda _: None)
    assert fake.calls == []


@pytest.mark.parametrize("stage", STAGES)
def test_force_redoes_the_stage_and_every_later_one(fake, config, tmp_path, stage):
    run_pipeline(config, tmp_path, log=lambda _: None)
    fake.calls.clear()
    result = run_pipeline(config, tmp_path, force=stage, log=lambda _: None)
    expected = list(STAGES[STAGES.index(stage) :])
    assert fake.calls == expected
    assert all(statuses(result)[s] == "skipped" for s in STAGES if s not in expected)
    # a forced stage starts from an empty output directory
    assert not any(fake.seen_existing[s] for s in expected)


def test_force_unknown_stage_is_a_config_error(config, tmp_path):
    with pytest.raises(ConfigError, match="unknown stage"):
        plan_stages(config, RunLayout(tmp_path), force="deploy")


def test_interrupted_label_stage_is_resumed_in_place(fake, config, tmp_path):
    fake.fail_in = "label"
    with pytest.raises(RuntimeError, match="label died"):
        run_pipeline(config, tmp_path, log=lambda _: None)
    marker = json.loads((tmp_path / "_stages" / "label.json").read_text())
    assert marker["status"] == "running"
    assert plan_stages(config, RunLayout(tmp_path))["label"] == "resume"

    fake.fail_in = None
    fake.calls.clear()
    result = run_pipeline(config, tmp_path, log=lambda _: None)
    assert fake.calls == list(STAGES)
    assert statuses(result)["label"] == "resumed"
    assert fake.seen_existing["label"], "labeling resumes its committed output, it is not wiped"


def test_interrupted_train_stage_starts_over_and_keeps_the_labels(fake, config, tmp_path):
    fake.fail_in = "train"
    with pytest.raises(RuntimeError, match="train died"):
        run_pipeline(config, tmp_path, log=lambda _: None)
    fake.fail_in = None
    fake.calls.clear()
    result = run_pipeline(config, tmp_path, log=lambda _: None)
    assert fake.calls == ["train", "evaluate", "report"]
    assert statuses(result)["label"] == "skipped"
    assert not fake.seen_existing["train"], "a half-written training output is removed first"


def test_missing_output_reruns_the_stage_and_those_after_it(fake, config, tmp_path):
    run_pipeline(config, tmp_path, log=lambda _: None)
    (tmp_path / "eval.json").unlink()
    fake.calls.clear()
    run_pipeline(config, tmp_path, log=lambda _: None)
    assert fake.calls == ["evaluate", "report"]


def test_a_config_change_in_an_interrupted_label_stage_starts_it_over(fake, config, tmp_path):
    fake.fail_in = "label"
    with pytest.raises(RuntimeError):
        run_pipeline(config, tmp_path, log=lambda _: None)
    config.data.limit = 100
    assert plan_stages(config, RunLayout(tmp_path))["label"] == "run"


def test_summary_table_names_teacher_student_usage_times_and_report(fake, config, tmp_path):
    result = run_pipeline(config, tmp_path, log=lambda _: None)
    result.eval["data_usage"] = {"pool_fraction": 0.25, "sample_step_fraction": 0.125}
    table = pipeline.format_summary(result, total_s=12.0)
    assert "teacher" in table and "student" in table
    assert "0.700" in table and "0.790" in table
    assert "25.0%" in table and "12.5%" in table
    for stage in STAGES:
        assert stage in table
    assert str(tmp_path / "report" / "index.html") in table


def test_cli_run_demo_and_report_wiring(fake, monkeypatch, tmp_path, capsys):
    from llkd_ray.cli import main

    assert main(["run", "--config", str(ROOT / "configs" / "quick.yaml"), "--output", str(tmp_path / "run")]) == 0
    assert fake.calls == list(STAGES)
    assert "Report:" in capsys.readouterr().out

    fake.calls.clear()
    assert main(["demo", "--quick", "--output", str(tmp_path / "demo"), "--set", "training.max_steps=5"]) == 0
    assert fake.calls == list(STAGES)
    saved = (tmp_path / "demo" / "config.yaml").read_text()
    assert "max_steps: 5" in saved and "limit: 500" in saved, "the demo uses the packaged quick config"

    with pytest.raises(SystemExit):  # argparse refuses an unknown stage
        main(["run", "--config", str(ROOT / "configs" / "quick.yaml"), "--force", "nope"])


def test_packaged_demo_configs_are_valid_and_quick_is_small():
    demo = pipeline.demo_config(quick=False)
    quick = pipeline.demo_config(quick=True)
    assert demo.teacher.backend == quick.teacher.backend == "embedding"
    assert demo.student.model == quick.student.model == "builtin:minilm"
    assert quick.data.limit and quick.data.limit <= 600
    assert quick.training.max_steps and quick.training.max_steps <= 60
    assert quick.data.gold and demo.data.gold
    # the top-level configs/ is the packaged directory
    assert (ROOT / "configs" / "quick.yaml").resolve() == (ROOT / "llkd_ray" / "configs" / "quick.yaml").resolve()


def test_serve_runs_after_the_stages_with_the_summary_printed_first(fake, monkeypatch, config, tmp_path):
    events: list[str] = []
    monkeypatch.setattr(pipeline, "serve_stage", lambda run: events.append(f"serve {run.layout.student}"))
    run_pipeline(config, tmp_path, serve=True, log=lambda line: events.append(line.splitlines()[0]))
    assert fake.calls == list(STAGES)
    assert events[-1] == f"serve {tmp_path / 'train' / 'student'}"
    assert events[-2].startswith("Gold set:"), "the table comes before the server blocks"

    events.clear()
    fake.calls.clear()
    run_pipeline(config, tmp_path, serve=True, log=lambda line: events.append(line.splitlines()[0]))
    assert fake.calls == [] and events[-1].startswith("serve "), "a finished run is served without redoing stages"
