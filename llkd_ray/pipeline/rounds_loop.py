"""The labeling rounds on Ray: label a slice, train, score the unlabeled pool, choose the next slice.

:func:`label_rounds` is ``llkd run``'s label stage when ``labeling`` is on (the plan and the choice
of rows are :mod:`llkd_ray.pipeline.rounds`). Each round, in ``RUN/rounds/round-K/``:

- ``scoring.json`` then ``slice.parquet`` (ids, and the student's ``uncertainty`` and ``predicted``
  class for the rounds it chose): the slice file is the round's commit point, written before the
  teacher sees a row, so a rerun labels the same rows and does not score again;
- the teacher labels the slice into ``RUN/labels`` through :func:`~llkd_ray.label.run.label_corpus`
  (``ids``): one directory grows round by round, each row committed once, a killed round resumed;
- every round but the last trains a student on all labels so far into ``round-K/train/`` (the last
  round's training is the pipeline's train stage: :func:`final_round_config`);
- ``round.json``, written last, records the slice's size and the round's FLOPs; ``RUN/rounds/rounds.json``
  all rounds.

The student scores the unlabeled rows in a Ray Data pass over the corpus with an autoscaled pool of
predictor actors (``labeling.scoring_*``), 2·N FLOPs per real token, counted as student scoring.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llkd_ray.artifacts import MANIFEST, TRAINING_SUMMARY, RunLayout, atomic_output, read_json, write_json
from llkd_ray.compute import forward_flops
from llkd_ray.config import PipelineConfig, validate_config
from llkd_ray.pipeline.rounds import (
    choose_slice,
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
    )
    records: list[dict[str, Any]] = []
    student: Path | None = None
    for index, size in enumerate(sizes):
        directory = layout.round_dir(index)
        record = read_json(directory / ROUND)
        if record is None:
            chosen, scoring = _slice(config, layout, index, size, pool, student, records)
            _call(hook, "sliced", index)
            wanted = pa.array(chosen, type=pa.string())
            if not _committed(layout, wanted):  # a rerun after the labels were committed skips the pass
                log(label_corpus(config, layout.labels, ids=chosen).summary())
            _call(hook, "labeled", index)
            parameters = ((read_json(layout.labels / MANIFEST) or {}).get("teacher_compute") or {}).get("parameters")
            tokens = teacher_tokens_of(OutputStore(layout.labels), wanted)
            training = None
            if index < len(sizes) - 1:
                training = _train_round(config, layout, index, sizes, student, log)
                _call(hook, "trained", index)
            record = {
                "round": index,
                "kind": _kind(index, config.labeling.explore),
                "size": len(chosen),
                "drawn": len(chosen) if index == 0 else min(len(chosen), drawn_rows(size, config.labeling.explore)),
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
            student = Path(record["training"]["dir"]) / "student"
    document = {
        "budget": settings.budget,
        "rounds_planned": len(sizes),
        "pool_rows": len(pool),
        "budget_rows": sum(sizes),
        "sizes": sizes,
        "seed": config.training.seed,
        "rounds": records,
    }
    write_json(layout.rounds_json, document)
    return document


def _kind(index: int, explore: float) -> str:
    """How a round's slice was chosen, as the records and the summary's table say it."""
    if index == 0:
        return "random"
    return f"uncertainty + {100 * explore:g} % random" if explore else "uncertainty"


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
    student: Path | None,
    records: list[dict[str, Any]],
) -> tuple[list[str], dict[str, Any] | None]:
    """Round ``index``'s slice: the one written already, else chosen now (and written)."""
    from llkd_ray.label.store import OutputStore, committed_ids

    path = layout.round_dir(index) / SLICE
    if path.is_file():
        return pq.read_table(path, columns=["id"])["id"].to_pylist(), read_json(path.parent / SCORING)
    if index == 0 or student is None:
        chosen = random_slice(pool, size, config.training.seed)
        table, scoring = pa.table({"id": pa.array(chosen, type=pa.string())}), None
    else:
        labeled = committed_ids(OutputStore(layout.labels))
        scores = score_pool(config, student, labeled)
        names = config.task.label_names
        chosen = choose_slice(
            scores["id"].tolist(),
            scores["uncertainty"].to_numpy(),
            scores["predicted"].to_numpy(),
            size,
            len(names),
            set(labeled.to_pylist()),
            explore=config.labeling.explore,
            seed=config.training.seed + index,
        )
        picked = scores.set_index("id").loc[chosen]
        parameters = (records[-1].get("training") or {}).get("student_parameters")
        tokens = int(scores["tokens"].sum())
        scoring = {
            "rows": len(scores),
            "tokens": tokens,
            "parameters": parameters,
            "flops": forward_flops(parameters, tokens) if parameters else None,
            "student": str(student),
            "pool_by_predicted_class": _by_class(scores["predicted"], names),
            "slice_by_predicted_class": _by_class(picked["predicted"], names),
            "mean_uncertainty_pool": float(scores["uncertainty"].mean()) if len(scores) else None,
            "mean_uncertainty_slice": float(picked["uncertainty"].mean()) if len(picked) else None,
        }
        table = pa.Table.from_pandas(picked.reset_index()[["id", "uncertainty", "predicted"]], preserve_index=False)
        write_json(path.parent / SCORING, scoring)
    with atomic_output(path) as stream:
        pq.write_table(table, stream)
    return chosen, scoring


def _by_class(predicted: pd.Series, names: list[str]) -> dict[str, int]:
    counts = Counter(int(p) for p in predicted)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}


def pool_ids(config: PipelineConfig) -> list[str]:
    """The ids of the pool's usable rows, each once (a repeated id keeps its first row, as labeling does)."""
    from llkd_ray.corpus import read_corpus, read_order

    with read_order(config.data):
        rows = read_corpus(config.data).rows.select_columns(["id"])
        batches = list(rows.iter_batches(batch_format="pyarrow", batch_size=None))
    return list(dict.fromkeys(str(i) for batch in batches for i in batch["id"].to_pylist()))


# --------------------------------------------------------------------------- the student scores the pool


class StudentScorer:
    """The scoring pass's Ray Data actor class: one predictor, ``threads`` torch threads."""

    def __init__(self, model_dir: str, max_length: int, threads: int) -> None:
        import torch

        from llkd_ray.student.predictor import Predictor

        torch.set_num_threads(threads)
        self.predictor = Predictor.load(model_dir, max_length=max_length, batch_size=64)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        from llkd_ray.train.selection import normalized_entropy

        probabilities, tokens = self.predictor.scored(batch["text"].tolist())
        # softmax(log p) = p: the entropy of the predictor's probabilities, by the selection rule's function.
        uncertainty = normalized_entropy(torch.log(probabilities.clamp_min(1e-30)))
        return pd.DataFrame(
            {
                "id": batch["id"].astype(str),
                "uncertainty": uncertainty.numpy(),
                "predicted": probabilities.argmax(dim=-1).numpy(),
                "tokens": tokens,
            }
        )


def score_pool(config: PipelineConfig, student: Path, labeled: pa.Array) -> pd.DataFrame:
    """``id``, ``uncertainty``, ``predicted`` and ``tokens`` of every usable pool row not in ``labeled``."""
    import ray.data

    from llkd_ray.corpus import read_corpus, read_order
    from llkd_ray.label.store import drop_committed

    settings = config.labeling
    low, high = (
        (settings.scoring_concurrency,) * 2
        if isinstance(settings.scoring_concurrency, int)
        else settings.scoring_concurrency
    )
    with read_order(config.data):
        rows = read_corpus(config.data).rows.select_columns(["id", "text"])
        unlabeled = {"committed": labeled}
        rows = rows.map_batches(drop_committed, batch_format="pyarrow", batch_size=None, fn_kwargs=unlabeled)
        scored = rows.map_batches(
            StudentScorer,
            fn_constructor_kwargs={
                "model_dir": str(student),
                "max_length": config.student.max_length,
                "threads": max(1, int(settings.scoring_num_cpus)),
            },
            batch_size=settings.scoring_batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
            num_cpus=settings.scoring_num_cpus,
            num_gpus=settings.scoring_num_gpus or None,
        )
        frames = list(scored.iter_batches(batch_format="pandas", batch_size=None))
    columns = ["id", "uncertainty", "predicted", "tokens"]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return frame.drop_duplicates("id", keep="first").reset_index(drop=True)
