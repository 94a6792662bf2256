"""Aggregation over seeds: mean ± std per variant, mean learning curves, their milestones, the plateau check.

Pure functions of the runs as ``results.json`` holds them (no training, no files), shared by the
tables (:mod:`llkd_ray.quality.tables`), the plot (:mod:`llkd_ray.quality.plots`) and
``results.json``'s summary (:mod:`llkd_ray.quality.runs`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from llkd_ray.compute import compute_seconds


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def full_compute(runs: list[dict[str, Any]]) -> float | None:
    """``all``'s spent compute at the end of its runs (passes of ``all``): the unit of the compute axis.

    Without ``all`` among the runs, the mean spent compute of every run (the shared budget).
    """
    finished = [run for run in runs if run.get("curve")]
    spent = [run["curve"][-1]["all_passes"] for run in finished if run["strategy"] == "all"]
    spent = spent or [run["curve"][-1]["all_passes"] for run in finished]
    return statistics.fmean(spent) if spent else None


def all_best_f1(runs: list[dict[str, Any]]) -> float | None:
    """``all``'s best macro-F1: the mean over its seeds of each curve's best point (None without ``all``)."""
    curves = [run["curve"] for run in runs if run["strategy"] == "all" and run.get("curve")]
    return statistics.fmean(max(p["macro_f1"] for p in curve) for curve in curves) if curves else None


def first_reaching(curve: list[dict[str, Any]], target: float) -> float | None:
    """The compute (passes of ``all``) at the first curve point with macro-F1 >= ``target``."""
    return next((point["all_passes"] for point in curve if point["macro_f1"] >= target - 1e-12), None)


def first_seconds_reaching(curve: list[dict[str, Any]], target: float) -> float | None:
    """The compute seconds (scoring + training + selection) at the first curve point with macro-F1
    >= ``target``; None when it is never reached or the curve kept no seconds."""
    point = next((point for point in curve if point["macro_f1"] >= target - 1e-12), None)
    return compute_seconds(point) if point is not None else None


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Point-wise mean ± std over seeds (the k-th evaluation of every seed, at the same budget fraction)."""
    curves = [run["curve"] for run in runs if run.get("curve")]
    if not curves:
        return []
    length = min(len(curve) for curve in curves)
    out = []
    for k in range(length):
        compute, _ = mean_std([curve[k]["all_passes"] for curve in curves])
        f1, f1_std = mean_std([curve[k]["macro_f1"] for curve in curves])
        usage, _ = mean_std([curve[k].get("data_usage", math.nan) for curve in curves])
        out.append({"all_passes": compute, "macro_f1": f1, "macro_f1_std": f1_std, "data_usage": usage})
    return out


def summarize(
    runs: list[dict[str, Any]], variants: Iterable[str], teacher_f1: float | None = None
) -> dict[str, dict[str, Any]]:
    """Mean and sample std over seeds, per variant, of every reported number; the curves' milestones.

    Milestones (from each seed's learning curve, compute as a fraction of ``all``'s full budget):
    the best macro-F1 and where it was reached, and the compute at which the curve first reaches
    the teacher's macro-F1 and ``all``'s best (mean over ``all``'s seeds of their best).
    """
    summary: dict[str, dict[str, Any]] = {}
    full = full_compute(runs)
    all_best = all_best_f1(runs)
    for name in variants:
        mine = [run for run in runs if run["variant"] == name]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "seeds": len(mine),
            "strategy": mine[0]["strategy"],
            "candidates_per_step": mine[0]["candidates_per_step"],
        }
        for key in (
            "accuracy", "macro_f1", "data_usage", "sample_step_usage", "wall_time_s", "scoring_share", "compute",
            "reused_share", "compute_s", "seconds_per_pflop",
        ):  # fmt: skip
            values = [float(run[key]) for run in mine if run.get(key) is not None]
            if values:
                entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std(values)
        entry["loaded_runs"] = sum(bool(run.get("loaded")) for run in mine)
        curves = [run["curve"] for run in mine if run.get("curve")]
        if curves and all_best is not None:
            seconds = [first_seconds_reaching(curve, all_best) for curve in curves]
            reached_s = [s for s in seconds if s is not None]
            if reached_s:
                entry["seconds_to_all_best_mean"], entry["seconds_to_all_best_std"] = mean_std(reached_s)
        if curves and full:
            best = [max(curve, key=lambda p: p["macro_f1"]) for curve in curves]
            entry["best_macro_f1_mean"], entry["best_macro_f1_std"] = mean_std([p["macro_f1"] for p in best])
            entry["best_at_mean"], entry["best_at_std"] = mean_std([p["all_passes"] / full for p in best])
            targets = {"teacher": teacher_f1, "all_best": all_best}
            for label, target in targets.items():
                if target is None:
                    continue
                reached = [c / full for c in (first_reaching(curve, target) for curve in curves) if c is not None]
                entry[f"to_{label}_reached"] = len(reached)
                if reached:
                    entry[f"to_{label}_mean"], entry[f"to_{label}_std"] = mean_std(reached)
            entry["curve"] = mean_curve(mine)
        summary[name] = entry
    return summary


def plateau_check(summary: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Whether ``all``'s mean curve has plateaued: its last two points differ by less than its seed
    std at the last point (``held`` None with one seed); whether its best lies before the end."""
    entry = summary.get("all")
    curve = entry.get("curve") if entry else None
    if not curve or len(curve) < 2:
        return None
    last, before = curve[-1], curve[-2]
    change = last["macro_f1"] - before["macro_f1"]
    peaked = max(point["macro_f1"] for point in curve[:-1]) > last["macro_f1"]
    # The test: the last two points differ by less than the seed std (none with one seed).
    held = abs(change) < last["macro_f1_std"] if entry["seeds"] > 1 else None
    return {
        "held": held,
        "last_change": change,
        "last_std": last["macro_f1_std"],
        "peaked_before_end": peaked,
        "seeds": entry["seeds"],
    }
