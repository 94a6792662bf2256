"""The report's page: :func:`build_report` writes ``RUN/report/index.html`` with the plots and the numbers.

Static HTML with no scripts and no external resources: the summary tables (gold set, training,
compute by stage, stages) and one figure per plot of :data:`llkd_ray.report.plots.PLOTS` that had its data.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llkd_ray.artifacts import STAGES, RunLayout, percent, write_text
from llkd_ray.compute import compute_by_stage, compute_rows
from llkd_ray.pipeline.rounds import ROUNDS_HEADER, read_rounds, rounds_rows
from llkd_ray.report.plots import PLOTS
from llkd_ray.report.run_data import RunData, load_run


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
    parts.append(_compute_html(run))
    parts.append(_rounds_html(run.root))
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


def _compute_html(run: RunData) -> str:
    """FLOPs by stage with shares: ``eval.json``'s, else worked out from the label manifest and the
    training summary; a stage not counted (an older run) shows ``not recorded``."""
    compute = run.evaluation.get("compute") or compute_by_stage(run.label_manifest, run.summary)
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(flops)}</td><td>{html.escape(share)}</td></tr>"
        for name, flops, share in compute_rows(compute)
    )
    return (
        '<h2>Compute by stage</h2><p class="muted">2·N FLOPs per token of a forward, 6·N of a '
        "forward+backward; N: non-embedding parameters (teacher or student)</p>"
        f"<table><tr><th>stage</th><th>FLOPs</th><th>share</th></tr>{rows}</table>"
    )


def _rounds_html(root: Path) -> str:
    """Student-guided labeling rounds (``labeling``): each round's slice, its size and FLOPs by stage."""
    document = read_rounds(RunLayout(root))
    if not document:
        return ""
    header = "".join(f"<th>{html.escape(name)}</th>" for name in ROUNDS_HEADER)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rounds_rows(document)
    )
    return (
        f"<h2>Labeling rounds</h2><p>the teacher labeled {document.get('budget_rows', 0):,} of "
        f"{document.get('pool_rows', 0):,} pool rows (labeling.budget {_fmt(document.get('budget'), 2)}); "
        "each round's slice ids are in <code>rounds/round-K/slice.parquet</code></p>"
        f"<table><tr>{header}</tr>{rows}</table>"
    )


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
