"""Ray jobs: a real local head (token auth on) runs jobs/pipeline.py with the quick demo config.

The head, the Job Submission SDK client and the job run in a subprocess (tests/scenarios.py), away
from the local Ray this test session holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scenarios import SCENARIO_ROWS, run_scenario, small_data

ROOT = Path(__file__).resolve().parent.parent
JOBS = ("label", "train", "serve", "pipeline")


@pytest.mark.parametrize("job", JOBS)
def test_job_entry_points_parse_their_arguments(job):
    """Every job script runs standalone (imports resolve from the working dir) and documents its flags."""
    done = subprocess.run(
        [sys.executable, f"jobs/{job}.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--config" in done.stdout


def test_job_reports_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {labels: []}\n")
    done = subprocess.run(
        [sys.executable, "jobs/pipeline.py", "--config", str(bad), "--output", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "llkd job: error:" in done.stderr


@pytest.mark.heavy
@pytest.mark.timeout(700)
def test_pipeline_job_submitted_to_a_local_head(tmp_path):
    output = tmp_path / "run"
    outcome = run_scenario("job-submission", output, "training.max_steps=12", *small_data(tmp_path))
    assert outcome["status"] == "SUCCEEDED", outcome["_log"]
    assert outcome["unauthenticated_status"] in (401, 403), "token auth stays on: no token, no access"
    assert not outcome["head_alive"], "the head is stopped at the end"

    evaluation = json.loads((output / "eval.json").read_text())
    assert evaluation["gold_rows"] == SCENARIO_ROWS  # the job took the submitted overrides
    for who in ("teacher", "student"):
        metrics = evaluation[who]
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert 0.0 <= metrics["macro_f1"] <= 1.0
        # the same numbers computed another way: from the confusion matrix and the per-class report
        matrix = metrics["confusion"]["matrix"]
        assert sum(map(sum, matrix)) == metrics["n"] == evaluation["gold_rows"]
        assert metrics["accuracy"] == pytest.approx(sum(row[i] for i, row in enumerate(matrix)) / metrics["n"])
        per_class = [c["f1"] for c in metrics["per_class"].values()]
        assert metrics["macro_f1"] == pytest.approx(sum(per_class) / len(per_class))
    assert evaluation["teacher"]["accuracy"] > 0.6, "the real embedding teacher labels SST-2 well above chance"
    assert (output / "report" / "index.html").is_file()
    assert list((output / "report").glob("*.png"))
    assert (output / "train" / "student" / "config.json").is_file()
    for stage in ("label", "train", "evaluate", "report"):
        assert json.loads((output / "_stages" / f"{stage}.json").read_text())["status"] == "done"
