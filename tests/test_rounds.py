"""Student-guided labeling rounds, the pure part (``llkd_ray/pipeline/rounds.py``): the plan, the slice chooser
and its per-class quota, the budget split, the records; the config's ``labeling`` section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llkd_ray.artifacts import RunLayout, write_json
from llkd_ray.config import load_config
from llkd_ray.errors import ConfigError
from llkd_ray.pipeline.rounds import (
    choose_slice,
    class_quotas,
    random_slice,
    read_rounds,
    round_training,
    rounds_lines,
    slice_sizes,
    with_earlier_rounds,
)
from llkd_ray.pipeline.run import stage_hash

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"


# --------------------------------------------------------------------------- config


def test_labeling_is_off_by_default_and_bad_values_name_the_key():
    config = load_config(QUICK)
    assert (config.labeling.budget, config.labeling.rounds, config.labeling.enabled) == (1.0, 1, False)
    assert load_config(QUICK, ["labeling.budget=0.3", "labeling.rounds=4"]).labeling.enabled
    assert load_config(QUICK, ["labeling.rounds=2"]).labeling.enabled  # the whole pool, in two rounds
    for override, message in [
        ("labeling.budget=0", "labeling.budget: Input should be greater than 0"),
        ("labeling.budget=1.2", "labeling.budget: Input should be less than or equal to 1"),
        ("labeling.rounds=0", "labeling.rounds: Input should be greater than 0"),
        ("labeling.rounds=two", "labeling.rounds"),
        ("labeling.scoring_concurrency=[2,1]", "labeling.scoring_concurrency"),
        ("labeling.bugdet=0.3", "labeling.bugdet: unknown key; allowed in labeling: budget, rounds"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(QUICK, [override])


def test_the_stage_hashes_of_a_run_without_rounds_do_not_change():
    config = load_config(QUICK)
    assert stage_hash(config, "label") == config.section_hash("task", "data", "teacher")
    rounds = load_config(QUICK, ["labeling.budget=0.5"])
    assert stage_hash(rounds, "label") != stage_hash(config, "label")
    assert stage_hash(rounds, "train") != stage_hash(config, "train")


# --------------------------------------------------------------------------- the plan


def test_slice_sizes_split_the_budget_evenly_and_refuse_fewer_rows_than_rounds():
    assert slice_sizes(1000, 0.3, 4) == [75, 75, 75, 75]
    assert slice_sizes(10, 0.5, 3) == [2, 2, 1]
    assert slice_sizes(7, 1.0, 1) == [7]
    assert sum(slice_sizes(5322, 0.3, 4)) == 1596
    with pytest.raises(ConfigError, match=r"labeling.budget 0.1 of a pool of 20 rows is 2 row\(s\), fewer than"):
        slice_sizes(20, 0.1, 3)


def test_the_training_budget_is_split_across_rounds():
    training = load_config(QUICK).training  # max_steps: 30
    assert [round_training(training, k, [10, 10, 10, 10])["max_steps"] for k in range(4)] == [8, 8, 7, 7]
    budget = load_config(QUICK, ["training.max_steps=null", "training.budget=2"]).training
    # each round spends about 1/R of 2 passes over the final labeled set, in passes over its own
    shares = [round_training(budget, k, [10, 10, 10, 10])["budget"] for k in range(4)]
    assert shares == pytest.approx([2.0, 1.0, 2 / 3, 0.5])
    assert sum(s * 10 * (k + 1) for k, s in enumerate(shares)) == pytest.approx(2 * 40)
    epochs = load_config(QUICK, ["training.max_steps=null", "training.epochs=3"]).training
    assert round_training(epochs, 1, [5, 5]) == {"epochs": pytest.approx(1.5)}


# --------------------------------------------------------------------------- the choice of rows


def test_the_random_slice_is_seeded_and_ignores_the_order_of_the_ids():
    ids = [f"r{i}" for i in range(100)]
    first = random_slice(ids, 10, seed=3)
    assert len(set(first)) == 10 and set(first) <= set(ids)
    assert random_slice(list(reversed(ids)), 10, seed=3) == first
    assert random_slice(ids, 10, seed=4) != first


def test_quotas_are_equal_shares_with_the_unused_water_filled():
    assert class_quotas([50, 50, 50], 30) == [10, 10, 10]
    assert class_quotas([2, 50, 50], 30) == [2, 14, 14]
    assert class_quotas([0, 3, 100], 10) == [0, 3, 7]
    assert class_quotas([50, 50, 50], 31) == [10, 10, 10]  # one left over: the chooser gives it by uncertainty
    assert class_quotas([1, 1], 5) == [1, 1]


def test_the_slice_is_the_most_uncertain_rows_within_per_class_quotas():
    ids = [f"r{i}" for i in range(12)]
    # class 0 holds every very uncertain row; class 1 and 2 would starve on uncertainty alone
    uncertainty = [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.2, 0.1, 0.3, 0.05, 0.5, 0.4]
    predicted = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    chosen = choose_slice(ids, uncertainty, predicted, 6, 3, labeled={"r0"})
    assert "r0" not in chosen  # disjoint from what is labeled
    assert chosen == ["r1", "r2", "r10", "r11", "r8", "r6"]  # most uncertain first, 2 per class
    assert sorted(chosen, key=lambda i: -uncertainty[ids.index(i)]) == chosen


def test_an_explored_share_of_the_slice_is_a_seeded_draw_from_the_unlabeled_rows():
    ids = [f"r{i:02d}" for i in range(40)]
    uncertainty = [i / 40 for i in range(40)]  # r39 the most uncertain
    predicted = [0] * 40
    labeled = {"r00", "r39"}
    chosen = choose_slice(ids, uncertainty, predicted, 10, 1, labeled, explore=0.4, seed=3)
    assert len(chosen) == len(set(chosen)) == 10 and not set(chosen) & labeled
    drawn = chosen[6:]
    assert drawn == random_slice([i for i in ids if i not in labeled], 4, 3)  # a uniform draw, reproducible
    rest = [i for i in reversed(ids) if i not in labeled and i not in drawn]
    assert chosen[:6] == rest[:6]  # the uncertain share first, the most uncertain of what the draw left
    assert choose_slice(ids, uncertainty, predicted, 10, 1, labeled, explore=0.4, seed=3) == chosen
    assert choose_slice(ids, uncertainty, predicted, 10, 1, labeled, explore=0.4, seed=4)[6:] != drawn
    assert choose_slice(ids, uncertainty, predicted, 10, 1, labeled) == [f"r{i}" for i in range(38, 28, -1)]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=6).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.lists(st.tuples(st.floats(0, 1), st.integers(0, k - 1), st.booleans()), min_size=1, max_size=80),
            st.integers(min_value=1, max_value=90),
        )
    )
)
def test_choose_slice_properties(case):
    k, rows, size = case
    ids = [f"id{i:03d}" for i in range(len(rows))]
    uncertainty = [u for u, _, _ in rows]
    predicted = [p for _, p, _ in rows]
    labeled = {i for i, (_, _, done) in zip(ids, rows, strict=True) if done}
    chosen = choose_slice(ids, uncertainty, predicted, size, k, labeled)
    open_rows = [i for i in range(len(ids)) if ids[i] not in labeled]
    assert len(chosen) == len(set(chosen)) == min(size, len(open_rows))
    assert not set(chosen) & labeled
    counts = np.bincount([predicted[ids.index(i)] for i in chosen], minlength=k)
    available = np.bincount([predicted[i] for i in open_rows], minlength=k)
    for c in range(k):  # the quota: no class gets less than its fair share of what it has
        assert counts[c] >= min(available[c], size // k)
    # within a class, nothing left out is more uncertain than what was taken
    for c in range(k):
        taken = [uncertainty[ids.index(i)] for i in chosen if predicted[ids.index(i)] == c]
        left = [uncertainty[i] for i in open_rows if predicted[i] == c and ids[i] not in chosen]
        if taken and left:
            assert max(left) <= min(taken)


# --------------------------------------------------------------------------- the records


def _rounds_document(tmp_path: Path) -> RunLayout:
    layout = RunLayout(tmp_path)
    training = {"dir": "x", "steps": 5, "scoring_flops": 1e9, "training_flops": 4e9, "student_parameters": 10}
    write_json(
        layout.rounds_json,
        {
            "budget": 0.3,
            "rounds_planned": 2,
            "pool_rows": 100,
            "budget_rows": 30,
            "sizes": [15, 15],
            "rounds": [
                {
                    "round": 0,
                    "kind": "random",
                    "size": 15,
                    "labeled_rows": 15,
                    "teacher": {"flops": 2e12},
                    "training": training,
                },
                {
                    "round": 1,
                    "kind": "uncertainty",
                    "size": 15,
                    "labeled_rows": 30,
                    "teacher": {"flops": 3e12},
                    "scoring": {"flops": 5e8, "head": {"held_out_accuracy": 0.75, "held_out_rows": 4, "clears": 0.5}},
                    "training": None,
                },
            ],
        },
    )
    summary = {"compute": {"parameters": 10, "scoring_flops": 2e9, "training_flops": 6e9}}
    write_json(layout.training_summary, summary)
    return layout


def test_the_records_give_each_round_its_flops_and_the_run_its_totals(tmp_path):
    layout = _rounds_document(tmp_path)
    document = read_rounds(layout)
    first, last = document["rounds"]
    assert first["flops"] == {"teacher_labeling": 2e12, "student_scoring": 1e9, "student_training": 4e9}
    # the last round's training is the train stage's summary; its scoring adds the pool pass
    assert last["flops"] == {"teacher_labeling": 3e12, "student_scoring": 2.5e9, "student_training": 6e9}
    total = with_earlier_rounds(layout, {"compute": {"scoring_flops": 2e9, "training_flops": 6e9}})
    assert total["compute"]["scoring_flops"] == pytest.approx(2e9 + 1e9 + 5e8)
    assert total["compute"]["training_flops"] == pytest.approx(6e9 + 4e9)
    lines = rounds_lines(document)
    assert lines[0].startswith("Labeling rounds: 30 of 100 pool rows (budget 0.3) in 2 round(s)")
    assert "uncertainty" in lines[3] and "3.00 TFLOP" in lines[3] and "6.00 GFLOP" in lines[3]
    assert "teacher head, held out" in lines[1] and lines[3].endswith("0.75 of 4 (50 % clear)")  # labeling.choose: llkd
    assert lines[2].endswith("–")  # round 0 fits no head


def test_a_run_without_rounds_has_no_records(tmp_path):
    layout = RunLayout(tmp_path)
    assert read_rounds(layout) is None and rounds_lines(None) == []
    summary = {"compute": {"scoring_flops": 1.0}}
    assert with_earlier_rounds(layout, summary) is summary


def test_the_report_the_summary_and_the_compute_by_stage_count_every_round(tmp_path):
    from llkd_ray.pipeline.run import PipelineResult, format_summary, run_compute
    from llkd_ray.report.page import build_report

    layout = _rounds_document(tmp_path)
    write_json(layout.labels / "_manifest.json", {"teacher_compute": {"flops": 5e12, "parameters": 7}})
    compute = run_compute(layout, json_of(layout.training_summary))
    assert compute["flops"] == {"teacher_labeling": 5e12, "student_scoring": 3.5e9, "student_training": 1e10}
    page = build_report(tmp_path).read_text()
    assert "<h2>Labeling rounds</h2>" in page and "<td>uncertainty</td>" in page and "<td>3.00 TFLOP</td>" in page
    summary = format_summary(PipelineResult(run_dir=tmp_path, eval={"compute": compute}))
    assert "Labeling rounds: 30 of 100 pool rows" in summary and "student scoring" in summary


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_with_rounds_on_the_stages_label_in_rounds_and_train_the_last_round(tmp_path, monkeypatch):
    from llkd_ray.pipeline import run as pipeline

    config = load_config(QUICK, ["labeling.budget=0.3", "labeling.rounds=2"])
    calls = {}

    def fake_rounds(config, layout, log):
        calls["rounds"] = config.labeling.rounds
        _rounds_document(layout.root)
        write_json(layout.labels / "_manifest.json", {"counts": {"labeled": 30}})

    def fake_train(config, labels, output, tracking=None):
        calls["train"] = config
        return {}

    monkeypatch.setattr("llkd_ray.pipeline.rounds_loop.label_rounds", fake_rounds)
    monkeypatch.setattr("llkd_ray.label.run.label_corpus", lambda *a, **k: pytest.fail("labeled the whole pool"))
    monkeypatch.setattr("llkd_ray.train.launch.train_student", fake_train)
    monkeypatch.setattr("llkd_ray.train.launch.format_training", lambda summary: "trained")
    layout = RunLayout(tmp_path)
    run = pipeline.StageRun(config, layout, log=lambda _: None)
    assert pipeline.label_stage(run) == {"counts": {"labeled": 30}}
    pipeline.train_stage(run)
    trained = calls["train"]
    assert calls["rounds"] == 2
    assert trained.student.model == str(Path("x") / "student") and trained.training.max_steps == 15
    assert layout.rounds in layout.outputs("label")  # a label stage redone from scratch starts the rounds over


# --------------------------------------------------------------------------- a round-based run on Ray


class Killed(Exception):
    """Stands for a run killed between two rounds."""


@pytest.mark.heavy
def test_rounds_on_tiny_models_label_each_row_once_and_resume_after_a_kill(ray_local, tmp_path, tiny_classifier_dir):
    import json

    import pyarrow.parquet as pq

    from llkd_ray.corpus import builtin_path
    from llkd_ray.label.store import OutputStore, committed_ids
    from llkd_ray.pipeline.rounds_loop import SCORING, SLICE, final_round_config, label_rounds

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(builtin_path("builtin:sst2/train").read_text().splitlines(keepends=True)[:60]))
    config = load_config(
        QUICK,
        [
            f"data.input={pool}",
            "data.limit=null",
            "data.gold=null",
            "teacher.block_rows=8",
            "teacher.embedding.concurrency=1",
            f"student.model={tiny_classifier_dir}",
            "training.workers=1",
            "training.cpus_per_worker=0.5",
            "training.batch_size=8",
            "training.max_steps=4",
            "labeling.budget=0.5",
            "labeling.rounds=2",
            "labeling.scoring_concurrency=1",
        ],
    )
    layout = RunLayout(tmp_path / "run")

    def kill_after_round_0(step: str, index: int) -> None:
        if (step, index) == ("trained", 0):
            raise Killed

    with pytest.raises(Killed):
        label_rounds(config, layout, log=lambda _: None, hook=kill_after_round_0)
    assert not (layout.round_dir(1) / SLICE).exists()
    first_training = (layout.round_dir(0) / "train" / "training_summary.json").stat().st_mtime

    document = label_rounds(config, layout, log=lambda _: None)  # the rerun resumes
    assert document["sizes"] == [15, 15] and document["pool_rows"] == 60
    slices = [pq.read_table(layout.round_dir(k) / SLICE) for k in range(2)]
    ids = [set(t["id"].to_pylist()) for t in slices]
    assert [len(s) for s in ids] == [15, 15] and not ids[0] & ids[1]  # disjoint
    committed = committed_ids(OutputStore(layout.labels)).to_pylist()
    assert len(committed) == len(set(committed)) == 30  # nothing labeled twice
    assert set(committed) == ids[0] | ids[1]  # the union of the slices is what the teacher labeled
    manifest = json.loads((layout.labels / "_manifest.json").read_text())
    assert manifest["counts"]["duplicates_removed"] == 0
    assert manifest["run"]["labeled"] == 15 and manifest["run"]["skipped_already_committed"] == 15
    # round 0 was not redone; round 1 scored only the unlabeled rows and kept the quota
    assert (layout.round_dir(0) / "train" / "training_summary.json").stat().st_mtime == first_training
    scoring = json.loads((layout.round_dir(1) / SCORING).read_text())
    assert scoring["rows"] == 45 and scoring["flops"] > 0
    available = list(scoring["pool_by_predicted_class"].values())
    counts = np.bincount(slices[1]["predicted"].to_numpy(), minlength=2)
    assert all(counts[c] >= min(available[c], 15 // 2) for c in range(2))
    uncertainty = slices[1]["uncertainty"].to_numpy()
    assert list(uncertainty) == sorted(uncertainty, reverse=True)
    records = read_rounds(layout)["rounds"]
    assert [r["kind"] for r in records] == ["random", "uncertainty"]
    assert records[0]["flops"]["teacher_labeling"] > 0 and records[0]["flops"]["student_training"] > 0
    assert records[1]["flops"]["teacher_labeling"] > 0 and records[1]["training"] is None  # the train stage's
    final = final_round_config(config, layout)
    assert final.student.model == str(layout.round_dir(0) / "train" / "student") and final.training.max_steps == 2
