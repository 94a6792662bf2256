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
        assert run["steps"] == 6 and 0.0 <= run["macro_f1"] <= 1.0
        assert 0.0 < run["data_usage"] <= 1.0 and run["wall_time_s"] > 0
    assert runs["llkd (M=2)"]["candidates_per_step"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| llkd (M=2) |" in table and "| random |" in table and "*teacher" in table
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"

    # A second invocation reuses the teacher's labels and every finished run.
    assert main(["bench", "quality", "--dataset", "builtin:trec", "--quick", "--strategies", "llkd,random",
                 "--candidates", "2", "--cpus-per-worker", "1", "--output", str(tmp_path)]) == 0  # fmt: skip
    again = json.loads((tmp_path / "results.json").read_text())
    assert [run["macro_f1"] for run in again["runs"]] == [run["macro_f1"] for run in results["runs"]]
