"""The quality benchmark's own logic: inputs, variants, aggregation, table and plot (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llkd_ray.errors import ConfigError, DataError
from llkd_ray.quality.data import prepare_data, read_label_specs
from llkd_ray.quality.quiet import load_record
from llkd_ray.quality.runs import reusable_runs, run_record
from llkd_ray.quality.settings import BenchSettings, Variant, base_config, build_variants, parse_candidates, run_config
from llkd_ray.quality.summary import plateau_check, summarize
from llkd_ray.quality.tables import render_markdown, write_results

ROOT = Path(__file__).resolve().parents[1]


def _run(
    variant: str,
    seed: int,
    f1: float,
    acc: float,
    usage: float,
    strategy: str = "all",
    m: int = 1,
    curve: list[float] | None = None,
) -> dict:
    """A run as ``results.json`` holds it; ``curve`` the macro-F1 at 1/n ... n/n of a 1-pass budget."""
    points = curve or [f1]
    return {
        "variant": variant,
        "strategy": strategy,
        "candidates_per_step": m,
        "seed": seed,
        "accuracy": acc,
        "macro_f1": points[-1],
        "curve": [
            {"all_passes": (k + 1) / len(points), "macro_f1": value, "data_usage": usage}
            for k, value in enumerate(points)
        ],
        "data_usage": usage,
        "sample_step_usage": usage / 2,
        "compute": 1.0,
        "scoring_share": 0.0 if strategy == "all" else 0.6,
        "wall_time_s": 10.0 + seed,
    }


def _rows(table: str) -> dict[str, str]:
    """The main table's rows by strategy (the compute table below it has the same first column)."""
    main = table.split("## Where the compute goes")[0]
    return {line.split("|")[1].strip(): line for line in main.splitlines() if line.startswith("| ")}


def _results(runs: list[dict]) -> dict:
    variants = list(dict.fromkeys(run["variant"] for run in runs))
    settings = BenchSettings(seeds=2)
    return {
        "data": {"name": "toy", "pool_rows": 100, "pool_total": 1000, "gold_rows": 50, "labels": ["a", "b"]},
        "settings": vars(settings) | {"variants": variants},
        "teacher": {"accuracy": 0.70, "macro_f1": 0.69, "pool_accuracy": 0.71, "pool_mean_confidence": 0.8},
        "runs": runs,
        "summary": (summary := summarize(runs, variants, teacher_f1=0.69)),
        "plateau": plateau_check(summary),
    }


def test_variants_compare_llkd_m_values_and_run_each_baseline_once() -> None:
    variants = build_variants(["llkd", "all", "random"], [1, 4])
    assert [v.name for v in variants] == ["llkd (M=1)", "llkd (M=4)", "all", "random"]
    assert [v.candidates_per_step for v in variants] == [1, 4, 1, 1]
    assert len({v.slug for v in variants}) == 4
    adaptive = build_variants(["llkd"], parse_candidates("4,fill8"))
    assert [(v.name, v.slug, v.fill) for v in adaptive] == [
        ("llkd (M=4)", "llkd-m4", False),
        ("llkd (fill, M≤8)", "llkd-fill8", True),
    ]
    with pytest.raises(ConfigError, match="fillN"):
        parse_candidates("4,lots")
    with pytest.raises(ConfigError, match="unknown strategy best"):
        build_variants(["best"], [1])
    with pytest.raises(ConfigError, match="positive"):
        build_variants(["llkd"], [0])


def test_summary_is_mean_and_sample_std_over_seeds() -> None:
    runs = [_run("all", 0, 0.70, 0.72, 1.0), _run("all", 1, 0.74, 0.76, 1.0)]
    entry = summarize(runs, ["all", "missing"])
    assert list(entry) == ["all"]
    assert entry["all"]["seeds"] == 2
    assert entry["all"]["macro_f1_mean"] == pytest.approx(0.72)
    assert entry["all"]["macro_f1_std"] == pytest.approx(0.0282843, abs=1e-6)
    assert entry["all"]["data_usage_std"] == 0.0
    single = summarize(runs[:1], ["all"])["all"]
    assert single["macro_f1_std"] == 0.0


def test_curve_milestones_are_compute_fractions_of_all_full_budget() -> None:
    runs = [
        _run("all", 0, 0, 0.7, 1.0, curve=[0.60, 0.70, 0.72, 0.71]),
        _run("all", 1, 0, 0.7, 1.0, curve=[0.62, 0.68, 0.74, 0.73]),
        _run("llkd (M=1)", 0, 0, 0.7, 0.3, "llkd", curve=[0.70, 0.74, 0.75, 0.75]),
        _run("llkd (M=1)", 1, 0, 0.7, 0.3, "llkd", curve=[0.66, 0.72, 0.73, 0.74]),
    ]
    summary = summarize(runs, ["all", "llkd (M=1)"], teacher_f1=0.69)
    llkd, everything = summary["llkd (M=1)"], summary["all"]
    assert llkd["macro_f1_mean"] == pytest.approx(0.745)  # the end of the run, not the best point
    assert llkd["best_macro_f1_mean"] == pytest.approx(0.745) and llkd["best_at_mean"] == pytest.approx(0.875)
    # all's best: the mean of its seeds' best points, (0.72 + 0.74) / 2 = 0.73
    assert llkd["to_all_best_reached"] == 2 and llkd["to_all_best_mean"] == pytest.approx((0.5 + 0.75) / 2)
    assert llkd["to_teacher_reached"] == 2 and llkd["to_teacher_mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert everything["to_all_best_reached"] == 1  # seed 0 never reaches 0.73
    assert [round(p["macro_f1"], 3) for p in everything["curve"]] == [0.61, 0.69, 0.73, 0.72]
    plateau = plateau_check(summary)  # last two points 0.73 -> 0.72, seed std at the end 0.014
    assert plateau["held"] and plateau["peaked_before_end"]
    single = summarize(runs[:1], ["all"])
    assert plateau_check(single)["held"] is None  # one seed: no std to judge by
    rising = summarize([_run("all", s, 0, 0.7, 1.0, curve=[0.5, 0.6 + s / 100]) for s in range(2)], ["all"])
    assert not plateau_check(rising)["held"]  # +0.105 against a seed std of 0.007
    table = render_markdown(_results(runs))
    rows = _rows(table)
    assert "62.5% ± 17.7" in rows["llkd (M=1)"] and "(1/2 seeds)" in rows["all"]
    assert "held." in table


def test_markdown_table_bolds_the_best_and_has_the_teacher_row() -> None:
    runs = [
        _run("llkd (M=4)", 0, 0.80, 0.78, 0.30, "llkd", 4),
        _run("llkd (M=4)", 1, 0.82, 0.80, 0.32, "llkd", 4),
        _run("all", 0, 0.70, 0.81, 1.0),
        _run("all", 1, 0.72, 0.83, 1.0),
    ]
    table = render_markdown(_results(runs))
    rows = _rows(table)
    assert "**0.810 ± 0.014**" in rows["llkd (M=4)"]  # best macro-F1
    assert "**0.820 ± 0.014**" in rows["all"]  # best accuracy
    assert "31.0% ± 1.4" in rows["llkd (M=4)"]  # data usage
    teacher = next(line for name, line in rows.items() if name.startswith("*teacher"))
    assert "0.690" in teacher and "**" not in teacher
    assert "71.0%" in table  # the teacher's agreement with the pool's hidden labels


def test_teacher_is_bold_when_it_beats_every_student() -> None:
    table = render_markdown(_results([_run("all", 0, 0.60, 0.61, 1.0)]))
    teacher = next(line for line in table.splitlines() if line.startswith("| *teacher"))
    assert "**0.690**" in teacher and "**0.700**" in teacher


def test_write_results_writes_json_markdown_and_png(tmp_path: Path) -> None:
    runs = [_run("llkd (M=1)", s, 0.7 + s / 100, 0.7, 0.2, "llkd") for s in range(2)]
    runs += [_run("random", s, 0.65, 0.66, 0.2, "random") for s in range(2)]
    paths = write_results(_results(runs), tmp_path)
    assert json.loads(paths["json"].read_text())["summary"]["random"]["seeds"] == 2
    assert paths["md"].read_text().startswith("# Quality benchmark: toy")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reuse_share_and_the_stop_go_into_the_tables_and_the_plot(tmp_path: Path) -> None:
    runs = [_run("llkd (M=1)", s, 0.7, 0.7, 0.2, "llkd") | {"reused_share": 0.5 + s / 10} for s in range(2)]
    runs[1] |= {"compute": 0.45, "stop": {"stopped_at": 0.4, "all_passes": 0.4, "churn": [None, 0.01, 0.0]}}
    paths = write_results(_results(runs), tmp_path)
    table = paths["md"].read_text()
    compute_row = next(line for line in table.split("## Where the compute goes")[1].splitlines() if "llkd" in line)
    assert "55.0% ± 7.1" in compute_row  # the share of scores reused, mean ± std over the seeds
    assert "## Label-free stop" in table
    assert "| llkd (M=1) seed 1 | 0.40 | 0.45 | 0.700 | –, 0.010, 0.000 |" in table
    assert "seed 0 |" not in table.split("## Label-free stop")[1]  # a run without the stop has no row
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seconds_per_point_add_up_to_the_runs_totals_and_a_loaded_run_is_marked(tmp_path: Path) -> None:
    """Each curve point keeps the compute seconds so far; the run's seconds are its last point's (the
    training summary's totals), per PFLOP beside the FLOPs; a load above the cores marks the run."""
    seconds = [(2.0, 6.0, 0.5), (4.0, 13.0, 1.0)]
    curve = [
        {"step": k, "all_passes": 0.5 * (k + 1), "flops": 2e15 * (k + 1), "macro_f1": f1, "accuracy": f1,
         "data_usage": 0.5, "per_class_f1": {}, "scoring_s": s, "training_s": t, "selection_s": sel}
        for k, ((s, t, sel), f1) in enumerate(zip(seconds, (0.6, 0.8), strict=True))
    ]  # fmt: skip
    summary = {
        "curve": curve, "steps": 2, "data_usage": {"pool_fraction": 0.5, "sample_step_fraction": 0.25},
        "compute": {"all_passes": 1.0, "flops": 4e15, "scoring_flops": 1e15},
        "scoring_s": 4.0, "training_s": 13.0, "selection_s": 1.0,
    }  # fmt: skip
    run = run_record(summary, Variant("llkd", 1), seed=0, key="k")
    assert [p["scoring_s"] + p["training_s"] + p["selection_s"] for p in run["curve"]] == [8.5, 18.0]
    assert run["compute_s"] == summary["scoring_s"] + summary["training_s"] + summary["selection_s"] == 18.0
    assert run["seconds_per_pflop"] == pytest.approx(18.0 / 4.0)

    quiet, loaded = load_record((0.3, 0.2, 0.1), (1.9, 1.0, 0.5), 2), load_record((2.4, 2, 2), (3.5, 3, 2), 2)
    assert not quiet["loaded"] and loaded["loaded"] and loaded["load_average"]["start"] == [2.4, 2, 2]
    runs = [
        _run("all", 0, 0.8, 0.8, 1.0) | {"compute_s": 10.0, "seconds_per_pflop": 5.0} | quiet,
        run | {"variant": "llkd (M=1)", "strategy": "llkd"} | loaded,
    ]
    runs[0]["curve"][-1] |= {"scoring_s": 0.0, "training_s": 9.0, "selection_s": 1.0}
    table = write_results(_results(runs), tmp_path)["md"].read_text()
    section = table.split("## Seconds beside FLOPs")[1].split("\n\n")[1]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert rows["all"].split("|")[2:6] == [" 10.0 ± 0.0 ", " 5.0 ± 0.0 ", " 10.0 ± 0.0 ", " 0 of 1 "]
    # llkd reaches all's best (0.8) at its second point, after 18 compute seconds; it ran under load
    assert rows["llkd (M=1)"].split("|")[2:6] == [" 18.0 ± 0.0 ", " 4.5 ± 0.0 ", " 18.0 ± 0.0 ", " 1 of 1 "]


@pytest.mark.parametrize(
    "content",
    [
        "neg: a bad review\npos: a good review\n",
        "- {name: neg, description: a bad review}\n- {name: pos, description: a good review}\n",
        "labels:\n  neg: a bad review\n  pos: a good review\n",
        "task:\n  labels:\n    - {name: neg, description: a bad review}\n"
        "    - {name: pos, description: a good review}\n",
    ],
)
def test_label_descriptions_in_every_shape(tmp_path: Path, content: str) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text(content)
    specs = read_label_specs(path)
    assert [(s.name, s.description) for s in specs] == [("neg", "a bad review"), ("pos", "a good review")]


def test_bad_label_descriptions_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text("just a string\n")
    with pytest.raises(DataError, match="expected a mapping"):
        read_label_specs(path)
    path.write_text("only: one label\n")
    with pytest.raises(DataError, match="labels"):
        read_label_specs(path)
    with pytest.raises(DataError, match="not found"):
        read_label_specs(tmp_path / "absent.yaml")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_custom_pool_and_gold_are_sampled_with_ids(tmp_path: Path) -> None:
    pool = _write_jsonl(tmp_path / "pool.jsonl", [{"text": f"text {i}", "label": "neg"} for i in range(50)])
    gold = _write_jsonl(tmp_path / "gold.jsonl", [{"text": f"gold {i}", "label": "pos"} for i in range(10)])
    labels = tmp_path / "labels.yaml"
    labels.write_text("neg: a bad review\npos: a good review\n")
    data = prepare_data(
        dataset=None, pool=str(pool), gold=str(gold), labels_file=str(labels),
        pool_size=20, gold_size=None, sample_seed=0, directory=tmp_path / "work",
    )  # fmt: skip
    assert (data.pool_rows, data.gold_rows) == (20, 10)
    written = [json.loads(line) for line in data.pool_path.read_text().splitlines()]
    assert len({row["id"] for row in written}) == 20 and all(row["text"].startswith("text ") for row in written)
    assert data.pool_has_labels and set(data.pool_labels.values()) == {"neg"}
    assert set(data.gold_labels.values()) == {"pos"}
    again = prepare_data(
        dataset=None, pool=str(pool), gold=str(gold), labels_file=str(labels),
        pool_size=20, gold_size=None, sample_seed=0, directory=tmp_path / "again",
    )  # fmt: skip
    assert again.pool_path.read_text() == data.pool_path.read_text()  # the sample is reproducible


def test_gold_label_outside_the_label_set_fails(tmp_path: Path) -> None:
    pool = _write_jsonl(tmp_path / "pool.jsonl", [{"text": "x"}])
    gold = _write_jsonl(tmp_path / "gold.jsonl", [{"text": "y", "label": "maybe"}])
    labels = tmp_path / "labels.yaml"
    labels.write_text("neg: a bad review\npos: a good review\n")
    with pytest.raises(DataError, match="'maybe' is not one of neg, pos"):
        prepare_data(
            dataset=None, pool=str(pool), gold=str(gold), labels_file=str(labels),
            pool_size=None, gold_size=None, sample_seed=0, directory=tmp_path / "work",
        )  # fmt: skip


def test_builtin_dataset_uses_the_shipped_label_descriptions(tmp_path: Path) -> None:
    data = prepare_data(
        dataset="builtin:trec", pool=None, gold=None, labels_file=None,
        pool_size=100, gold_size=50, sample_seed=0, directory=tmp_path,
    )  # fmt: skip
    assert [label.name for label in data.labels] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert (data.pool_rows, data.gold_rows) == (100, 50) and data.pool_has_labels


def test_run_configs_share_everything_but_strategy_m_and_seed(tmp_path: Path) -> None:
    data = prepare_data(
        dataset="builtin:sst2", pool=None, gold=None, labels_file=None,
        pool_size=10, gold_size=10, sample_seed=0, directory=tmp_path,
    )  # fmt: skip
    settings = BenchSettings(steps=7, overrides=["selection.weighting=none"])
    base = base_config(data, settings)
    one = run_config(base, Variant("llkd", 4), seed=2, pool_rows=10)
    two = run_config(base, Variant("random"), seed=0, pool_rows=10)
    assert (one.selection.strategy, one.selection.candidates_per_step, one.training.seed) == ("llkd", 4, 2)
    assert (two.selection.strategy, two.selection.candidates_per_step, two.training.seed) == ("random", 1, 0)
    for config in (one, two):
        assert config.training.max_steps == 7 and config.selection.weighting == "none"
        assert config.data.input == str(data.pool_path) and config.data.id_column == "id"
    assert base.selection.strategy == "llkd" and base.training.seed == 0  # the base is untouched


def test_cli_rejects_incomplete_custom_data_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llkd_ray.cli", "bench", "quality", "--pool", "p.jsonl", "--output", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--gold, --labels" in result.stderr and "Traceback" not in result.stderr


def test_reuse_takes_runs_of_the_same_settings_only(tmp_path: Path) -> None:
    data = prepare_data(
        dataset="builtin:sst2", pool=None, gold=None, labels_file=None,
        pool_size=10, gold_size=10, sample_seed=0, directory=tmp_path,
    )  # fmt: skip
    settings = BenchSettings(seeds=2)
    earlier = {
        "data": {"name": "sst2", "pool_rows": 10, "gold_rows": 10},
        "settings": vars(BenchSettings(seeds=2, cpus_per_worker=7.0)) | {"variants": ["all"]},
        "runs": [_run("all", 0, 0.7, 0.7, 1.0), _run("all", 1, 0.72, 0.7, 1.0)],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(earlier))
    reused = reusable_runs([path], data, settings)
    assert sorted(reused) == [("all", 0), ("all", 1)] and reused[("all", 1)]["macro_f1"] == 0.72
    with pytest.raises(ConfigError, match=r"other settings \(budget\)"):
        reusable_runs([path], data, BenchSettings(seeds=2, budget=2.0))
