"""The report's PNG plots: one function per plot, each drawn from a :class:`RunData`, and ``PLOTS``.

A plot function returns ``None`` (and draws nothing) when its inputs are not in the run.
matplotlib's Agg backend is imported when a plot is drawn (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llkd_ray.report.run_data import RunData

_TEACHER_COLOR = "#d95f02"
_STUDENT_COLOR = "#1b9e77"
_OTHER_COLOR = "#7570b3"


# --------------------------------------------------------------------------- series helpers


def _step_axis(steps: list[dict[str, Any]]) -> list[int]:
    return [int(r.get("step", i + 1)) for i, r in enumerate(steps)]


def _per_class(record: dict[str, Any], key: str, names: Sequence[str]) -> list[float]:
    """A per-class vector in label order from a ``{label: value}`` mapping (NaN where missing)."""
    value = record.get(key) or {}
    return [float(value[name]) if value.get(name) is not None else math.nan for name in names]


def _usage_value(record: dict[str, Any], which: str) -> float:
    """Cumulative data usage of a step record: ``pool_fraction`` or ``sample_step_fraction``."""
    value = (record.get("data_usage") or {}).get(which)
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------- plots


def _figure(width: float = 7.5, height: float = 3.6, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_thresholds(run: RunData, path: Path) -> Path | None:
    names = run.label_names
    if not any("teacher_thresholds" in r for r in run.steps):
        return None
    fig, (left, right) = _figure(10, 3.8, ncols=2)
    x = _step_axis(run.steps)
    for axis, key, title in (
        (left, "teacher_thresholds", "teacher confidence threshold τT[k]"),
        (right, "student_thresholds", "student uncertainty threshold τS[k]"),
    ):
        vectors = [_per_class(r, key, names) for r in run.steps]
        for k, name in enumerate(names):
            axis.plot(x, [v[k] for v in vectors], label=name, linewidth=1.4)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_selection(run: RunData, path: Path) -> Path | None:
    if not run.steps:
        return None
    x = _step_axis(run.steps)
    fig, (axis,) = _figure()
    fraction = [r.get("selected_fraction", math.nan) for r in run.steps]
    _plot_with_mean(axis, x, fraction, _OTHER_COLOR, "selected fraction of the batch")
    axis.plot(
        x,
        [_usage_value(r, "pool_fraction") for r in run.steps],
        color=_STUDENT_COLOR,
        linewidth=2,
        label="cumulative: pool rows ever selected",
    )
    axis.plot(
        x,
        [_usage_value(r, "sample_step_fraction") for r in run.steps],
        color=_TEACHER_COLOR,
        linewidth=2,
        linestyle="--",
        label="cumulative: selected sample-steps / all",
    )
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("step")
    axis.set_ylabel("fraction")
    axis.set_title("Selection and data usage", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _plot_with_mean(axis, x: Sequence[float], values: Sequence[float], color: str, label: str) -> None:
    """A noisy per-step series drawn faint, with its trailing mean (about 1/15 of the steps) on top."""
    axis.plot(x, values, color=color, alpha=0.35, linewidth=1, label=label)
    if len(values) >= 5:
        import pandas as pd

        window = max(3, len(values) // 15)
        mean = pd.Series(values, dtype=float).rolling(window, min_periods=1).mean()  # NaN skipped
        axis.plot(x, mean, color=color, linewidth=2, label=f"{label} ({window}-step mean)")


def plot_training(run: RunData, path: Path) -> Path | None:
    if not run.steps and not run.gold_evals:
        return None
    fig, (left, right) = _figure(10, 3.8, ncols=2)
    x = _step_axis(run.steps)
    # A step that selected nothing back-propagates nothing: its loss is no loss, leave it out.
    loss = [r["loss"] if r.get("loss") is not None and r.get("selected", 1) else math.nan for r in run.steps]
    _plot_with_mean(left, x, loss, _OTHER_COLOR, "loss")
    left.set_title("training loss (selected samples, weighted)", fontsize=10)
    left.set_xlabel("step")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper right")
    right.set_title("gold-set macro-F1", fontsize=10)
    right.set_xlabel("step")
    points = [(r["step"], r["macro_f1"]) for r in run.gold_evals if r.get("macro_f1") is not None]
    if points:
        right.plot(
            [s for s, _ in points],
            [v for _, v in points],
            marker="o",
            color=_STUDENT_COLOR,
            label="student (during training)",
        )
    student = run.evaluation.get("student", {}).get("macro_f1")
    teacher = run.evaluation.get("teacher", {}).get("macro_f1")
    last = max(x) if x else (points[-1][0] if points else 1)
    if student is not None:
        right.plot(
            [last],
            [student],
            marker="*",
            markersize=14,
            color=_STUDENT_COLOR,
            linestyle="none",
            label=f"student, final ({student:.3f})",
        )
    if teacher is not None:
        right.axhline(teacher, color=_TEACHER_COLOR, linestyle="--", label=f"teacher ({teacher:.3f})")
    if x:
        right.set_xlim(0, max(x) * 1.03)
    if not (points or student is not None or teacher is not None):
        right.text(0.5, 0.5, "no gold-set evaluation recorded", ha="center", va="center", transform=right.transAxes)
    else:
        right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3)
    return _save(fig, path)


def plot_compute(run: RunData, path: Path) -> Path | None:
    """Spent compute by kind (cumulative FLOPs of scoring and of training) and the wall time split."""
    records = [r for r in run.steps if isinstance(r.get("compute"), dict)]
    if not records:
        return None
    fig, (left, right) = _figure(10, 3.8, ncols=2)
    x = _step_axis(records)
    scoring = [r["compute"]["scoring_flops"] for r in records]
    training = [r["compute"]["training_flops"] for r in records]
    kinds = ["scoring (inference-mode forward, 2N/token)", "training (forward+backward, 6N/token)"]
    left.stackplot(x, scoring, training, labels=kinds, colors=[_TEACHER_COLOR, _STUDENT_COLOR], alpha=0.7)
    left.set_title("compute spent (FLOPs, cumulative)", fontsize=10)
    left.set_xlabel("step")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper left")
    last = records[-1]["compute"]
    seconds = [("scoring", last["scoring_s"]), ("training", last["training_s"]), ("selection", last["selection_s"])]
    right.bar([k for k, _ in seconds], [v for _, v in seconds], color=[_TEACHER_COLOR, _STUDENT_COLOR, _OTHER_COLOR])
    right.set_title("wall time by kind (s, rank 0)", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_confidence(run: RunData, path: Path) -> Path | None:
    labels = run.labels
    if labels is None or "confidence" not in labels:
        return None
    import numpy as np

    confidence = labels["confidence"].to_numpy(dtype=float)
    has_gold = "gold_label" in labels and labels["gold_label"].notna().any()
    ncols = 2 if has_gold else 1
    fig, axes = _figure(10 if has_gold else 6, 3.8, ncols=ncols)
    k = max(len(run.label_names), 2)
    bins = np.linspace(1.0 / k, 1.0, 21)
    axis = axes[0]
    if run.selected_ids is not None:
        selected = labels["id"].astype(str).isin(run.selected_ids).to_numpy()
        axis.hist(
            [confidence[selected], confidence[~selected]],
            bins=bins,
            stacked=True,
            color=[_STUDENT_COLOR, "#bbbbbb"],
            label=[f"selected at least once ({int(selected.sum())})", f"never selected ({int((~selected).sum())})"],
        )
        axis.legend(fontsize=8, loc="upper left")
        axis.set_title("teacher confidence: selected vs never selected", fontsize=10)
    else:
        axis.hist(confidence, bins=bins, color=_TEACHER_COLOR, alpha=0.8)
        axis.set_title("teacher confidence (selection not recorded)", fontsize=10)
    axis.set_xlabel("teacher confidence of its pseudo-label")
    axis.set_ylabel("rows")
    if has_gold:
        known = labels["gold_label"].notna().to_numpy()
        correct = (labels["pseudo_label"].astype(str) == labels["gold_label"].astype(str)).to_numpy() & known
        wrong = known & ~correct
        axis = axes[1]
        axis.hist(
            [confidence[correct], confidence[wrong]],
            bins=bins,
            stacked=True,
            color=[_STUDENT_COLOR, "#e7298a"],
            label=[f"correct ({int(correct.sum())})", f"wrong ({int(wrong.sum())})"],
        )
        axis.set_title("teacher confidence: correct vs wrong (hidden pool labels)", fontsize=10)
        axis.set_xlabel("teacher confidence of its pseudo-label")
        axis.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_confusion(run: RunData, path: Path) -> Path | None:
    matrices = [
        (who, run.evaluation[who]["confusion"])
        for who in ("teacher", "student")
        if "confusion" in run.evaluation.get(who, {})
    ]
    if not matrices:
        return None
    import numpy as np

    names = run.label_names
    fig, axes = _figure(5 * len(matrices), 4.2, ncols=len(matrices))
    for axis, (who, matrix) in zip(axes, matrices, strict=True):
        values = np.asarray(matrix["matrix"], dtype=float)
        totals = values.sum(axis=1, keepdims=True)
        shares = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                axis.text(
                    j,
                    i,
                    f"{int(values[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if shares[i, j] > 0.6 else "black",
                )
        ticks = range(len(names))
        axis.set_xticks(list(ticks), names, rotation=45 if len(names) > 3 else 0, fontsize=8)
        axis.set_yticks(list(ticks), names, fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("gold")
        metrics = run.evaluation.get(who, {})
        axis.set_title(
            f"{who}: accuracy {metrics.get('accuracy', math.nan):.3f}, "
            f"macro-F1 {metrics.get('macro_f1', math.nan):.3f}",
            fontsize=10,
        )
    return _save(fig, path)


def plot_label_distribution(run: RunData, path: Path) -> Path | None:
    labels = run.labels
    if labels is None or "pseudo_label" not in labels:
        return None
    import numpy as np

    names = run.label_names or sorted(labels["pseudo_label"].astype(str).unique())
    counts = labels["pseudo_label"].astype(str).value_counts()
    pseudo = [int(counts.get(name, 0)) for name in names]
    fig, (axis,) = _figure(max(5.0, 1.1 * len(names) + 2), 3.6)
    x = np.arange(len(names))
    has_gold = "gold_label" in labels and labels["gold_label"].notna().any()
    width = 0.4 if has_gold else 0.6
    axis.bar(x - (width / 2 if has_gold else 0), pseudo, width, color=_TEACHER_COLOR, label="teacher pseudo-labels")
    if has_gold:
        gold_counts = labels["gold_label"].dropna().astype(str).value_counts()
        axis.bar(
            x + width / 2,
            [int(gold_counts.get(n, 0)) for n in names],
            width,
            color="#999999",
            label="hidden gold labels",
        )
    axis.set_xticks(x, names, rotation=45 if len(names) > 3 else 0, fontsize=8)
    axis.set_ylabel("pool rows")
    axis.set_title(f"label distribution of the pool ({len(labels)} labeled rows)", fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return _save(fig, path)


#: (file name, title, caption, plot function) in page order.
PLOTS = (
    (
        "training.png",
        "Loss and gold-set macro-F1",
        "Left: the weighted loss on the selected samples per step. Right: the student's macro-F1 on the gold set "
        "during training and at the end, against the teacher's.",
        plot_training,
    ),
    (
        "compute.png",
        "Compute spent",
        "Left: cumulative FLOPs by kind — candidate scoring in inference mode (2·N per token) and training "
        "forward+backward (6·N per token), N the student's non-embedding parameters. Right: the training loop's "
        "wall time split into scoring, training (forward, backward, optimizer step) and selection.",
        plot_compute,
    ),
    (
        "thresholds.png",
        "Adaptive thresholds per class",
        "The teacher-confidence threshold τT[k] and the student-uncertainty threshold τS[k] of each class over the "
        "training steps (EMA of the global batch statistics, normalised by the strongest class).",
        plot_thresholds,
    ),
    (
        "selection.png",
        "Selected fraction and data usage",
        "Share of each step's batch that passed both thresholds, and the cumulative data usage: pool rows selected at "
        "least once, and selected sample-steps over all sample-steps.",
        plot_selection,
    ),
    (
        "confidence.png",
        "Teacher confidence",
        "The teacher's confidence in its pseudo-label over the labeled pool: rows the student trained on vs rows it "
        "never selected, and (where the pool's hidden gold labels exist) rows the teacher got right vs wrong.",
        plot_confidence,
    ),
    (
        "confusion.png",
        "Confusion matrices on the gold set",
        "Rows are gold labels, columns predictions; cells count rows, shading is the share of the gold row.",
        plot_confusion,
    ),
    (
        "labels.png",
        "Pseudo-label distribution",
        "How the teacher labeled the pool (and the hidden gold distribution when the pool had one).",
        plot_label_distribution,
    ),
)
