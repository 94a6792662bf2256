"""The quality benchmark's labeling axis: variants, the equal-compute budget, the records
and the table, on made-up runs (the real runs: ``test_quality_quick.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llkd_ray.errors import ConfigError
from llkd_ray.pipeline.rounds import round_training, slice_sizes
from llkd_ray.quality.data import prepare_data
from llkd_ray.quality.labeling import (
    claim_run_dir,
    full_pool_tokens,
    labeling_lines,
    labeling_record,
    labeling_summary,
)
from llkd_ray.quality.runs import reusable_runs
from llkd_ray.quality.settings import (
    BenchSettings,
    Variant,
    base_config,
    labeling_training_budget,
    labeling_variants,
    parse_fractions,
    run_config,
)


def test_labeling_variants_pair_a_random_subset_with_rounds_per_fraction() -> None:
    variants = labeling_variants("llkd", parse_fractions("0.1, 0.3,0.1"), 3)
    assert [(v.labeled, v.rounds) for v in variants] == [(0.1, 1), (0.1, 3), (0.3, 1), (0.3, 3)]
    assert variants[0].name == "llkd (M=1), 10 % labeled (random subset)"
    assert variants[3].name == "llkd (M=1), 30 % labeled (3 rounds)"
    assert len({v.slug for v in variants}) == 4 and variants[1].slug == "llkd-m1-rounds3-10pct"
    assert not Variant("all").labeling and Variant("all").name == "all" and Variant("llkd").slug == "llkd-m1"


def test_an_explored_share_names_the_rounds_arm_only() -> None:
    random_arm, rounds_arm = labeling_variants("llkd", [0.3], 3, explore=0.5)
    assert random_arm.explore == 0.0 and random_arm.slug == "llkd-m1-random-30pct"  # the same run as without
    assert rounds_arm.name == "llkd (M=1), 30 % labeled (3 rounds, 50 % random)"
    assert rounds_arm.slug == "llkd-m1-rounds3-explore50-30pct"
    with pytest.raises(ConfigError, match="--labeling-explore"):
        labeling_variants("llkd", [0.3], 3, explore=1.0)


def test_each_rule_of_choice_is_a_rounds_arm_named_by_what_differs() -> None:
    variants = labeling_variants("llkd", [0.3], 3, chooses=["entropy", "llkd", "bald"], first="typical", clip=0.05)
    assert [v.choose for v in variants] == ["entropy", "entropy", "llkd", "bald"] and variants[0].rounds == 1
    assert variants[0].slug == "llkd-m1-random-30pct"  # the random subset is the same run for every rule
    assert variants[1].name == "llkd (M=1), 30 % labeled (3 rounds, typical first, clip 5 %)"
    assert variants[2].name == "llkd (M=1), 30 % labeled (3 rounds, llkd, typical first, clip 5 %)"
    assert variants[2].slug == "llkd-m1-rounds3-llkd-typical-clip5-30pct"
    assert labeling_variants("llkd", [0.3], 3)[1].slug == "llkd-m1-rounds3-30pct"  # the committed runs' names
    for kwargs, flag in [
        ({"chooses": ["margin"]}, "--labeling-choose"),
        ({"first": "medoid"}, "--labeling-first"),
        ({"clip": 0.5}, "--labeling-clip"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            labeling_variants("llkd", [0.3], 3, **kwargs)


def test_the_rules_forward_passes_come_out_of_the_training_budget() -> None:
    # 1,000 rows, 30 % in 3 rounds of 100; rounds 1 and 2 score 900 and 800 unlabeled rows
    def budget(**rules: object) -> float:
        return labeling_training_budget(5.0, 1000, Variant("llkd", labeled=0.3, rounds=3, **rules), 4)  # type: ignore[arg-type]

    assert budget() == pytest.approx((5000 - 1700 / 3) / 300)
    assert budget(choose="bald") == pytest.approx((5000 - 5 * 1700 / 3) / 300)  # K = 4 dropout passes and the plain one
    assert budget(choose="disagreement") == pytest.approx((5000 - (5 * 900 + 2 * 800) / 3) / 300)  # round 1: BALD
    assert budget(choose="llkd") == pytest.approx((5000 - (5 * 1700 + 100 + 200) / 3) / 300)  # + the labeled rows
    for rule in ("head_entropy", "gated_head"):  # the plain pass and the labeled rows' pass for the head
        assert budget(choose=rule) == pytest.approx((5000 - (1700 + 100 + 200) / 3) / 300)
    assert budget(first="typical") == pytest.approx((5000 - (1700 + 1000) / 3) / 300)  # + round 0's pass


@pytest.mark.parametrize("text", ["0", "1", "0.2,1.5", "a", ""])
def test_fractions_outside_zero_one_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--labeling-budgets"):
        parse_fractions(text)


def test_labeling_needs_two_rounds_and_a_known_strategy() -> None:
    with pytest.raises(ConfigError, match="--labeling-rounds"):
        labeling_variants("llkd", [0.5], 1)
    with pytest.raises(ConfigError, match="--labeling-strategy"):
        labeling_variants("best", [0.5], 2)


@pytest.mark.parametrize(("pool", "fraction", "rounds"), [(1500, 0.1, 1), (1500, 0.3, 3), (5322, 0.2, 4), (96, 0.5, 2)])
def test_the_labeling_budget_spends_the_whole_pool_budget_with_scoring_counted(
    pool: int, fraction: float, rounds: int
) -> None:
    variant = Variant("llkd", labeled=fraction, rounds=rounds)
    budget = labeling_training_budget(5.0, pool, variant, 2)
    sizes = slice_sizes(pool, fraction, rounds)
    training = round_training  # each round's passes over the rows labeled so far, in row-passes
    trained = sum(training(_training(budget), k, sizes)["budget"] * sum(sizes[: k + 1]) for k in range(rounds))
    scored = sum(pool - sum(sizes[:k]) for k in range(1, rounds)) / 3  # 2·N of 6·N per row
    assert trained + scored == pytest.approx(5.0 * pool)


def _training(budget: float):
    from llkd_ray.config import TrainingConfig

    return TrainingConfig(budget=budget)


def test_a_budget_smaller_than_the_scoring_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="too small for 5 labeling rounds"):
        labeling_training_budget(0.5, 1000, Variant("llkd", labeled=0.5, rounds=5), 2)


def test_run_config_sets_the_labeling_section_and_the_budget(tmp_path: Path) -> None:
    data = prepare_data(
        dataset="builtin:trec", pool=None, gold=None, labels_file=None,
        pool_size=20, gold_size=10, sample_seed=0, directory=tmp_path,
    )  # fmt: skip
    base = base_config(data, BenchSettings())
    variant = Variant("llkd", labeled=0.5, rounds=2)
    config = run_config(base, variant, seed=1, pool_rows=20)
    assert (config.labeling.budget, config.labeling.rounds, config.training.seed) == (0.5, 2, 1)
    assert config.training.budget == pytest.approx(labeling_training_budget(5.0, 20, variant, 2))
    assert config.labeling.explore == 0.0
    explored = run_config(base, Variant("llkd", labeled=0.5, rounds=2, explore=0.25), seed=1, pool_rows=20)
    assert explored.labeling.explore == 0.25 and explored.training.budget == config.training.budget
    plain = run_config(base, Variant("llkd"), seed=1, pool_rows=20)
    assert not plain.labeling.enabled and plain.training.budget == 5.0
    steps = run_config(base_config(data, BenchSettings(steps=9, budget=None)), variant, seed=0, pool_rows=20)
    assert steps.training.max_steps == 9 and steps.training.budget is None  # equal steps: split by the rounds


def _final(flops: float, passes: float) -> dict:
    return {"flops": flops, "all_passes": passes, "scoring_flops": 0.2 * flops, "training_flops": 0.8 * flops}


def test_a_labeling_record_puts_compute_and_curve_on_the_whole_pools_axis() -> None:
    # the last round trained 3 passes of its 300 labeled rows (3e9 FLOPs); the rounds before and the
    # pool scoring cost 1e9 more; one pass of `all` over the whole pool is 6 x 1000 x 100_000 = 6e8
    final = _final(3e9, 3.0)
    total = {"compute": final | {"parameters": 1000, "scoring_flops": 0.2 * 3e9 + 4e8, "training_flops": 2.4e9 + 6e8}}
    run = {
        "macro_f1": 0.6,
        "curve": [
            {"all_passes": 1.5, "flops": 1.5e9, "macro_f1": 0.5},
            {"all_passes": 3.0, "flops": 3e9, "macro_f1": 0.6},
        ],
        "stop": {"stopped_at": 0.5, "all_passes": 1.5, "churn": [None]},
    }
    document = {
        "budget": 0.3, "rounds_planned": 2, "pool_rows": 1000, "sizes": [150, 150],
        "rounds": [
            {"size": 150, "kind": "random", "teacher": {"flops": 5.0}},
            {"size": 150, "kind": "uncertainty", "teacher": {"flops": 7.0}, "scoring": {"flops": 4e8}},
        ],
    }  # fmt: skip
    record = labeling_record(run, final, total, document, tokens=100_000)
    assert record["flops"] == pytest.approx(4e9) and record["compute"] == pytest.approx(4e9 / 6e8)
    assert [p["all_passes"] for p in record["curve"]] == pytest.approx([2.5e9 / 6e8, 4e9 / 6e8])
    assert record["stop"]["all_passes"] == pytest.approx(2.5e9 / 6e8)
    assert record["scoring_share"] == pytest.approx((0.6e9 + 4e8) / 4e9)
    assert record["labeling"] | {"sizes": None} == {
        "fraction": 0.3, "rounds": 2, "pool_rows": 1000, "labeled_rows": 300, "teacher_flops": 12.0,
        "pool_scoring_flops": 4e8, "sizes": None, "kinds": ["random", "uncertainty"],
    }  # fmt: skip


def _run(
    variant: str, seed: int, f1: float, strategy: str = "llkd", labeling: tuple | None = None, **rules: object
) -> dict:
    run = {"variant": variant, "strategy": strategy, "seed": seed, "macro_f1": f1, "compute": 1.0, "flops": 100.0}
    run["curve"] = [{"all_passes": 0.5, "macro_f1": f1 + 0.02}, {"all_passes": 1.0, "macro_f1": f1}]
    if labeling:
        fraction, rounds = labeling
        run["labeling"] = {
            "fraction": fraction, "rounds": rounds, "pool_rows": 100, "labeled_rows": int(100 * fraction),
            "teacher_flops": 10.0 * fraction,
            "slices": [{"round": 0, "part": "random", "rows": 10, "confidence": 0.8, "accuracy": 0.7}]
            + [{"round": 1, "part": "uncertainty", "rows": 5, "confidence": 0.6, "accuracy": None}] * (rounds > 1),
        }  # fmt: skip
        run["labeling"] |= rules
        run["data_usage"] = 0.5 if rounds == 1 else 0.25
    return run


def _labeling_results(count_teacher: bool = False) -> dict:
    runs = [_run("all", s, f1, "all") for s, f1 in ((0, 0.70), (1, 0.72))]  # all's best: 0.72 and 0.74 -> 0.73
    for seed in (0, 1):
        runs += [
            _run("r10", seed, 0.60 + 0.01 * seed, labeling=(0.1, 1)),
            _run("g10", seed, 0.66, labeling=(0.1, 3)),
            _run("r30", seed, 0.70, labeling=(0.3, 1)),
            _run("g30", seed, 0.73 + 0.01 * seed, labeling=(0.3, 3)),
            _run("r50", seed, 0.735, labeling=(0.5, 1)),
        ]
    teacher = {"pool_flops": 10.0, "pool_labelled": 100}
    settings = vars(BenchSettings(labeling_budgets=[0.1, 0.3, 0.5], count_teacher=count_teacher))
    return {"runs": runs, "settings": settings, "labeling": labeling_summary(runs, teacher)}


def test_the_summary_finds_the_smallest_fraction_reaching_alls_best() -> None:
    axis = _labeling_results()["labeling"]
    assert axis["target_all_best"] == pytest.approx(0.73)
    assert list(axis["fractions"]) == ["0.1", "0.3", "0.5"]
    ten = axis["fractions"]["0.1"]
    assert ten["random"]["macro_f1"][0] == pytest.approx(0.605) and ten["random"]["seeds"] == 2
    assert ten["rounds"]["teacher_flops"] == pytest.approx(1.0) and not ten["rounds"]["reaches_target"]
    assert axis["smallest_fraction_reaching_target"] == {"random": 0.5, "rounds": 0.3}
    assert axis["whole_pool"] == {"teacher_flops": 10.0, "student_flops": 100.0, "pool_rows": 100}
    assert labeling_summary([_run("all", 0, 0.7, "all")], {}) is None  # no labeling run: no axis


def test_the_labeling_table_bolds_what_reaches_the_target_and_totals_the_teacher() -> None:
    lines = labeling_lines(_labeling_results(count_teacher=True))
    table = "\n".join(lines)
    assert "## Labeling axis" in table and "(0.730)" in table
    row = next(line for line in lines if line.startswith("| 30 % (30 rows)"))
    assert "| 0.700 ± 0.000 | **0.735 ± 0.007** | +0.035 |" in row and "| 1.00 / 1.00 | 2 / 2 |" in row
    assert "total FLOPs, teacher counted" in table and next(line for line in lines if line.startswith("| 100 %"))
    assert "random subset 50 %, student-guided rounds 30 %" in table
    assert "| 50 % (50 rows) | 0.735 ± 0.000 | – | – | 1.00 / – | 2 / – |" in table.replace("**", "")
    assert "| 30 % | 0.80 / 0.70 (10 rows) | 50 % | 0.80 / 0.70 (10 rows) | 0.60 / – (5 rows) | – | 25 % |" in table
    assert "| 50 % | 0.80 / 0.70 (10 rows) | 50 % | – | – | – | – |" in table  # no rounds arm at 50 %
    assert labeling_lines({"labeling": None}) == []


def test_each_rule_is_an_arm_of_its_own_with_the_head_against_the_teachers_bar() -> None:
    results = _labeling_results()
    chosen = [{"round": 0, "part": "typical", "rows": 10, "confidence": 0.7, "accuracy": 0.6, "clears": 0.5},
              {"round": 1, "part": "uncertainty", "rows": 5, "confidence": 0.75, "accuracy": 0.8, "clears": 0.6,
               "predicted": 0.7}]  # fmt: skip
    llkd = [
        _run(f"h30-{seed}", seed, 0.75, labeling=(0.3, 3), choose="llkd", first="typical", clip=0.05) for seed in (0, 1)
    ]
    for run in llkd:
        run["labeling"]["slices"] = chosen
    runs = results["runs"] + llkd
    results["labeling"] = labeling_summary(runs, {"pool_flops": 10.0, "pool_labelled": 100})
    axis = results["labeling"]
    arm = "rounds: llkd, typical first, clip 5 %"
    assert axis["arms"] == ["rounds", arm] and axis["smallest_fraction_reaching_target"][arm] == 0.3
    on = axis["fractions"]["0.3"][arm]["teacher_on_rows"]
    assert on["uncertainty"]["predicted"] == pytest.approx(0.7) and on["typical"]["clears"] == pytest.approx(0.5)
    lines = labeling_lines(results)
    assert sum(line.startswith("| 30 % (30 rows)") for line in lines) == 2  # one line per rounds arm
    row = next(line for line in lines if line.startswith(f"| 30 % (30 rows), {arm.removeprefix('rounds: ')} |"))
    assert "| 0.700 ± 0.000 | **0.750 ± 0.000** | +0.050 |" in row
    assert f"student-guided rounds 30 %, {arm} 30 %." in "\n".join(lines)
    where = next(line for line in lines if line.startswith("| 30 %, llkd, typical first, clip 5 % |"))
    assert "| typical: 0.70 / 0.60 (10 rows) | 0.75 / 0.80 (5 rows) | 0.70 / 0.60 | 25 % |" in where


def test_reuse_ignores_the_labeling_settings(tmp_path: Path) -> None:
    data = prepare_data(
        dataset="builtin:sst2", pool=None, gold=None, labels_file=None,
        pool_size=10, gold_size=10, sample_seed=0, directory=tmp_path,
    )  # fmt: skip
    earlier = {  # a results.json written before the axis existed: no labeling settings at all
        "data": {"name": "sst2", "pool_rows": 10, "gold_rows": 10},
        "settings": {k: v for k, v in vars(BenchSettings()).items() if not k.startswith(("labeling", "count"))},
        "runs": [_run("all", 0, 0.7, "all")],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(earlier))
    mine = BenchSettings(labeling_budgets=[0.3], labeling_rounds=4, count_teacher=True, seeds=1)
    assert sorted(reusable_runs([path], data, mine)) == [("all", 0)]  # fewer seeds: runs are taken by seed


def test_a_run_directory_of_another_key_is_cleared_and_one_of_the_same_key_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    claim_run_dir(run_dir, "a")
    (run_dir / "rounds").mkdir()
    claim_run_dir(run_dir, "a")
    assert (run_dir / "rounds").is_dir()  # resumed
    claim_run_dir(run_dir, "b")
    assert not (run_dir / "rounds").exists() and (run_dir / "run-key.txt").read_text() == "b"


def test_the_whole_pools_tokens_are_counted_with_the_builtin_students_tokenizer(tmp_path: Path) -> None:
    from train_fixtures import write_labels_dir
    from transformers import AutoTokenizer

    from llkd_ray.student.model import resolve_model_path

    data = prepare_data(
        dataset="builtin:trec", pool=None, gold=None, labels_file=None,
        pool_size=20, gold_size=10, sample_seed=0, directory=tmp_path,
    )  # fmt: skip
    config = base_config(data, BenchSettings(max_length=8))  # the student is builtin:minilm, not a path
    texts = ["what is the capital of france ?", "who wrote hamlet and when was it first performed on a stage ?"]
    labels = write_labels_dir(tmp_path / "labels", texts, config.task.label_names, parts=1)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.student.model))
    untruncated = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert min(untruncated) > 8 and full_pool_tokens(config, labels) == 16  # both cut at max_length 8


def test_a_finished_last_round_is_read_back_not_trained_again(tmp_path: Path, monkeypatch) -> None:
    import llkd_ray.pipeline.rounds_loop
    import llkd_ray.train.launch
    from llkd_ray.artifacts import RunLayout, write_json
    from llkd_ray.quality.labeling import train_labeling_run

    layout = RunLayout(tmp_path / "run")
    document = {"budget": 0.5, "rounds_planned": 1, "pool_rows": 4, "sizes": [2], "rounds": [{"size": 2}]}
    monkeypatch.setattr(llkd_ray.pipeline.rounds_loop, "label_rounds", lambda config, layout, log: document)

    def train_student(*args, **kwargs):
        raise AssertionError("the finished training was run again")

    monkeypatch.setattr(llkd_ray.train.launch, "train_student", train_student)
    summary = {"compute": {"flops": 10.0, "scoring_flops": 4.0, "training_flops": 6.0}}
    write_json(layout.training_summary, summary)
    write_json(layout.student / "config.json", {})
    final, total, rounds = train_labeling_run(None, layout.root, None, print)  # type: ignore[arg-type]
    assert final == summary and rounds == document and total["compute"]["flops"] == 10.0


def test_the_slices_say_how_sure_and_how_right_the_teacher_was_on_each_part(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llkd_ray.artifacts import RunLayout, write_json
    from llkd_ray.quality.labeling import slice_quality, teacher_on_rows

    layout = RunLayout(tmp_path / "run")
    ids = [f"r{i}" for i in range(10)]
    confidence = [0.9, 0.8, 0.9, 0.8, 0.5, 0.5, 0.4, 0.6, 0.9, 0.7]
    right = [True, True, True, False, False, True, False, False, True, True]
    layout.labels.mkdir(parents=True)
    pq.write_table(
        pa.table({
            "id": ids, "confidence": confidence, "pseudo_label": ["a"] * 10,
            "gold_label": ["a" if r else "b" for r in right],
        }),
        layout.labels / "part-0.parquet",
    )  # fmt: skip
    slices = [ids[:4], ids[4:7] + ids[7:9], ids[9:]]  # round 1: 3 chosen by uncertainty, then 2 drawn
    rounds = [
        {"round": 0, "kind": "random", "size": 4, "drawn": 4},
        {"round": 1, "kind": "uncertainty + 40 % random", "size": 5, "drawn": 2},
        {"round": 2, "kind": "uncertainty", "size": 1},  # a record from before `drawn`: nothing drawn
    ]
    for record, chosen in zip(rounds, slices, strict=True):
        layout.round_dir(record["round"]).mkdir(parents=True)
        pq.write_table(pa.table({"id": chosen}), layout.round_dir(record["round"]) / "slice.parquet")
    write_json(layout.rounds_json, {"rounds": rounds})
    parts = slice_quality(layout.root)
    assert [(p["round"], p["part"], p["rows"]) for p in parts] == [
        (0, "random", 4),
        (1, "uncertainty", 3),
        (1, "random", 2),
        (2, "uncertainty", 1),
    ]
    assert parts[0]["confidence"] == pytest.approx(0.85) and parts[0]["accuracy"] == pytest.approx(0.75)
    # one class: the teacher's bar is the mean confidence (0.7); no head chose these rows
    assert [p["clears"] for p in parts] == [1.0, 0.0, pytest.approx(0.5), 1.0]
    assert {p["predicted"] for p in parts} == {None}
    assert parts[1]["confidence"] == pytest.approx(0.4667, abs=1e-4) and parts[1]["accuracy"] == pytest.approx(1 / 3)
    both = teacher_on_rows([parts, parts])
    assert both["random"]["rows"] == 6 and both["uncertainty"]["rows"] == 4  # rows a run
    assert both["random"]["accuracy"] == pytest.approx((3 + 1) / 6)
    assert slice_quality(tmp_path / "elsewhere") == []  # a run reused from another directory
