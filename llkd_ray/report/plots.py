"""The run report: ``llkd report RUN`` writes ``RUN/report/index.html`` and its PNG plots.

It reads what the stages left in the run directory (the layout of :class:`llkd_ray.artifacts.RunLayout`):

- ``train/metrics.jsonl`` — per-step loss, selected fraction, per-class teacher and student
  thresholds, cumulative data usage; gold-set evaluations during training;
- ``train/selected_ids.parquet`` — ids of the pool rows the student trained on at least once;
- ``labels/`` — the teacher's pseudo-labels and confidences (and hidden gold labels when the pool
  had them);
- ``eval.json`` — teacher and student metrics and confusion matrices on the gold set;
- ``_stages/*.json`` — wall time per stage.

Every plot is drawn only from data that is there; a missing input gives a note in the page, not
a failure. Plots use matplotlib's Agg backend (no display needed). The page is static HTML with
no scripts and no external resources.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llkd_ray.artifacts import STAGES, RunLayout, percent, read_json, read_jsonl, read_label_rows, write_text
from llkd_ray.errors import LlkdError

_TEACHER_COLOR = "#d95f02"
_STUDENT_COLOR = "#1b9e77"
_OTHER_COLOR = "#7570b3"


# --------------------------------------------------------------------------- reading a run


@dataclass
class RunData:
    root: Path
    steps: list[dict[str, Any]]
    gold_evals: list[dict[str, Any]]
    evaluation: dict[str, Any]
    summary: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    labels: Any  # pandas.DataFrame | None
    selected_ids: set[str] | None
    label_names: list[str]


def load_run(run_dir: str | Path) -> RunData:
    layout = RunLayout(Path(run_dir))
    if not layout.root.is_dir():
        raise LlkdError(f"run directory not found: {layout.root}")
    records = read_jsonl(layout.metrics)
    steps = _last_per_step(r for r in records if r.get("kind", "step") == "step")
    gold_evals = _last_per_step(r for r in records if r.get("kind") == "eval")
    evaluation = read_json(layout.eval_json) or {}
    summary = read_json(layout.training_summary) or {}
    stages = {p.stem: read_json(p) or {} for p in sorted(layout.stages.glob("*.json"))}
    labels = None
    if layout.labels.is_dir():
        try:
            labels = read_label_rows(layout.labels)
        except LlkdError:
            labels = None
    selected_ids = None
    if layout.selected_ids.is_file():
        import pyarrow.parquet as pq

        selected_ids = {str(v) for v in pq.read_table(layout.selected_ids, columns=["id"]).column("id").to_pylist()}
    names = evaluation.get("labels") or _label_names_from_config(layout.config) or []
    return RunData(layout.root, steps, gold_evals, evaluation, summary, stages, labels, selected_ids, names)


def _last_per_step(records) -> list[dict[str, Any]]:
    """One record per step, the latest: a training attempt restored from a checkpoint re-records
    the steps after it."""
    latest = {record.get("step"): record for record in records}
    return [latest[step] for step in sorted(latest, key=lambda step: (step is None, step or 0))]


def _label_names_from_config(path: Path) -> list[str] | None:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
        return [label["name"] for label in raw["task"]["labels"]]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


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


# --------------------------------------------------------------------------- the page


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def _summary_html(run: RunData) -> str:
    evaluation = run.evaluation
    parts = []
    if evaluation:
        rows = "".join(
            f"<tr><th>{who}</th><td>{_fmt(evaluation.get(who, {}).get('accuracy'))}</td>"
            f"<td>{_fmt(evaluation.get(who, {}).get('macro_f1'))}</td></tr>"
            for who in ("teacher", "student")
        )
        parts.append(
            f"<h2>Gold set</h2><p>{html.escape(str(evaluation.get('gold', '')))} "
            f"({_fmt(evaluation.get('gold_rows'))} rows)</p>"
            f"<table><tr><th></th><th>accuracy</th><th>macro-F1</th></tr>{rows}</table>"
        )
        per_class = _per_class_table(evaluation, run.label_names)
        if per_class:
            parts.append(per_class)
    usage = evaluation.get("data_usage") or run.summary.get("data_usage")
    facts = []
    if isinstance(usage, dict):
        facts.append(("pool rows selected at least once", percent(usage.get("pool_fraction"))))
        facts.append(("selected sample-steps / all", percent(usage.get("sample_step_fraction"))))
    elif isinstance(usage, int | float):
        facts.append(("data usage", percent(usage)))
    if run.labels is not None:
        facts.append(("labeled pool rows", str(len(run.labels))))
        if "confidence" in run.labels:
            facts.append(("mean teacher confidence", _fmt(float(run.labels["confidence"].mean()))))
        if "gold_label" in run.labels and run.labels["gold_label"].notna().any():
            known = run.labels["gold_label"].notna()
            agree = (run.labels["pseudo_label"].astype(str) == run.labels["gold_label"].astype(str))[known].mean()
            facts.append(("teacher accuracy on the pool (hidden labels)", _fmt(float(agree))))
    for key, title in (("strategy", "selection strategy"), ("steps", "training steps")):
        if key in run.summary:
            facts.append((title, _fmt(run.summary[key])))
    compute = run.summary.get("compute")
    if isinstance(compute, dict) and compute.get("flops"):
        facts.append(("compute spent (FLOPs)", f"{compute['flops']:.3g}"))
        if compute.get("all_passes") is not None:
            facts.append(("compute in passes of `all` over the pool", _fmt(compute["all_passes"], 2)))
        facts.append(("scoring share of compute", percent(compute["scoring_flops"] / compute["flops"])))
    if run.steps and "steps" not in run.summary:
        facts.append(("training steps", str(len(run.steps))))
    if facts:
        parts.append(
            "<h2>Training</h2><table>"
            + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in facts)
            + "</table>"
        )
    if run.stages:
        rows = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(marker.get('status', '?')))}</td>"
            f"<td>{_fmt(marker.get('wall_s'), 1)} s</td>"
            f"<td><code>{html.escape(str(marker.get('hash', '')))}</code></td></tr>"
            for name, marker in _ordered_stages(run.stages)
            if not (name == "report" and marker.get("status") == "running")  # this page, being written
        )
        parts.append(
            "<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>wall time</th>"
            f"<th>config hash</th></tr>{rows}</table>"
        )
    return "\n".join(parts)


def _ordered_stages(stages: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    order = {name: i for i, name in enumerate(STAGES)}
    return sorted(stages.items(), key=lambda item: order.get(item[0], len(order)))


def _per_class_table(evaluation: dict[str, Any], names: Sequence[str]) -> str:
    teacher = evaluation.get("teacher", {}).get("per_class")
    student = evaluation.get("student", {}).get("per_class")
    if not (isinstance(teacher, dict) and isinstance(student, dict)):
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{_fmt(_f1(teacher.get(name)))}</td>"
        f"<td>{_fmt(_f1(student.get(name)))}</td></tr>"
        for name in names
    )
    return f"<table><tr><th>F1 per class</th><th>teacher</th><th>student</th></tr>{rows}</table>"


def _f1(entry: Any) -> Any:
    return entry.get("f1") if isinstance(entry, dict) else entry


_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.15rem; margin-top: 1.8rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.6rem 1.5rem 0.6rem 0; display: inline-table; vertical-align: top; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.7rem; text-align: right; }
th { background: #f6f6f6; text-align: left; }
figure { margin: 1rem 0 2rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; max-width: 900px; }
.muted { color: #777; }
"""


def build_report(run_dir: str | Path) -> Path:
    """Render ``RUN/report/index.html`` and its PNGs from the run directory; return the page's path."""
    run = load_run(run_dir)
    out = run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    missing = []
    for filename, title, caption, plot in PLOTS:
        target = out / filename
        target.unlink(missing_ok=True)
        if plot(run, target) is None:
            missing.append(title)
            continue
        sections.append(
            f'<h2>{html.escape(title)}</h2><figure><img src="{filename}" alt="{html.escape(title)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if missing:
        sections.append(
            '<p class="muted">Not drawn (their inputs are not in this run yet): '
            + html.escape(", ".join(missing))
            + "</p>"
        )
    title = f"llkd run report — {run.root.resolve().name}"
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="muted">{html.escape(str(run.root.resolve()))}</p>'
        f"{_summary_html(run)}\n{''.join(sections)}</body></html>\n"
    )
    index = out / "index.html"
    write_text(index, page)
    return index
