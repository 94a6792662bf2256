"""Student-guided labeling rounds: the plan, the choice of rows, and the rounds' records.

With ``labeling.budget`` < 1 (or ``labeling.rounds`` > 1) the teacher labels part of the pool, in
rounds: round 0 a seeded random slice, every later round the rows the current student is most
uncertain about. The rounds run in :mod:`llkd_ray.pipeline.rounds_loop`; this module is the pure
part (no Ray, no torch), so the pipeline's summary and the report read the records without them.

Decided here:

- **The pool** is the corpus's usable rows (the reader's verdict, ``data.limit`` applied). The
  labeling budget is ``floor(budget x pool rows)`` rows, split into ``rounds`` slices as evenly as
  possible (the first slices one row larger); fewer budget rows than rounds is a config error.
- **Round 0** is a uniform draw of its size with ``training.seed``, over the ids sorted first, so
  the draw does not depend on the order Ray Data reads the pool in.
- **Later rounds** (``labeling.choose: entropy``, the default; the other rules and a typical round 0
  are :mod:`llkd_ray.pipeline.choice`'s, on this chooser) take the unlabeled rows whose prediction
  by the current student has the highest normalised entropy (``u_i`` of the selection rule,
  :func:`llkd_ray.train.selection.normalized_entropy`), **with a quota per predicted class**: each
  class the student predicts gets an equal share of the slice; a class with fewer rows than its
  share leaves the rest to the others (water-filling); what is left once less than one row per
  class remains goes to the most uncertain rows overall.
  Why: uncertainty alone takes its slice from the boundary the student is worst at, and a class the
  student rarely predicts would get no new labels, which is how a small class starves. Ties go to
  the smaller id, so a rerun chooses the same rows.
- **Training continues** from the previous round's student (its saved weights; the optimizer, the
  schedule and the selection thresholds start afresh, as in any ``llkd train``), on every row
  labeled so far. The training budget is split evenly across rounds: ``training.max_steps / R``
  steps a round; ``training.epochs`` and ``training.budget`` (passes over the labeled pool) are
  scaled by ``budget rows / (R x rows labeled so far)``, so each round spends about ``1/R`` of what
  one run on the final labeled set would (rows stand in for tokens).
- **Exactly once.** A round's slice is written before the teacher sees it; a rerun reuses it
  instead of scoring again, and the labeling stage skips the rows it committed already.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llkd_ray.artifacts import RunLayout, read_json
from llkd_ray.compute import format_flops
from llkd_ray.config import TrainingConfig
from llkd_ray.errors import ConfigError

#: What each round's record counts, by the stages of ``llkd_ray.compute.COMPUTE_STAGES``.
ROUND_FLOPS = ("teacher_labeling", "student_scoring", "student_training")


# --------------------------------------------------------------------------- the plan


def slice_sizes(pool_rows: int, budget: float, rounds: int) -> list[int]:
    """Rows the teacher labels in each round: ``floor(budget x pool_rows)`` split as evenly as possible."""
    total = min(pool_rows, int(budget * pool_rows + 1e-9))
    if total < rounds:
        raise ConfigError(
            f"labeling.budget {budget} of a pool of {pool_rows} rows is {total} row(s), fewer than "
            f"labeling.rounds ({rounds}): raise labeling.budget or lower labeling.rounds"
        )
    return [total // rounds + (1 if k < total % rounds else 0) for k in range(rounds)]


def round_training(training: TrainingConfig, index: int, sizes: Sequence[int]) -> dict[str, Any]:
    """The ``training`` settings of round ``index``: its share of the run's training budget."""
    rounds, budget_rows = len(sizes), sum(sizes)
    if training.max_steps is not None:
        share = training.max_steps // rounds + (1 if index < training.max_steps % rounds else 0)
        return {"max_steps": max(1, share)}
    scale = budget_rows / (rounds * sum(sizes[: index + 1]))
    if training.budget is not None:
        return {"budget": training.budget * scale}
    return {"epochs": training.epochs * scale}


# --------------------------------------------------------------------------- the choice of rows


def random_slice(ids: Collection[str], size: int, seed: int) -> list[str]:
    """Round 0: ``size`` ids drawn uniformly with ``seed`` (independent of the ids' order)."""
    ordered = sorted(ids)
    picked = np.random.default_rng(seed).choice(len(ordered), size=min(size, len(ordered)), replace=False)
    return [ordered[i] for i in sorted(picked)]


def class_quotas(available: Sequence[int], size: int) -> list[int]:
    """Rows per class: equal shares of ``size``, a class's unused share water-filled to the others;
    never more than a class has. Fewer rows left than open classes stay unassigned (the caller
    gives them to the most uncertain rows)."""
    taken = [0] * len(available)
    left = min(size, sum(available))
    while left:
        open_classes = [c for c, n in enumerate(available) if taken[c] < n]
        share = left // len(open_classes)
        if share == 0:
            return taken  # fewer rows left than classes: choose_slice gives them by uncertainty
        for c in open_classes:
            step = min(share, available[c] - taken[c])
            taken[c] += step
            left -= step
    return taken


def drawn_rows(size: int, explore: float) -> int:
    """Rows of a later slice of ``size`` drawn at random with ``labeling.explore`` (the rest by uncertainty)."""
    return round(explore * size)


def choose_slice(
    ids: Sequence[str],
    uncertainty: Sequence[float],
    predicted: Sequence[int],
    size: int,
    num_classes: int,
    labeled: Collection[str] = (),
    explore: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """The next round's slice: the most uncertain unlabeled rows, within per-class quotas.

    ``uncertainty`` is each row's normalised entropy under the current student, ``predicted`` its
    predicted class; rows in ``labeled`` are never chosen. With ``explore`` > 0, :func:`drawn_rows`
    of them are a uniform draw (with ``seed``) from the unlabeled ones instead. Returns
    the ids, the uncertainty-chosen ones most uncertain first, then the drawn ones.
    """
    labeled = set(labeled)
    if explore > 0:
        drawn = random_slice([i for i in ids if i not in labeled], drawn_rows(size, explore), seed)
        rest = choose_slice(ids, uncertainty, predicted, size - len(drawn), num_classes, labeled | set(drawn))
        return rest + drawn
    order = sorted(
        (i for i in range(len(ids)) if ids[i] not in labeled), key=lambda i: (-float(uncertainty[i]), ids[i])
    )
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i in order:
        by_class[int(predicted[i])].append(i)
    quotas = class_quotas([len(rows) for rows in by_class], size)
    chosen = [i for c, rows in enumerate(by_class) for i in rows[: quotas[c]]]
    if len(chosen) < min(size, len(order)):
        taken = set(chosen)
        chosen += [i for i in order if i not in taken][: min(size, len(order)) - len(chosen)]
    return [ids[i] for i in sorted(chosen, key=lambda i: (-float(uncertainty[i]), ids[i]))]


# --------------------------------------------------------------------------- the records


def read_rounds(layout: RunLayout) -> dict[str, Any] | None:
    """``rounds.json`` with each round's record; the last round's training (the train stage's, in
    ``RUN/train``) read from its summary. None for a run without rounds."""
    document = read_json(layout.rounds_json)
    if not isinstance(document, dict):
        return None
    records = document.get("rounds") or []
    if records and records[-1].get("training") is None:
        records[-1]["training"] = training_record(read_json(layout.training_summary), layout.train)
    for record in records:
        record["flops"] = round_flops(record)
    return document


def training_record(summary: dict[str, Any] | None, directory: Path) -> dict[str, Any] | None:
    """What a round's record keeps of its training: steps, budget and its FLOPs by kind."""
    if not summary:
        return None
    compute = summary.get("compute") or {}
    return {
        "dir": str(directory),
        "steps": summary.get("steps"),
        "budget": summary.get("budget"),
        "student_parameters": compute.get("parameters"),
        "scoring_flops": compute.get("scoring_flops"),
        "training_flops": compute.get("training_flops"),
    }


def round_flops(record: dict[str, Any]) -> dict[str, float | None]:
    """A round's FLOPs by stage: the teacher on its slice, the student scoring (the pool pass that
    chose the slice, plus its training's candidate scoring), the student training."""
    teacher = (record.get("teacher") or {}).get("flops")
    pool = (record.get("scoring") or {}).get("flops", 0.0)
    training = record.get("training") or {}
    scoring = training.get("scoring_flops")
    return {
        "teacher_labeling": teacher,
        "student_scoring": None if scoring is None or pool is None else float(pool + scoring),
        "student_training": training.get("training_flops"),
    }


def with_earlier_rounds(layout: RunLayout, summary: dict[str, Any]) -> dict[str, Any]:
    """The final training summary with the student FLOPs it does not hold added: the trainings of
    the rounds before the last and every pool scoring pass (what the run's compute by stage counts)."""
    document = read_json(layout.rounds_json)
    compute = summary.get("compute")
    if not isinstance(document, dict) or not isinstance(compute, dict):
        return summary
    records = document.get("rounds") or []
    earlier = [r.get("training") or {} for r in records[:-1]]
    pool = sum(float((r.get("scoring") or {}).get("flops") or 0.0) for r in records)
    added = {
        "scoring_flops": pool + sum(float(t.get("scoring_flops") or 0.0) for t in earlier),
        "training_flops": sum(float(t.get("training_flops") or 0.0) for t in earlier),
    }
    totals = {key: float(compute.get(key) or 0.0) + value for key, value in added.items()}
    return {**summary, "compute": {**compute, **totals}}


def rounds_rows(document: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """One row per round for the summary and the report: round, how chosen, rows, labeled so far,
    FLOPs by stage (``n/a`` where not recorded), and the teacher-confidence head's accuracy."""
    rows = []
    for record in (document or {}).get("rounds") or []:
        flops = record.get("flops") or round_flops(record)
        rows.append(
            (
                str(record["round"]),
                str(record.get("kind", "?")),
                f"{record.get('size', 0):,}",
                f"{record.get('labeled_rows', 0):,}",
                *(format_flops(flops[k]) if isinstance(flops.get(k), int | float) else "n/a" for k in ROUND_FLOPS),
                head_accuracy(record),
            )
        )
    return rows


def head_accuracy(record: dict[str, Any]) -> str:
    """The teacher-confidence head's held-out accuracy in a round (a rule of
    ``HEAD_RULES``), against the share of labeled rows that clear the teacher's bar (what always
    guessing the majority scores)."""
    head = (record.get("scoring") or {}).get("head") or {}
    if head.get("held_out_accuracy") is None:
        return "–"
    return f"{head['held_out_accuracy']:.2f} of {head['held_out_rows']} ({100 * head['clears']:.0f} % clear)"


ROUNDS_HEADER = (
    "round", "slice", "rows", "labeled so far", "teacher", "student scoring", "student training",
    "teacher head, held out",
)  # fmt: skip


def rounds_lines(document: dict[str, Any] | None) -> list[str]:
    """The run summary's rounds table (empty for a run without rounds)."""
    if not document:
        return []
    lines = [
        f"Labeling rounds: {document.get('budget_rows', 0):,} of {document.get('pool_rows', 0):,} pool rows "
        f"(budget {document.get('budget')}) in {document.get('rounds_planned')} round(s); FLOPs per round:"
    ]
    table = [ROUNDS_HEADER, *rounds_rows(document)]
    widths = [max(len(row[i]) for row in table) for i in range(len(ROUNDS_HEADER))]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    return lines
