"""``llkd bench quality --quick`` end to end: real teacher, real Ray Train runs, tiny student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llkd_ray.cli import main


@pytest.mark.heavy  # labels twice and trains 2 students on Ray Train, twice: minutes
def test_quick_benchmark_writes_the_table_and_the_plot(ray_local, tmp_path: Path) -> None:
    # Two variants keep CI short: llkd with a candidate pool (M = 2) and the budget-matched random.
    code = main([
        "bench", "quality", "--dataset", "builtin:trec", "--quick", "--strategies", "llkd,random",
        "--candidates", "2", "--cpus-per-worker", "1", "--output", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data"]["pool_rows"] == 96 and results["data"]["labels"][0] == "ABBR"
    assert 0.0 <= results["teacher"]["macro_f1"] <= 1.0 and results["teacher"]["pool_labelled"] == 96
    # the real zero-shot teacher is well above chance on TREC-6 (1/6; majority class 0.23): measured
    # accuracy 0.406, macro-F1 0.411 on the 96 gold rows, 0.56 right on the pool
    assert results["teacher"]["accuracy"] > 0.3 and results["teacher"]["macro_f1"] > 0.3
    assert results["teacher"]["pool_accuracy"] > 0.3
    runs = {run["variant"]: run for run in results["runs"]}
    assert sorted(runs) == ["llkd (M=2)", "random"]
    for run in runs.values():
        assert 0.0 <= run["macro_f1"] <= 1.0 and run["macro_f1"] == run["curve"][-1]["macro_f1"]
        assert run["macro_f1"] == pytest.approx(sum(run["per_class_f1"].values()) / 6)  # macro: the mean over 6
        assert 0.0 < run["data_usage"] <= 1.0 and run["wall_time_s"] > 0
        rows_selected = run["data_usage"] * 96  # a fraction of the 96-row pool: a whole number of rows
        assert rows_selected == pytest.approx(round(rows_selected))
        assert run["curve"][-1]["data_usage"] == pytest.approx(run["data_usage"])
        # --quick's label-free stop (churn bar 1: always under it) is called at the third of 8 checks
        # (the first has nothing to compare), and the run ends 5 % of the budget (1 pass of `all`)
        # later, overshot by less than a step (a step of M = 2 scores 32 and trains at most 16 of
        # the 96 rows: at most 0.28 passes; the probe, 12 rows, 0.04 a check)
        stop = run["stop"]
        assert stop["stopped_at"] >= 3 / 8 and stop["churn"][0] is None and len(stop["churn"]) == 3
        end = min(1.0, stop["stopped_at"] + 0.05)
        assert end <= run["compute"] < end + 0.32 and 0.0 < run["scoring_share"] < 1.0
        # score reuse (selection.score_ttl=1 in --quick): rows scored a pass ago are not scored again
        assert run["compute_detail"]["reused_samples"] > 0 and 0.0 < run["reused_share"] < 1.0
        assert run["compute_detail"]["probe_flops"] > 0
        # a learning curve: evaluations at 1/4, 2/4, ... of the budget up to the stop, then the end
        assert len(run["curve"]) >= 2 and run["curve"][0]["all_passes"] >= 1 / 4
        assert run["curve"][-1]["all_passes"] == pytest.approx(run["compute"])
    # two strategies given the same budget stop within one step of the same spent compute
    # (here both stop on the churn rule, at the third check)
    assert abs(runs["llkd (M=2)"]["compute"] - runs["random"]["compute"]) < 0.32
    assert runs["llkd (M=2)"]["candidates_per_step"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| llkd (M=2) |" in table and "| random |" in table and "*teacher" in table
    assert "compute to `all`'s best" in table and "## Where the compute goes" in table
    assert "## Label-free stop" in table and "scores reused" in table
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"

    # A second invocation reuses the teacher's labels and every finished run.
    assert main(["bench", "quality", "--dataset", "builtin:trec", "--quick", "--strategies", "llkd,random",
                 "--candidates", "2", "--cpus-per-worker", "1", "--output", str(tmp_path)]) == 0  # fmt: skip
    again = json.loads((tmp_path / "results.json").read_text())
    assert [run["macro_f1"] for run in again["runs"]] == [run["macro_f1"] for run in results["runs"]]
