"""``llkd bench quality --quick`` end to end: real teacher, real Ray Train runs, tiny student."""

from __future__ import annotations

import json
from pathlib import Path

from llkd_ray.cli import main


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
    runs = {run["variant"]: run for run in results["runs"]}
    assert sorted(runs) == ["llkd (M=2)", "random"]
    for run in runs.values():
        assert 0.0 <= run["macro_f1"] <= 1.0 and run["macro_f1"] == run["curve"][-1]["macro_f1"]
        assert 0.0 < run["data_usage"] <= 1.0 and run["wall_time_s"] > 0
        # the compute budget (1 pass of `all`), scoring included: reached, and overshot by less than a step
        # (a step of M = 2 scores 32 and trains at most 16 of the 96 rows: at most 0.28 passes)
        assert 1.0 <= run["compute"] < 1.0 + 0.28 and 0.0 < run["scoring_share"] < 1.0
        # a learning curve: 4 evaluations at 1/4 ... 4/4 of the budget
        assert len(run["curve"]) == 4
        assert [p["all_passes"] >= (k + 1) / 4 for k, p in enumerate(run["curve"])] == [True] * 4
    # two strategies given the same budget stop within one step of the same spent compute
    assert abs(runs["llkd (M=2)"]["compute"] - runs["random"]["compute"]) < 0.28
    assert runs["llkd (M=2)"]["candidates_per_step"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| llkd (M=2) |" in table and "| random |" in table and "*teacher" in table
    assert "compute to `all`'s best" in table and "## Where the compute goes" in table
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"

    # A second invocation reuses the teacher's labels and every finished run.
    assert main(["bench", "quality", "--dataset", "builtin:trec", "--quick", "--strategies", "llkd,random",
                 "--candidates", "2", "--cpus-per-worker", "1", "--output", str(tmp_path)]) == 0  # fmt: skip
    again = json.loads((tmp_path / "results.json").read_text())
    assert [run["macro_f1"] for run in again["runs"]] == [run["macro_f1"] for run in results["runs"]]
