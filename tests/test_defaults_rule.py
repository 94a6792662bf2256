"""The rule that picks the defaults (benchmarks/defaults_rule.py, docs/method.md), on fabricated results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rule():
    spec = importlib.util.spec_from_file_location("defaults_rule", ROOT / "benchmarks" / "defaults_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(path: Path, dataset: str, overrides: list[str], runs: list[tuple]) -> Path:
    """runs: (variant, seed, macro_f1, scoring_share, seconds_per_pflop or None, loaded)."""
    rows = [
        {"variant": v, "seed": s, "macro_f1": f1, "scoring_share": share, "seconds_per_pflop": sec, "loaded": loaded}
        for v, s, f1, share, sec, loaded in runs
    ]
    path.mkdir(parents=True)
    (path / "results.json").write_text(
        json.dumps({"data": {"name": dataset}, "settings": {"overrides": overrides}, "runs": rows})
    )
    return path


def _committed(tmp_path: Path, dataset: str, default_f1: float) -> Path:
    """3 seeds of `all` and today's default, measured under load (no usable seconds)."""
    runs = [("all", s, 0.50, 0.0, 30.0, True) for s in range(3)]
    runs += [("llkd (M=1)", s, default_f1 + 0.01 * (s - 1), 0.65, 30.0, True) for s in range(3)]
    return _results(tmp_path / f"committed-{dataset}", dataset, [], runs)


def _quiet(tmp_path: Path, dataset: str) -> Path:
    """A quiet rerun of seed 0 of both (other F1: the committed seeds keep theirs)."""
    runs = [("all", 0, 0.40, 0.0, 10.0, False), ("llkd (M=1)", 0, 0.40, 0.65, 10.0, False)]
    return _results(tmp_path / f"quiet-{dataset}", dataset, [], runs)


def _candidate(tmp_path: Path, dataset: str, name: str, overrides: list[str], f1: float, share: float, sec: float):
    runs = [("llkd (fill, M≤8)", s, f1 + 0.01 * (s - 1), share, sec, False) for s in range(3)]
    return _results(tmp_path / f"{name}-{dataset}", dataset, overrides, runs)


def test_the_rule_picks_the_best_eligible_configuration_and_names_why_the_others_are_not(tmp_path) -> None:
    rule = _rule()
    paths = []
    for dataset in ("a", "b"):
        paths += [_committed(tmp_path, dataset, 0.60), _quiet(tmp_path, dataset)]
        paths.append(_candidate(tmp_path, dataset, "fast", ["selection.score_ttl=8"], 0.62, 0.20, 10.5))
        paths.append(_candidate(tmp_path, dataset, "slow", ["selection.score_ttl=4"], 0.70, 0.10, 14.0))
        paths.append(_candidate(tmp_path, dataset, "worse", ["selection.score_ttl=2"], 0.55, 0.10, 10.0))
    table = rule.tabulate(rule.read_results(paths))
    # the committed 3 seeds keep their F1; the quiet rerun lends its seconds
    assert table["all"]["a"]["seeds"] == 3 and table["all"]["a"]["f1"] == 0.50
    assert table["all"]["a"]["seconds_per_pflop"] == 10.0
    verdict = rule.apply_rule(table, "llkd (M=1)")
    fast = "llkd (fill, M≤8), selection.score_ttl=8"
    assert verdict["pick"] == fast
    slow = verdict["verdicts"]["llkd (fill, M≤8), selection.score_ttl=4"]
    assert slow["ineligible"] == ["1.40x `all`'s seconds per PFLOP on a", "1.40x `all`'s seconds per PFLOP on b"]
    assert verdict["verdicts"]["llkd (fill, M≤8), selection.score_ttl=2"]["below_default"]
    assert verdict["verdicts"]["llkd (M=1)"]["ineligible"] == ["scoring 65 % on a", "scoring 65 % on b"]
    assert "Pick: **" + fast in rule.report(table, verdict, "llkd (M=1)")


def test_with_nothing_eligible_and_complete_the_defaults_stay(tmp_path) -> None:
    rule = _rule()
    paths = [_committed(tmp_path, "a", 0.60), _quiet(tmp_path, "a")]
    # one data set only: a candidate not run on the other is incomplete, whatever its figures
    paths += [_committed(tmp_path, "b", 0.60), _quiet(tmp_path, "b")]
    paths.append(_candidate(tmp_path, "a", "fast", ["selection.score_ttl=8"], 0.70, 0.20, 10.0))
    table = rule.tabulate(rule.read_results(paths))
    verdict = rule.apply_rule(table, "llkd (M=1)")
    assert verdict["pick"] is None
    assert verdict["verdicts"]["llkd (fill, M≤8), selection.score_ttl=8"]["ineligible"] == ["not run on b"]
    assert "the defaults stay (`llkd (M=1)`)" in rule.report(table, verdict, "llkd (M=1)")


def test_runs_named_quiet_lend_their_seconds_whatever_their_mark(tmp_path) -> None:
    rule = _rule()
    marked = _results(tmp_path / "marked", "a", [], [("all", 0, 0.5, 0.0, 12.0, True)])
    assert rule.tabulate(rule.read_results([marked]))["all"]["a"]["seconds_per_pflop"] is None
    table = rule.tabulate(rule.read_results([marked], quiet=[marked]))
    assert table["all"]["a"]["seconds_per_pflop"] == 12.0 and table["all"]["a"]["quiet_runs"] == 1
