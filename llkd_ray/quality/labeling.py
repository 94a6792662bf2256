"""The quality benchmark's labeling axis: how much of the pool must the teacher label?

``--labeling-budgets 0.1,0.2,0.3,0.5`` adds, for each fraction B of the pool, two runs per seed at
the student compute of the fully labeled strategies (``--budget`` passes of ``all`` over the whole
pool): **a random subset** of B labeled by the teacher, then the strategy (``labeling.rounds: 1``),
and **student-guided rounds** to the same B (``labeling.rounds: R``, :mod:`llkd_ray.pipeline.rounds`). Both
are ``llkd run``'s own label and train stages (:func:`~llkd_ray.pipeline.rounds_loop.label_rounds`, then the
last round's training), in the run's directory, so a killed benchmark resumes them. Decided here:

- **Equal student compute, scoring counted**: the rounds' pool scoring comes out of the training
  budget (:func:`~llkd_ray.quality.settings.labeling_training_budget`).
- **One compute axis**: FLOPs in passes of ``all`` over the *whole* pool (6·N x its student tokens),
  so a labeling run's compute and curve read like the fully labeled runs'. Only the last round
  evaluates on the gold set; its points are placed at the compute spent by then, earlier rounds
  and scoring passes included.
- **The answer**: per B, the mean final macro-F1 of each arm; the smallest B whose mean reaches
  ``all``'s best with the whole pool labeled (the mean over ``all``'s seeds of their best point,
  the main table's target). With ``--count-teacher`` the table also totals student and teacher FLOPs.
- **Where the choice of rows goes**: per arm, the teacher's mean confidence (and, where the pool has
  gold labels, its accuracy) on the rows it labeled — the random ones and the student-chosen ones
  apart — and the share of labeled rows the strategy trained on (:func:`slice_quality`): the rounds
  pay the teacher for the rows the student is unsure of, and LLKD's teacher gate may discard them.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llkd_ray.artifacts import RunLayout, read_json, write_text
from llkd_ray.compute import COMPUTE_SECONDS, all_pass_flops, format_flops
from llkd_ray.config import PipelineConfig
from llkd_ray.quality.summary import all_best_f1, mean_std
from llkd_ray.tracking import TrackingRun

KEY_FILE = "run-key.txt"


def full_pool_tokens(config: PipelineConfig, labels: Path) -> int:
    """The whole pool's student tokens (truncated at ``student.max_length``): the compute unit's size."""
    from transformers import AutoTokenizer

    from llkd_ray.student.model import resolve_model_path
    from llkd_ray.train.data import estimate_pool_tokens, validate_labels_dir

    pool = validate_labels_dir(labels, config.task.label_names)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.student.model))
    return estimate_pool_tokens(pool, tokenizer, config.student.max_length)


def claim_run_dir(run_dir: Path, key: str) -> None:
    """A labeling run resumes what its directory holds (its rounds, its labels): one left by a run
    of another key (other settings) is cleared first, so nothing of it is reused."""
    marker = run_dir / KEY_FILE
    if run_dir.exists() and (not marker.is_file() or marker.read_text() != key):
        shutil.rmtree(run_dir)
    write_text(marker, key)


def train_labeling_run(
    config: PipelineConfig, run_dir: Path, tracking: TrackingRun | None, log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Label in rounds and train the last round on the gold-evaluated curve; the final training's
    summary, the same with the earlier rounds' FLOPs added, and ``rounds.json``."""
    from llkd_ray.pipeline.rounds import with_earlier_rounds
    from llkd_ray.pipeline.rounds_loop import final_round_config, label_rounds
    from llkd_ray.train.launch import train_student

    layout = RunLayout(run_dir)
    document = label_rounds(config, layout, log)
    summary = read_json(layout.training_summary)  # written last: a finished last round is not redone
    if not summary or not (layout.student / "config.json").is_file():
        summary = train_student(
            final_round_config(config, layout), labels=layout.labels, output=layout.train,
            eval_data=config.data.gold, tracking=tracking, track_student=False,
        )  # fmt: skip
    return summary, with_earlier_rounds(layout, summary), document


def labeling_record(
    run: dict[str, Any], final_compute: dict[str, Any], total: dict[str, Any], document: dict[str, Any], tokens: int
) -> dict[str, Any]:
    """A labeling run's ``results.json`` line: compute and curve on the whole pool's axis, and what
    was labeled. ``final_compute`` is the last round's training alone, ``total`` every round's."""
    parameters = int(total["compute"]["parameters"])
    unit = all_pass_flops(parameters, tokens)
    earlier = sum(
        float(total["compute"].get(k) or 0.0) - float(final_compute.get(k) or 0.0)
        for k in ("scoring_flops", "training_flops")
    )
    flops = float(final_compute["flops"]) + earlier
    scoring = float(total["compute"].get("scoring_flops") or 0.0)
    rounds = document.get("rounds") or []
    teacher = [(r.get("teacher") or {}).get("flops") for r in rounds]
    # Seconds are not summed over the rounds yet: a labeling run keeps FLOPs only, not seconds that
    # would count its last training alone.
    curve = [
        {k: v for k, v in point.items() if k not in COMPUTE_SECONDS}
        | {"flops": float(point["flops"]) + earlier, "all_passes": (float(point["flops"]) + earlier) / unit}
        for point in run["curve"]
    ]
    stop = run.get("stop")
    if stop and stop.get("all_passes") is not None and final_compute.get("all_passes"):
        final_unit = float(final_compute["flops"]) / float(final_compute["all_passes"])  # a pass of the labeled rows
        stop = stop | {"all_passes": (earlier + float(stop["all_passes"]) * final_unit) / unit}
    return run | {
        "curve": curve,
        "stop": stop,
        "compute": flops / unit,
        "flops": flops,
        "scoring_share": scoring / flops if flops else None,
        "compute_s": None,
        "seconds_per_pflop": None,
        "labeling": {
            "fraction": document["budget"],
            "rounds": document["rounds_planned"],
            "pool_rows": document["pool_rows"],
            "labeled_rows": sum(r.get("size", 0) for r in rounds),
            "teacher_flops": sum(teacher) if teacher and None not in teacher else None,
            "pool_scoring_flops": sum(float((r.get("scoring") or {}).get("flops") or 0.0) for r in rounds),
            "sizes": document["sizes"],
            "kinds": [r.get("kind") for r in rounds],
            **{key: document[key] for key in ("choose", "first", "clip") if key in document},
        },
    }


def slice_quality(run_dir: Path) -> list[dict[str, Any]]:
    """Per round of a labeling run, the teacher on the rows labeled: a ``random`` part (a random round
    0; the explored share of a later slice, drawn last) and the part the rule chose (``uncertainty``,
    whatever the rule; ``typical`` for a typical round 0), each with its rows, the teacher's mean
    confidence, the share of rows that clear its bar (:func:`~llkd_ray.pipeline.scoring.teacher_clears`
    over every labeled row of the run), where the pool has gold labels the share it labeled right,
    and where the teacher-confidence head chose (the head rules, ``HEAD_RULES``) its mean prediction."""
    import pandas as pd
    import pyarrow.parquet as pq

    from llkd_ray.artifacts import read_label_table
    from llkd_ray.pipeline.rounds_loop import SLICE
    from llkd_ray.pipeline.scoring import teacher_clears

    layout = RunLayout(run_dir)
    document = read_json(layout.rounds_json) or {}
    if not document.get("rounds") or not layout.labels.is_dir():
        return []  # nothing to read (a run reused from another directory)
    labels = read_label_table(layout.labels).to_pandas().set_index("id")
    gold = "gold_label" in labels.columns and labels["gold_label"].notna().any()
    classes, _ = pd.factorize(labels["pseudo_label"])
    labels["clears"] = teacher_clears(labels["confidence"].to_numpy(), classes, max(2, int(classes.max()) + 1))
    parts = []
    for record in document.get("rounds") or []:
        table = pq.read_table(layout.round_dir(record["round"]) / SLICE).to_pandas()
        table = table[table["id"].isin(labels.index)]
        ids = table["id"].tolist()
        drawn = min(len(ids), record.get("drawn", len(ids) if record["round"] == 0 else 0))
        chose = "typical" if record.get("kind") == "typical" else "uncertainty"
        for part, chosen in ((chose, ids[: len(ids) - drawn]), ("random", ids[len(ids) - drawn :])):
            if chosen:
                rows = labels.loc[chosen]
                accuracy = float((rows["pseudo_label"] == rows["gold_label"]).mean()) if gold else None
                sure = table.set_index("id").loc[chosen].get("teacher_sure")
                predicted = None if sure is None or sure.isna().all() else float(sure.mean())
                parts.append({"round": record["round"], "part": part, "rows": len(chosen),
                              "confidence": float(rows["confidence"].mean()), "accuracy": accuracy,
                              "clears": float(rows["clears"].mean()), "predicted": predicted})  # fmt: skip
    return parts


def teacher_on_rows(runs: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Over the runs' :func:`slice_quality` parts: per part (random, uncertainty, typical), the rows a
    run (mean over the runs) and the row-weighted means of the teacher's confidence, its accuracy,
    the share clearing its bar and the head's prediction (None where no part recorded it)."""
    out: dict[str, dict[str, Any]] = {}
    for part in ("random", "uncertainty", "typical"):
        mine = [p for parts in runs for p in parts if p["part"] == part]
        rows = sum(p["rows"] for p in mine)
        if not rows:
            continue
        out[part] = {"rows": round(rows / len(runs))}
        for key in ("confidence", "accuracy", "clears", "predicted"):
            known = [p for p in mine if p.get(key) is not None]
            weight = sum(p["rows"] for p in known)
            out[part][key] = sum(p[key] * p["rows"] for p in known) / weight if weight else None
    return out


# --------------------------------------------------------------------------- the summary and the table


def labeling_summary(runs: list[dict[str, Any]], teacher: dict[str, Any]) -> dict[str, Any] | None:
    """Per fraction and arm: mean ± std of the final macro-F1, student compute and teacher FLOPs;
    the target (``all``'s best, whole pool labeled) and the smallest fraction reaching it per arm."""
    labeled = [run for run in runs if run.get("labeling")]
    if not labeled:
        return None
    target = all_best_f1(runs)
    rows: dict[str, dict[str, Any]] = {}
    arms = ["random"]
    for run in labeled:
        info = run["labeling"]
        arm = arm_of(info)
        arms += [arm] if arm not in arms else []
        entry = rows.setdefault(f"{info['fraction']:g}", {"fraction": info["fraction"], "pool_rows": info["pool_rows"]})
        entry["labeled_rows"] = info["labeled_rows"]
        cell = entry.setdefault(arm, {"runs": []})
        cell["runs"].append(run)
        cell["rounds"] = info["rounds"]
    for entry in rows.values():
        for arm in arms:
            cell = entry.get(arm)
            if not cell:
                continue
            mine = cell.pop("runs")
            cell["seeds"] = len(mine)
            cell["macro_f1"] = mean_std([r["macro_f1"] for r in mine])
            cell["compute"] = mean_std([r["compute"] for r in mine])
            teacher_flops = [r["labeling"]["teacher_flops"] for r in mine if r["labeling"]["teacher_flops"] is not None]
            cell["teacher_flops"] = statistics.fmean(teacher_flops) if teacher_flops else None
            cell["student_flops"] = statistics.fmean(r["flops"] for r in mine)
            cell["reaches_target"] = None if target is None else cell["macro_f1"][0] >= target - 1e-12
            cell["trained_share"] = mean_std([r["data_usage"] for r in mine if r.get("data_usage") is not None])
            cell["teacher_on_rows"] = teacher_on_rows([r["labeling"].get("slices") or [] for r in mine])
    ordered = dict(sorted(rows.items(), key=lambda item: item[1]["fraction"]))
    smallest = {
        arm: next((e["fraction"] for e in ordered.values() if (e.get(arm) or {}).get("reaches_target")), None)
        for arm in dict.fromkeys(["random", "rounds", *arms])
    }
    everything = [run for run in runs if run["strategy"] == "all" and run.get("flops")]
    return {
        "target_all_best": target,
        "arms": [arm for arm in arms if arm != "random"],
        "fractions": ordered,
        "smallest_fraction_reaching_target": smallest,
        "whole_pool": {
            "teacher_flops": teacher.get("pool_flops"),
            "student_flops": statistics.fmean(r["flops"] for r in everything),
            "pool_rows": teacher.get("pool_labelled"),
        }
        if everything
        else None,
    }


def arm_of(info: dict[str, Any]) -> str:
    """A labeling run's arm in the tables: ``random`` (one round), ``rounds`` (the default rules), or
    ``rounds: RULES`` for the rules that differ (``labeling.choose``, a typical first slice, a clip)."""
    if info["rounds"] == 1:
        return "random"
    rules = [
        *([info["choose"]] if info.get("choose", "entropy") != "entropy" else []),
        *(["typical first"] if info.get("first") == "typical" else []),
        *([f"clip {100 * info['clip']:g} %"] if info.get("clip") else []),
    ]
    return "rounds: " + ", ".join(rules) if rules else "rounds"


def _rule(arm: str) -> str:
    """An arm's rules as the tables' first column adds them (nothing for the default rules)."""
    return "" if arm == "rounds" else ", " + arm.removeprefix("rounds: ")


def _f1(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("macro_f1") is None:
        return "–"
    mean, std = cell["macro_f1"]
    text = f"{mean:.3f} ± {std:.3f}"
    return f"**{text}**" if cell.get("reaches_target") else text


def _flops(value: float | None) -> str:
    return "–" if value is None else format_flops(value)


def labeling_lines(results: dict[str, Any]) -> list[str]:
    """``results.md``'s labeling section (empty without the axis)."""
    axis = results.get("labeling")
    if not axis:
        return []
    settings = results["settings"]
    count_teacher = bool(settings.get("count_teacher"))
    rounds = settings.get("labeling_rounds", "R")
    explore = settings.get("labeling_explore") or 0.0
    strategy = settings.get("labeling_strategy", "llkd")
    target = axis.get("target_all_best")
    explored = f" ({100 * explore:g} % of each later slice random)" if explore else ""
    header = (
        f"| labeled by the teacher | random subset, then {strategy}: macro-F1 | {rounds} student-guided rounds"
        f"{explored}: macro-F1 | rounds − random | student compute, random / rounds (passes of `all`) | seeds "
        "| teacher FLOPs"
    )
    lines = [
        "## Labeling axis: how much of the pool must the teacher label?",
        "",
        "Every run at the same student compute as the fully labeled strategies (the rounds' scoring of the "
        "unlabeled pool included); macro-F1 at the end of the budget, mean ± std over seeds; **bold**: "
        f"reaches `all`'s best with the whole pool labeled ({'–' if target is None else f'{target:.3f}'}).",
        "",
        header + (" | total FLOPs, teacher counted |" if count_teacher else " |"),
        "|---|" + "---:|" * (7 if count_teacher else 6),
    ]
    for entry in axis["fractions"].values():
        random_cell = entry.get("random")
        for arm in _arms_at(axis, entry):
            rounds_cell = entry.get(arm) if arm else None
            delta = (
                f"{rounds_cell['macro_f1'][0] - random_cell['macro_f1'][0]:+.3f}"
                if random_cell and rounds_cell
                else "–"
            )
            compute = " / ".join("–" if not c else f"{c['compute'][0]:.2f}" for c in (random_cell, rounds_cell))
            teacher_flops = next((c["teacher_flops"] for c in (random_cell, rounds_cell) if c), None)
            cells = [
                f"{100 * entry['fraction']:g} % ({entry['labeled_rows']:,} rows){_rule(arm) if arm else ''}",
                _f1(random_cell),
                _f1(rounds_cell),
                delta,
                compute,
                " / ".join("–" if not c else str(c["seeds"]) for c in (random_cell, rounds_cell)),
                _flops(teacher_flops),
            ]
            if count_teacher:
                totals = [c["student_flops"] + (c["teacher_flops"] or 0.0) for c in (random_cell, rounds_cell) if c]
                cells.append(" / ".join(format_flops(t) for t in totals))
            lines.append("| " + " | ".join(cells) + " |")
    whole = axis.get("whole_pool")
    if whole:
        cells = [
            f"100 % ({whole['pool_rows'] or 0:,} rows)", "see the main table", "–", "–", "1.00 (`all`)", "–",
            _flops(whole["teacher_flops"]),
        ]  # fmt: skip
        if count_teacher:
            total = (whole["student_flops"] or 0.0) + (whole["teacher_flops"] or 0.0)
            cells.append(format_flops(total) + " (`all`)")
        lines.append("| " + " | ".join(cells) + " |")
    smallest = axis["smallest_fraction_reaching_target"]
    said = {arm: "not within the fractions measured" if f is None else f"{100 * f:g} %" for arm, f in smallest.items()}
    lines += [
        "",
        f"Smallest fraction labeled whose mean macro-F1 reaches `all`'s best: random subset {said['random']}, "
        f"student-guided rounds {said['rounds']}"
        + "".join(f", {arm} {said[arm]}" for arm in axis.get("arms", []) if arm != "rounds")
        + "."
        + ("" if target is not None else " (`all` was not run: no target.)"),
        "",
        *_rows_lines(axis),
    ]
    return lines


def _arms_at(axis: dict[str, Any], entry: dict[str, Any]) -> list[str | None]:
    """The rounds arms measured at a fraction, in the summary's order; ``[None]`` when there are none."""
    arms = [arm for arm in axis.get("arms", ["rounds"]) if entry.get(arm)]
    return arms or [None]


def _rows_lines(axis: dict[str, Any]) -> list[str]:
    """Where the labels go: the teacher on the rows each arm had labeled, the head's prediction against
    the share that cleared the teacher's bar, and the share trained on."""
    lines = [
        "Where the labels go: the teacher's mean confidence / accuracy (against the pool's gold labels) on the rows "
        "each arm had labeled — drawn at random (or typical, for a typical first slice), or chosen by the student's "
        "rule — the teacher-confidence head's mean prediction / the share of the chosen rows (and of the later "
        "rounds' random rows) that cleared the teacher's bar (the head rules), and the share of the labeled "
        "rows the strategy trained on at least once.",
        "",
        "| labeled | random subset: teacher on its rows | rows trained | rounds: teacher on the random rows | "
        "teacher on the student-chosen rows | head: predicted / cleared the bar | rows trained |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in axis["fractions"].values():
        random_cell = entry.get("random") or {}
        for arm in _arms_at(axis, entry):
            rounds_cell = (entry.get(arm) if arm else None) or {}
            drawn = [_teacher(rounds_cell, "random"), "typical: " + _teacher(rounds_cell, "typical")]
            first = "; ".join(cell for cell in drawn if not cell.endswith("–")) or "–"
            cells = [
                f"{100 * entry['fraction']:g} %{_rule(arm) if arm else ''}",
                _teacher(random_cell, "random"),
                _share(random_cell),
                first,
                _teacher(rounds_cell, "uncertainty"),
                _head(rounds_cell),
                _share(rounds_cell),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _teacher(cell: dict[str, Any], part: str) -> str:
    on = (cell.get("teacher_on_rows") or {}).get(part)
    if not on:
        return "–"
    accuracy = "–" if on["accuracy"] is None else f"{on['accuracy']:.2f}"
    return f"{on['confidence']:.2f} / {accuracy} ({on['rows']:,} rows)"


def _head(cell: dict[str, Any]) -> str:
    """The head's mean prediction / the share that cleared the bar, on the chosen rows (and on the
    explored random rows of the same rounds, which the head scored too)."""
    parts = cell.get("teacher_on_rows") or {}
    said = [
        f"{prefix}{on['predicted']:.2f} / {on['clears']:.2f}"
        for prefix, on in (("", parts.get("uncertainty") or {}), ("random: ", parts.get("random") or {}))
        if on.get("predicted") is not None and on.get("clears") is not None
    ]
    return "; ".join(said) or "–"


def _share(cell: dict[str, Any]) -> str:
    share = cell.get("trained_share")
    return "–" if not share else f"{100 * share[0]:.0f} %"


def teacher_pool_flops(labels: Path) -> float | None:
    """The teacher's FLOPs on the whole pool, from its labels' manifest."""
    from llkd_ray.artifacts import MANIFEST

    manifest = read_json(labels / MANIFEST) or {}
    return (manifest.get("teacher_compute") or {}).get("flops")
