"""``llkd bench quality --quick`` end to end: real teacher, real Ray Train runs, tiny student."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llkd_ray.artifacts import read_label_table
from llkd_ray.cli import main


@pytest.mark.heavy  # labels, trains llkd and the labeling axis's two arms on Ray Train, then reruns: minutes
def test_quick_benchmark_writes_the_table_and_the_plot(ray_local, tmp_path: Path) -> None:
    # llkd with a candidate pool (M = 2), and the labeling axis at half the pool: a random half, then
    # llkd, and two rounds by LLKD's own rule (a typical quarter, then a quarter: half the rows ranked
    # by the teacher-confidence head x BALD, the top 10 % most uncertain set aside, half drawn at random).
    argv = [
        "bench", "quality", "--dataset", "builtin:trec", "--quick", "--strategies", "llkd", "--candidates", "2",
        "--labeling-budgets", "0.5", "--labeling-explore", "0.5", "--labeling-choose", "llkd",
        "--labeling-first", "typical", "--labeling-clip", "0.1", "--count-teacher", "--cpus-per-worker", "1",
        "--output", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data"]["pool_rows"] == 96 and results["data"]["labels"][0] == "ABBR"
    assert 0.0 <= results["teacher"]["macro_f1"] <= 1.0 and results["teacher"]["pool_labelled"] == 96
    # the real zero-shot teacher is well above chance on TREC-6 (1/6; majority class 0.23): measured
    # accuracy 0.406, macro-F1 0.411 on the 96 gold rows, 0.56 right on the pool
    assert results["teacher"]["accuracy"] > 0.3 and results["teacher"]["macro_f1"] > 0.3
    assert results["teacher"]["pool_accuracy"] > 0.3 and results["teacher"]["pool_flops"] > 0
    runs = {run["variant"]: run for run in results["runs"]}
    random_half = "llkd (M=1), 50 % labeled (random subset)"
    rounds_half = "llkd (M=1), 50 % labeled (2 rounds, llkd, typical first, clip 10 %, 50 % random)"
    assert sorted(runs) == sorted(["llkd (M=2)", rounds_half, random_half])
    for run in runs.values():
        assert 0.0 <= run["macro_f1"] <= 1.0 and run["macro_f1"] == run["curve"][-1]["macro_f1"]
        assert run["macro_f1"] == pytest.approx(sum(run["per_class_f1"].values()) / 6)  # macro: the mean over 6
        assert 0.0 < run["data_usage"] <= 1.0 and run["wall_time_s"] > 0
        assert run["curve"][-1]["data_usage"] == pytest.approx(run["data_usage"])
        assert isinstance(run["loaded"], bool) and len(run["load_average"]["start"]) == 3
        if run.get("labeling"):  # seconds not summed over rounds yet: a labeling run keeps FLOPs only
            assert run["compute_s"] is None and "scoring_s" not in run["curve"][-1]
        else:
            seconds = [sum(point[k] for k in ("scoring_s", "training_s", "selection_s")) for point in run["curve"]]
            assert seconds == sorted(seconds) and run["compute_s"] == pytest.approx(seconds[-1])  # along the curve
            assert run["seconds_per_pflop"] > 0
        # --quick's label-free stop (churn bar 1: always under it) is called at the third of 8 checks
        # of the (last round's) training, the first having nothing to compare
        stop = run["stop"]
        assert stop["stopped_at"] >= 3 / 8 and stop["churn"][0] is None and len(stop["churn"]) == 3
        assert stop["all_passes"] <= run["compute"] + 1e-9 and 0.0 < run["scoring_share"] < 1.0
        # score reuse (selection.score_ttl=1 in --quick): rows scored a pass ago are not scored again
        assert run["compute_detail"]["reused_samples"] > 0 and 0.0 < run["reused_share"] < 1.0
        assert run["compute_detail"]["probe_flops"] > 0
        assert len(run["curve"]) >= 2 and run["curve"][-1]["all_passes"] <= run["compute"] + 1e-9
    llkd = runs["llkd (M=2)"]
    rows_selected = llkd["data_usage"] * 96  # a fraction of the 96-row pool: a whole number of rows
    assert rows_selected == pytest.approx(round(rows_selected)) and llkd["candidates_per_step"] == 2
    # the stop ends the run 5 % of the budget (2 passes of `all`) after it is called, overshot by less
    # than a step (a step of M = 2 scores 32 and trains at most 16 of the 96 rows: at most 0.28
    # passes; the probe, 12 rows, 0.04 a check)
    end = 2 * min(1.0, llkd["stop"]["stopped_at"] + 0.05)
    assert end <= llkd["compute"] < end + 0.32 and llkd["curve"][0]["all_passes"] >= 2 / 4
    assert llkd["curve"][-1]["all_passes"] == pytest.approx(llkd["compute"])  # the last evaluation is the end
    # The labeling axis: 48 of the 96 rows labeled by the teacher, in one random slice or two
    # rounds of 24; nothing labeled twice; the rounds spent the budget (2 passes of `all` over the
    # whole pool) with the pool's scoring counted in it; the curve on the whole pool's axis.
    for name, sizes in ((random_half, [48]), (rounds_half, [24, 24])):
        info = runs[name]["labeling"]
        assert (info["labeled_rows"], info["sizes"], info["pool_rows"]) == (48, sizes, 96)
        assert 0 < info["teacher_flops"] < results["teacher"]["pool_flops"]
        slug = "llkd-m1-random-50pct" if len(sizes) == 1 else "llkd-m1-rounds2-llkd-typical-clip10-explore50-50pct"
        run_dir = tmp_path / "work" / "runs" / slug / "seed0"
        labeled = read_label_table(run_dir / "labels", ["id"])["id"].to_pylist()
        slices = [
            pq.read_table(run_dir / "rounds" / f"round-{k}" / "slice.parquet")["id"].to_pylist()
            for k in range(len(sizes))
        ]
        assert sorted(labeled) == sorted(i for s in slices for i in s) and len(set(labeled)) == 48
    rounds = runs[rounds_half]
    assert rounds["labeling"]["kinds"] == ["typical", "teacher head x bald, top 10 % clipped + 50 % random"]
    assert rounds["labeling"]["choose"] == "llkd" and rounds["labeling"]["first"] == "typical"
    # the typical pass over the whole pool; then the labeled rows' pass (the head) and the unlabeled
    # rows' plain pass and 2 dropout passes, each a forward pass
    scoring = [json.loads((run_dir / "rounds" / f"round-{k}" / "scoring.json").read_text()) for k in (0, 1)]
    assert [s["rows"] for s in scoring] == [96, 72] and [s["passes_per_row"] for s in scoring] == [1, 3]
    head = scoring[1]["head"]
    assert head["rows"] == 24 and head["held_out_rows"] == 5 and 0 <= head["held_out_accuracy"] <= 1
    assert scoring[1]["tokens"] == 3 * (scoring[0]["tokens"] - head["tokens"]) + head["tokens"]
    assert scoring[0]["parameters"] == scoring[1]["parameters"]  # round 0 scored the model training starts from
    assert scoring[1]["flops"] / scoring[1]["tokens"] == pytest.approx(scoring[0]["flops"] / scoring[0]["tokens"])
    assert rounds["labeling"]["pool_scoring_flops"] == pytest.approx(sum(s["flops"] for s in scoring))
    chosen = pq.read_table(run_dir / "rounds" / "round-1" / "slice.parquet").to_pandas()
    assert {"teacher_sure", "bald", "score"} <= set(chosen.columns) and chosen["teacher_sure"].iloc[:12].between(
        0, 1
    ).all()
    # the teacher on each part of each slice: its confidence, its accuracy on the pool's gold labels,
    # the share clearing its bar; the head's prediction on the rows it chose
    parts = [(p["round"], p["part"], p["rows"]) for p in rounds["labeling"]["slices"]]
    assert parts == [(0, "typical", 24), (1, "uncertainty", 12), (1, "random", 12)]
    assert all(0 < p["confidence"] <= 1 and 0 <= p["accuracy"] <= 1 for p in rounds["labeling"]["slices"])
    assert all(0 <= p["clears"] <= 1 for p in rounds["labeling"]["slices"])
    # the head scored every unlabeled row of round 1: the chosen ones and the drawn ones
    assert [p["predicted"] is not None for p in rounds["labeling"]["slices"]] == [False, True, True]
    # the scoring passes (about 1.2 passes of `all`) and round 0's training, then the last round
    # stopped early by the quick stop
    assert 1.0 < rounds["compute"] <= 2.2
    axis = results["labeling"]
    assert axis["target_all_best"] is None and list(axis["fractions"]) == ["0.5"]  # no `all` run: no target
    table = (tmp_path / "results.md").read_text()
    assert "| llkd (M=2) |" in table and f"| {rounds_half} |" in table and "*teacher" in table
    assert "compute to `all`'s best" in table and "## Where the compute goes" in table
    assert "## Label-free stop" in table and "scores reused" in table and "## Seconds beside FLOPs" in table
    assert "## Labeling axis" in table and "| 50 % (48 rows), llkd, typical first, clip 10 % |" in table
    assert "teacher counted" in table
    assert "Where the labels go" in table and "(12 rows); typical: " in table and " (24 rows) |" in table
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"

    # A second invocation reuses the teacher's labels and every finished run.
    assert main(argv) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert [run["macro_f1"] for run in again["runs"]] == [run["macro_f1"] for run in results["runs"]]
