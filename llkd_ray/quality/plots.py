"""``quality.png``: macro-F1 against compute (mean curve ± std per strategy) and against data usage.

matplotlib (Agg backend) is imported when the plot is drawn, not when the benchmark is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llkd_ray.quality.settings import BenchSettings
from llkd_ray.quality.summary import full_compute


def render_plot(results: dict[str, Any], path: Path) -> None:
    """Left: gold macro-F1 against compute, a mean curve and ±std band per strategy, the teacher a
    line. Right: final macro-F1 against data usage (mean ± std, the seeds faint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    figure, (curves, usage) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    colors = plt.get_cmap("tab10")
    full = full_compute(results["runs"]) or 1.0
    for index, (name, entry) in enumerate(summary.items()):
        color = colors(index % 10)
        curve = entry.get("curve") or []
        if curve:
            x = [100 * p["all_passes"] / full for p in curve]
            y = [p["macro_f1"] for p in curve]
            band = [p["macro_f1_std"] for p in curve]
            curves.plot(x, y, marker="o", markersize=3, color=color, label=name)
            curves.fill_between(
                x, [a - b for a, b in zip(y, band, strict=True)], [a + b for a, b in zip(y, band, strict=True)],
                color=color, alpha=0.15, linewidth=0,
            )  # fmt: skip
        seeds = [run for run in results["runs"] if run["variant"] == name]
        stops = [run for run in seeds if (run.get("stop") or {}).get("all_passes") is not None]
        if stops:  # training.stop: auto — where each run ended after its stop was called
            curves.scatter(
                [100 * run["compute"] / full for run in stops], [run["macro_f1"] for run in stops],
                marker="X", s=60, color=color, edgecolors="black", zorder=5, label=f"{name}: stop (auto)",
            )  # fmt: skip
        usage.scatter(
            [100 * run["data_usage"] for run in seeds], [run["macro_f1"] for run in seeds],
            color=color, alpha=0.3, s=18, linewidths=0,
        )  # fmt: skip
        usage.errorbar(
            100 * entry["data_usage_mean"], entry["macro_f1_mean"],
            xerr=100 * entry["data_usage_std"], yerr=entry["macro_f1_std"],
            fmt="o", color=color, markersize=8, capsize=3, label=name,
        )  # fmt: skip
    teacher = results["teacher"]["macro_f1"]
    for axes in (curves, usage):
        axes.axhline(teacher, color="0.4", linestyle="--", linewidth=1, label=f"teacher ({teacher:.3f})")
        axes.set_ylabel("macro-F1 on the gold set")
        axes.grid(alpha=0.3)
    curves.set_xlabel("compute spent (% of `all`'s full budget, FLOPs)")
    usage.set_xlabel("data usage at the end (% of the pool selected at least once)")
    usage.set_xlim(0, 105)
    settings = results["settings"]
    budget = BenchSettings(**{k: settings[k] for k in ("budget", "steps", "batch_size")}).budget_text
    seeds = max((e["seeds"] for e in summary.values()), default=0)
    figure.suptitle(f"{results['data']['name']}: {budget}; mean ± std over up to {seeds} seed(s)", fontsize=10)
    curves.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
