"""``results.md``: the mean ± std tables and notes; :func:`write_results` writes the three output files.

The tables read ``results.json``'s content only (its summary, teacher and plateau check), so
``--report-only`` and a committed ``results.json`` redraw them without training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llkd_ray.artifacts import write_json, write_text
from llkd_ray.quality.labeling import labeling_lines
from llkd_ray.quality.plots import render_plot
from llkd_ray.quality.settings import BenchSettings

#: Metrics of the table, in column order: (key, header).
METRICS = (("macro_f1", "macro-F1"), ("accuracy", "accuracy"))


def _cell(mean: float | None, std: float | None, *, as_percent: bool = False, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if as_percent:
        return f"{100 * mean:.1f}% ± {100 * (std or 0):.1f}"
    return f"{mean:.{digits}f} ± {(std or 0):.{digits}f}"


def _milestone(entry: dict[str, Any], label: str) -> str:
    reached = entry.get(f"to_{label}_reached")
    if reached is None:
        return "–"
    if not reached:
        return "not reached"
    cell = _cell(entry[f"to_{label}_mean"], entry[f"to_{label}_std"], as_percent=True)
    return cell if reached == entry["seeds"] else f"{cell} ({reached}/{entry['seeds']} seeds)"


def render_markdown(results: dict[str, Any]) -> str:
    """The mean ± std tables: final and best macro-F1, compute to match, data usage, where compute goes."""
    settings = results["settings"]
    data = results["data"]
    budget = BenchSettings(**{k: settings[k] for k in ("budget", "steps", "batch_size")}).budget_text
    lines = [
        f"# Quality benchmark: {data['name']}",
        "",
        f"Pool {data['pool_rows']:,} rows (of {int(data['pool_total']):,}), gold {data['gold_rows']:,} rows; "
        f"teacher `{settings['teacher']}`, student `{settings['student']}`; {budget}; batch "
        f"{settings['batch_size']}, lr {settings['learning_rate']:g}, max length {settings['max_length']}, "
        f"momentum {settings['momentum']}; {settings.get('eval_points', 1)} gold-set evaluations along each run; "
        f"mean ± std over seeds (up to {settings['seeds']}).",
        "",
        *_quality_table(results["summary"], results["teacher"]),
        "",
        "Compute is a fraction of `all`'s full budget (FLOPs: 2·N per token scored in inference mode, "
        "6·N per token trained; N the student's non-embedding parameters). *Macro-F1 at the full budget* "
        "is the end of the run: no early stopping, as in production, where no gold set tells when to stop. "
        "*Compute to …*: where the curve first reaches that macro-F1 (the teacher's, or the mean over "
        "`all`'s seeds of its best point). Data usage: the fraction of the pool selected at least once.",
        "",
        "## Where the compute goes",
        "",
        *_compute_table(results["summary"]),
        "",
        "## Seconds beside FLOPs",
        "",
        *_seconds_table(results["summary"]),
        "",
        "Compute seconds: scoring, training and selection seconds of the run (rank 0's; start-up, "
        "evaluation and checkpoints excluded). FLOPs do not depend on the machine or its load; seconds do: "
        "a run under load (other processes used more than a tenth of the machine's cores during it; "
        "llkd_ray/quality/quiet.py) is counted in the last column, and its seconds are not comparable "
        "with a quiet run's.",
        "",
        *_stop_table(results.get("runs", [])),
        *labeling_lines(results),
        *_notes(results.get("plateau"), results["teacher"]),
    ]
    return "\n".join(lines) + "\n"


def _quality_table(summary: dict[str, dict[str, Any]], teacher: dict[str, Any]) -> list[str]:
    """The main table: one row per variant and the teacher's; the best of each metric in bold."""
    best = {
        key: max(
            [entry[f"{key}_mean"] for entry in summary.values() if f"{key}_mean" in entry] + [teacher[key]],
            default=math.nan,
        )
        for key, _ in METRICS
    }
    best["best_macro_f1"] = max(
        [e["best_macro_f1_mean"] for e in summary.values() if "best_macro_f1_mean" in e], default=math.nan
    )

    def metric(key: str, mean: float, std: float | None) -> str:
        text = _cell(mean, std) if std is not None else f"{mean:.3f}"
        return f"**{text}**" if round(mean, 3) == round(best[key], 3) else text

    lines = [
        "| strategy | macro-F1 at the full budget | accuracy | best macro-F1 on the curve | reached at "
        "| compute to the teacher's F1 | compute to `all`'s best | data usage | seeds |",
        "|---|" + "---:|" * 8,
    ]
    for name, entry in summary.items():
        cells = [metric(key, entry[f"{key}_mean"], entry[f"{key}_std"]) for key, _ in METRICS]
        if "best_macro_f1_mean" in entry:
            cells.append(metric("best_macro_f1", entry["best_macro_f1_mean"], entry["best_macro_f1_std"]))
            cells.append(_cell(entry["best_at_mean"], entry["best_at_std"], as_percent=True))
        else:
            cells += ["–", "–"]
        cells += [_milestone(entry, "teacher"), _milestone(entry, "all_best")]
        cells.append(_cell(entry.get("data_usage_mean"), entry.get("data_usage_std"), as_percent=True))
        cells.append(str(entry["seeds"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    teacher_cells = [metric(key, teacher[key], None) for key, _ in METRICS]
    lines.append("| *teacher (zero-shot, labels the pool)* | " + " | ".join(teacher_cells + ["–"] * 6) + " |")
    return lines


def _compute_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Spent compute, its scoring share, the share of scores reused, sample-steps trained and wall time."""
    lines = [
        "| strategy | FLOPs spent (passes of `all`) | scoring share of FLOPs | scores reused "
        "| sample-steps trained | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in summary.items():
        lines.append(
            f"| {name} | {_cell(entry.get('compute_mean'), entry.get('compute_std'), digits=2)} | "
            f"{_cell(entry.get('scoring_share_mean'), entry.get('scoring_share_std'), as_percent=True)} | "
            f"{_cell(entry.get('reused_share_mean'), entry.get('reused_share_std'), as_percent=True)} | "
            f"{_cell(entry.get('sample_step_usage_mean'), entry.get('sample_step_usage_std'), as_percent=True)} | "
            f"{_cell(entry.get('wall_time_s_mean'), entry.get('wall_time_s_std'), digits=0)} |"
        )
    return lines


def _seconds_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    """What the FLOPs cost in seconds: compute seconds spent, seconds per PFLOP, seconds to ``all``'s best."""
    lines = [
        "| strategy | compute seconds | seconds per PFLOP | seconds to `all`'s best | runs under load |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in summary.items():
        lines.append(
            f"| {name} | {_cell(entry.get('compute_s_mean'), entry.get('compute_s_std'), digits=1)} | "
            f"{_cell(entry.get('seconds_per_pflop_mean'), entry.get('seconds_per_pflop_std'), digits=1)} | "
            f"{_cell(entry.get('seconds_to_all_best_mean'), entry.get('seconds_to_all_best_std'), digits=1)} | "
            f"{entry.get('loaded_runs', 0)} of {entry['seeds']} |"
        )
    return lines


def _stop_table(runs: list[dict[str, Any]]) -> list[str]:
    """``training.stop: auto``: per run, where the stop was called and the macro-F1 the run ended at."""
    stopped = [run for run in runs if run.get("stop")]
    if not stopped:
        return []
    lines = [
        "## Label-free stop (`training.stop: auto`)",
        "",
        "| run | stop called at (passes of `all`) | run ended at (passes of `all`) | macro-F1 at the end "
        "| churn checks |",
        "|---|---:|---:|---:|---|",
    ]
    for run in stopped:
        stop = run["stop"]
        at = "not called" if stop.get("all_passes") is None else f"{stop['all_passes']:.2f}"
        churn = ", ".join("–" if c is None else f"{c:.3f}" for c in stop.get("churn", []))
        lines.append(
            f"| {run['variant']} seed {run['seed']} | {at} | {run['compute']:.2f} | {run['macro_f1']:.3f} | {churn} |"
        )
    return [*lines, ""]


def _notes(plateau: dict[str, Any] | None, teacher: dict[str, Any]) -> list[str]:
    """Whether ``all``'s curve plateaued; how often the teacher's pseudo-labels were right on the pool."""
    lines = []
    if plateau is not None:
        if plateau["held"] is None:
            verdict = "not judged (one seed: no seed std to hold the change against)"
        else:
            verdict = "held" if plateau["held"] else "did **not** hold (a longer budget may change the ranking)"
        peak = "; its best point lies before the end" if plateau["peaked_before_end"] else ""
        lines.append(
            f"`all`'s curve has peaked or plateaued — its last two points differ by "
            f"{plateau['last_change']:+.3f}, its seed std at the end is {plateau['last_std']:.3f}{peak}: {verdict}."
        )
    if teacher.get("pool_accuracy") is not None:
        lines.append(
            f"The teacher's pseudo-labels agree with the pool's hidden gold labels on "
            f"{100 * teacher['pool_accuracy']:.1f}% of rows "
            f"(mean confidence {teacher.get('pool_mean_confidence') or math.nan:.3f})."
        )
    return lines


def write_results(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``quality.png`` into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "results.json", "md": output / "results.md", "png": output / "quality.png"}
    write_json(paths["json"], results)
    write_text(paths["md"], render_markdown(results))
    render_plot(results, paths["png"])
    return paths
