"""The labeling rounds on Ray: label a slice, train, score the unlabeled pool, choose the next slice.

:func:`label_rounds` is ``llkd run``'s label stage when ``labeling`` is on (the plan and the choice
of rows are :mod:`llkd_ray.pipeline.rounds`). Each round, in ``RUN/rounds/round-K/``:

- ``scoring.json`` then ``slice.parquet`` (ids, and the student's ``uncertainty``, ``predicted``
  class and the rule's scores for the rounds it chose): the slice file is the round's commit point, written before the
  teacher sees a row, so a rerun labels the same rows and does not score again;
- the teacher labels the slice into ``RUN/labels`` through :func:`~llkd_ray.label.run.label_corpus`
  (``ids``): one directory grows round by round, each row committed once, a killed round resumed;
- every round but the last trains a student on all labels so far into ``round-K/train/`` (the last
  round's training is the pipeline's train stage: :func:`final_round_config`);
- ``round.json``, written last, records the slice's size and the round's FLOPs; ``RUN/rounds/rounds.json``
  all rounds.

The student scores the unlabeled rows in a Ray Data pass over the corpus with an autoscaled pool of
predictor actors (``labeling.scoring_*``), 2·N FLOPs per real token and forward pass, counted as
student scoring; the round's rule (``labeling.choose``, ``first``, ``clip``) then chooses the slice
(:mod:`llkd_ray.pipeline.scoring`, the rules pure in :mod:`llkd_ray.pipeline.choice`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llkd_ray.artifacts import MANIFEST, TRAINING_SUMMARY, RunLayout, atomic_output, read_json, write_json
from llkd_ray.compute import forward_flops
from llkd_ray.config import PipelineConfig, validate_config
from llkd_ray.pipeline.choice import HEAD_RULES, epistemic_kind
from llkd_ray.pipeline.rounds import (
    drawn_rows,
    random_slice,
    round_training,
    slice_sizes,
    training_record,
)

SLICE, SCORING, ROUND = "slice.parquet", "scoring.json", "round.json"

#: Called after each step of a round (``sliced``, ``labeled``, ``trained``) with its index: tests
#: raise from it to kill a run between two steps.
Hook = Callable[[str, int], None]
Log = Callable[[str], None]


def label_rounds(config: PipelineConfig, layout: RunLayout, log: Log = print, hook: Hook | None = None) -> dict:
    """Run (or resume) every round's slice and labels, and the trainings of all rounds but the last."""
    from llkd_ray.label.run import label_corpus
    from llkd_ray.label.scan import teacher_tokens_of
    from llkd_ray.label.store import OutputStore

    settings = config.labeling
    pool = pool_ids(config)
    sizes = slice_sizes(len(pool), settings.budget, settings.rounds)
    log(
        f"label: {len(sizes)} round(s) of student-guided labeling, {sum(sizes):,} of {len(pool):,} pool rows "
        f"(labeling.budget {settings.budget}): slices of {', '.join(map(str, sizes))} rows"
        + (f", {100 * settings.explore:g} % of each later one drawn at random" if settings.explore else "")
        + (f"; rule {settings.choose}, first slice {settings.first}" if _rules_set(config) else "")
    )
    records: list[dict[str, Any]] = []
    students: list[Path] = []
    for index, size in enumerate(sizes):
        directory = layout.round_dir(index)
        record = read_json(directory / ROUND)
        if record is None:
            chosen, scoring = _slice(config, layout, index, size, pool, students, records)
            _call(hook, "sliced", index)
            wanted = pa.array(chosen, type=pa.string())
            if not _committed(layout, wanted):  # a rerun after the labels were committed skips the pass
                log(label_corpus(config, layout.labels, ids=chosen).summary())
            _call(hook, "labeled", index)
            parameters = ((read_json(layout.labels / MANIFEST) or {}).get("teacher_compute") or {}).get("parameters")
            tokens = teacher_tokens_of(OutputStore(layout.labels), wanted)
            training = None
            if index < len(sizes) - 1:
                training = _train_round(config, layout, index, sizes, students[-1] if students else None, log)
                _call(hook, "trained", index)
            record = {
                "round": index,
                "kind": _kind(config, index),
                "size": len(chosen),
                "drawn": _drawn(config, index, len(chosen), size),
                "labeled_rows": sum(r["size"] for r in records) + len(chosen),
                "slice": str(directory / SLICE),
                "teacher": {
                    "tokens": tokens,
                    "flops": forward_flops(parameters, tokens) if parameters is not None else None,
                },
                "scoring": scoring,
                "training": training,
            }
            write_json(directory / ROUND, record)
        records.append(record)
        if record.get("training"):
            students.append(Path(record["training"]["dir"]) / "student")
    document = {
        "budget": settings.budget,
        "choose": settings.choose,
        "first": settings.first,
        "clip": settings.clip,
        "explore": settings.explore,
        "rounds_planned": len(sizes),
        "pool_rows": len(pool),
        "budget_rows": sum(sizes),
        "sizes": sizes,
        "seed": config.training.seed,
        "rounds": records,
    }
    write_json(layout.rounds_json, document)
    return document


#: A later round's rule as its records say it (entropy keeps the name the records always had).
RULE_NAMES = {
    "entropy": "uncertainty",
    "bald": "bald",
    "disagreement": "disagreement",
    "llkd": "teacher head x bald",
    "head_entropy": "teacher head x uncertainty",
    "gated_head": "teacher head, student-gated",
}


def _rules_set(config: PipelineConfig) -> bool:
    settings = config.labeling
    return (settings.choose, settings.first, settings.clip) != ("entropy", "random", 0.0)


def _kind(config: PipelineConfig, index: int) -> str:
    """How a round's slice was chosen, as the records and the summary's table say it."""
    settings = config.labeling
    if index == 0:
        return settings.first
    named = settings.choose in HEAD_RULES  # named for the head, whatever uncertainty it weighs
    rule = RULE_NAMES[settings.choose if named else epistemic_kind(settings.choose, index) or "entropy"]
    if settings.clip:
        rule += f", top {100 * settings.clip:g} % clipped"
    return f"{rule} + {100 * settings.explore:g} % random" if settings.explore else rule


def _drawn(config: PipelineConfig, index: int, rows: int, size: int) -> int:
    """Rows of a round's slice drawn at random (the rest chosen): all of a random round 0."""
    if index == 0:
        return rows if config.labeling.first == "random" else 0
    return min(rows, drawn_rows(size, config.labeling.explore))


def _committed(layout: RunLayout, ids: pa.Array) -> bool:
    """Whether every row of ``ids`` is committed in the labels directory (labeled or rejected)."""
    import pyarrow.compute as pc

    from llkd_ray.label.store import OutputStore, committed_ids

    if not (layout.labels / MANIFEST).is_file():
        return False
    return bool(pc.all(pc.is_in(ids, value_set=committed_ids(OutputStore(layout.labels)))).as_py())


def _call(hook: Hook | None, step: str, index: int) -> None:
    if hook is not None:
        hook(step, index)


def round_config(config: PipelineConfig, index: int, sizes: list[int], student: Path | None) -> PipelineConfig:
    """The config round ``index`` trains with: its share of the training budget, from ``student``."""
    raw = config.model_dump(mode="json")
    raw["training"].update(round_training(config.training, index, sizes))
    if student is not None:
        raw["student"]["model"] = str(student)
    return validate_config(raw, f"(labeling round {index})")


def final_round_config(config: PipelineConfig, layout: RunLayout) -> PipelineConfig:
    """The train stage's config with rounds on: the last round's share, from the previous round's student."""
    document = read_json(layout.rounds_json, strict=True) or {}
    sizes = document["sizes"]
    earlier = [r for r in document["rounds"][:-1] if r.get("training")]
    student = Path(earlier[-1]["training"]["dir"]) / "student" if earlier else None
    return round_config(config, len(sizes) - 1, sizes, student)


def _train_round(
    config: PipelineConfig, layout: RunLayout, index: int, sizes: list[int], student: Path | None, log: Log
) -> dict[str, Any] | None:
    """Train round ``index``'s student on every label so far (no gold-set evaluation along the way);
    a training finished before a kill (its summary is written last) is not run again."""
    from llkd_ray.train.launch import format_training, train_student

    output = layout.round_dir(index) / "train"
    finished = read_json(output / TRAINING_SUMMARY)
    if finished and (output / "student" / "config.json").is_file():
        return training_record(finished, output)
    round_settings = round_config(config, index, sizes, student)
    summary = train_student(round_settings, labels=layout.labels, output=output, eval_data=None)
    log(format_training(summary))
    return training_record(summary, output)


# --------------------------------------------------------------------------- the slice


def _slice(
    config: PipelineConfig,
    layout: RunLayout,
    index: int,
    size: int,
    pool: list[str],
    students: list[Path],
    records: list[dict[str, Any]],
) -> tuple[list[str], dict[str, Any] | None]:
    """Round ``index``'s slice: the one written already, else chosen now (and written). ``students``
    are the rounds' trained students so far, oldest first."""
    from llkd_ray.label.store import OutputStore, committed_ids
    from llkd_ray.pipeline.scoring import choose_round

    path = layout.round_dir(index) / SLICE
    if path.is_file():
        return pq.read_table(path, columns=["id"])["id"].to_pylist(), read_json(path.parent / SCORING)
    settings = config.labeling
    if (index == 0 and settings.first == "random") or (index > 0 and not students):
        chosen = random_slice(pool, size, config.training.seed)
        table, scoring = pa.table({"id": pa.array(chosen, type=pa.string())}), None
    else:
        labeled = committed_ids(OutputStore(layout.labels)) if index else pa.array([], type=pa.string())
        student = students[-1] if index else Path(config.student.model)
        previous = students[-2] if len(students) > 1 else None
        parameters = (records[-1].get("training") or {}).get("student_parameters") if records else None
        chosen, picked, scoring = choose_round(
            config, layout.labels, index, size, student, previous, labeled, parameters
        )
        keep = [c for c in ("id", "uncertainty", "predicted", "score", "bald", "disagreement", "teacher_sure",
                            "clears_student") if c in picked.columns]  # fmt: skip
        table = pa.Table.from_pandas(picked[keep], preserve_index=False)
        write_json(path.parent / SCORING, scoring)
    with atomic_output(path) as stream:
        pq.write_table(table, stream)
    return chosen, scoring


def pool_ids(config: PipelineConfig) -> list[str]:
    """The ids of the pool's usable rows, each once (a repeated id keeps its first row, as labeling does)."""
    from llkd_ray.corpus import read_corpus, read_order

    with read_order(config.data):
        rows = read_corpus(config.data).rows.select_columns(["id"])
        batches = list(rows.iter_batches(batch_format="pyarrow", batch_size=None))
    return list(dict.fromkeys(str(i) for batch in batches for i in batch["id"].to_pylist()))
