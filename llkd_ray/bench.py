"""Quality benchmark: LLKD against its baselines on real data, at equal compute (``llkd bench quality``).

The teacher labels the pool once; every strategy and seed then trains a student from those same
pseudo-labels with the **same compute budget** (FLOPs of candidate scoring and training, in passes
of ``all`` over the pool; ``llkd_ray/compute.py``), evaluated on the gold set at fixed fractions
of the budget: a learning curve per run. ``--steps N`` compares at equal steps instead. Output in
``OUTPUT/``:

- ``results.json`` — the settings, the teacher's accuracy and macro-F1 on the gold set, and per
  strategy and seed: the curve, the final accuracy and macro-F1, compute spent by kind, data
  usage, wall time (plus the mean ± std summary and the curves' milestones);
- ``results.md`` — macro-F1 at the full budget, the best along the curve and where, the compute
  to reach the teacher and ``all``'s best, data usage; where the compute goes; whether ``all``'s
  curve plateaued;
- ``quality.png`` — macro-F1 against compute (mean curve ± std band per strategy, the teacher a
  line) and final macro-F1 against data usage.

Work files (the sampled pool and gold set, the teacher's labels, each run's student) stay under
``OUTPUT/work/``; a run whose result is already there with the same settings is not redone, so an
interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llkd_ray.artifacts import (
    MANIFEST,
    percent,
    read_json,
    read_jsonl,
    read_label_table,
    stable_hash,
    write_json,
    write_text,
)
from llkd_ray.config import (
    DEFAULT_MOMENTUM,
    MINILM,
    STRATEGIES,
    LabelSpec,
    PipelineConfig,
    _apply_override,
    validate_config,
)
from llkd_ray.errors import ConfigError, DataError, run_reporting_errors

#: Built-in data sets: pool and gold splits, label descriptions from the shipped configs.
BUILTIN_DATASETS = {"sst2": "demo.yaml", "trec": "trec.yaml"}

#: Metrics of the table, in column order: (key, header).
METRICS = (("macro_f1", "macro-F1"), ("accuracy", "accuracy"))


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One trained configuration: a selection strategy and, for ``llkd``, its candidate factor M
    (with ``fill``: adaptive M, draws of one batch until the kept rows fill one, at most M)."""

    strategy: str
    candidates_per_step: int = 1
    fill: bool = False

    @property
    def name(self) -> str:
        if self.strategy != "llkd":
            return self.strategy
        return f"llkd (fill, M≤{self.candidates_per_step})" if self.fill else f"llkd (M={self.candidates_per_step})"

    @property
    def slug(self) -> str:
        if self.strategy != "llkd":
            return self.strategy
        return f"llkd-fill{self.candidates_per_step}" if self.fill else f"llkd-m{self.candidates_per_step}"


def parse_candidates(text: str) -> list[tuple[int, bool]]:
    """``--candidates 1,4,fill8``: fixed M values, and ``fillN`` for adaptive M capped at N."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        fill = part.startswith("fill")
        try:
            out.append((int(part.removeprefix("fill")), fill))
        except ValueError:
            raise ConfigError(f"--candidates takes M values and fillN entries, e.g. 1,4,fill8; got {part!r}") from None
    return out


def build_variants(strategies: Sequence[str], candidates: Sequence[int | tuple[int, bool]]) -> list[Variant]:
    """``llkd`` once per M in ``candidates``; every baseline once, with M = 1 (their usual setting)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown strategy {', '.join(unknown)}; known: {', '.join(STRATEGIES)}")
    if not strategies:
        raise ConfigError("no strategy to benchmark")
    pairs = [c if isinstance(c, tuple) else (c, False) for c in candidates]
    if any(m < 1 for m, _ in pairs) or not pairs:
        raise ConfigError("--candidates takes positive integers, e.g. 1,4")
    variants: list[Variant] = []
    for strategy in dict.fromkeys(strategies):
        if strategy == "llkd":
            variants.extend(Variant("llkd", m, fill) for m, fill in dict.fromkeys(pairs))
        else:
            variants.append(Variant(strategy))
    return variants


# --------------------------------------------------------------------------- inputs


def read_label_specs(path: str | Path) -> list[LabelSpec]:
    """Label names and descriptions from YAML, in any of three shapes.

    A mapping ``name: description``; a list of ``{name, description[, verbalizer]}``; or a file with
    a ``labels`` list at its top or under ``task`` (so a pipeline config works as is).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label descriptions not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"label descriptions {path} are not valid YAML: {error}") from None
    if isinstance(raw, dict) and isinstance(raw.get("task"), dict):
        raw = raw["task"]
    if isinstance(raw, dict) and "labels" in raw:
        raw = raw["labels"]
    if isinstance(raw, dict):
        raw = [{"name": str(name), "description": description} for name, description in raw.items()]
    if not isinstance(raw, list):
        raise DataError(
            f"label descriptions {path}: expected a mapping of label name to description "
            "or a list of {name, description}"
        )
    task = _validated({"task": {"labels": raw}, "data": {"input": "unused"}}, str(path))
    return task.task.labels


def _validated(raw: dict[str, Any], source: str) -> PipelineConfig:
    try:
        return validate_config(raw, source)
    except ConfigError as error:
        raise DataError(str(error)) from None


def _read_rows(path: Path, what: str) -> list[dict[str, Any]]:
    """The rows of a pool or gold JSONL file, each with a non-empty ``text``."""
    rows = read_jsonl(path, strict=True, what=what)
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{what} {path} row {number} has no usable 'text'")
    if not rows:
        raise DataError(f"{what} {path} is empty")
    return rows


def _resolve_file(reference: str) -> Path:
    from llkd_ray.corpus import builtin_path

    path = builtin_path(reference) if reference.startswith("builtin:") else Path(reference).expanduser()
    if not path.is_file():
        raise DataError(f"not found: {reference}")
    return path


def dataset_name(dataset: str | None, pool: str | None) -> str:
    """``sst2`` for ``builtin:sst2``; a custom pool's file stem (its folder's name for ``train``/``pool``)."""
    if dataset:
        return dataset.removeprefix("builtin:")
    path = Path(pool or "custom")
    return path.parent.name if path.stem in ("train", "pool") and path.parent.name else path.stem


@dataclass
class BenchData:
    """The benchmark's inputs, sampled and written to the work directory with explicit ids."""

    name: str
    labels: list[LabelSpec]
    pool_path: Path
    gold_path: Path
    pool_rows: int
    gold_rows: int
    pool_has_labels: bool
    gold_labels: dict[str, str] = field(repr=False)
    pool_labels: dict[str, str] = field(repr=False)
    source: dict[str, str] = field(default_factory=dict)


def prepare_data(
    *,
    dataset: str | None,
    pool: str | None,
    gold: str | None,
    labels_file: str | None,
    pool_size: int | None,
    gold_size: int | None,
    sample_seed: int,
    directory: Path,
) -> BenchData:
    """Resolve the data set, sample the pool (and the gold set when asked) and write both as JSONL.

    Every row gets an ``id`` (``p…`` / ``g…``) so teacher labels and gold labels join exactly.
    """
    if dataset:
        if pool or gold or labels_file:
            raise ConfigError("give either --dataset builtin:NAME or --pool, --gold and --labels, not both")
        name = dataset_name(dataset, None)
        if name not in BUILTIN_DATASETS:
            raise ConfigError(
                f"unknown data set {dataset!r}; built-in: {', '.join('builtin:' + n for n in BUILTIN_DATASETS)}"
            )
        pool, gold = f"builtin:{name}/train", f"builtin:{name}/test"
        label_specs = read_label_specs(Path(__file__).parent / "configs" / BUILTIN_DATASETS[name])
    else:
        missing = [flag for flag, value in (("--pool", pool), ("--gold", gold), ("--labels", labels_file)) if not value]
        if missing:
            raise ConfigError(f"custom data needs {', '.join(missing)} (or use --dataset builtin:sst2|builtin:trec)")
        assert pool and gold and labels_file
        name = dataset_name(None, pool)
        label_specs = read_label_specs(labels_file)
    names = [label.name for label in label_specs]
    pool_all = _read_rows(_resolve_file(pool), "pool")
    gold_all = _read_rows(_resolve_file(gold), "gold set")
    _check_labels(gold_all, names, "gold set", gold, required=True)
    pool_has_labels = all("label" in row for row in pool_all)
    if pool_has_labels:
        _check_labels(pool_all, names, "pool", pool, required=False)
    rng = random.Random(sample_seed)
    pool_rows = _sample(pool_all, pool_size, rng)
    gold_rows = _sample(gold_all, gold_size, rng)
    directory.mkdir(parents=True, exist_ok=True)
    pool_path, gold_path = directory / "pool.jsonl", directory / "gold.jsonl"
    pool_labels = _write_with_ids(pool_path, pool_rows, "p", keep_label=pool_has_labels)
    gold_labels = _write_with_ids(gold_path, gold_rows, "g", keep_label=True)
    return BenchData(
        name=name,
        labels=label_specs,
        pool_path=pool_path,
        gold_path=gold_path,
        pool_rows=len(pool_rows),
        gold_rows=len(gold_rows),
        pool_has_labels=pool_has_labels,
        gold_labels=gold_labels,
        pool_labels=pool_labels,
        source={"pool": pool, "gold": gold, "pool_total": str(len(pool_all)), "gold_total": str(len(gold_all))},
    )


def _check_labels(rows: list[dict[str, Any]], names: list[str], what: str, reference: str, *, required: bool) -> None:
    known = set(names)
    for number, row in enumerate(rows, 1):
        label = row.get("label")
        if label is None and not required:
            continue
        if label is None or str(label) not in known:
            raise DataError(f"{what} {reference} row {number}: label {label!r} is not one of {', '.join(names)}")


def _sample(rows: list[dict[str, Any]], size: int | None, rng: random.Random) -> list[dict[str, Any]]:
    if size is None or size >= len(rows):
        return list(rows)
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), size))]


def _write_with_ids(path: Path, rows: list[dict[str, Any]], prefix: str, *, keep_label: bool) -> dict[str, str]:
    """Write ``rows`` as JSONL with ids ``PREFIX000000``, ...; return the labels by id (when kept)."""
    written = [
        {"id": f"{prefix}{position:06d}", "text": row["text"], **({"label": str(row["label"])} if keep_label else {})}
        for position, row in enumerate(rows)
    ]
    write_text(path, "".join(json.dumps(row) + "\n" for row in written))
    return {row["id"]: row["label"] for row in written} if keep_label else {}


# --------------------------------------------------------------------------- settings


#: The default budget, in passes of ``all`` over the pool. Sized so that ``all``'s curve has
#: peaked or plateaued on the built-in sets (``results.md`` says whether it did) while one data
#: set's full run (five strategies x 3 seeds) takes about 70-100 minutes on a 2-core machine.
DEFAULT_BUDGET = 5.0


@dataclass
class BenchSettings:
    """Everything one benchmark run depends on (recorded in ``results.json``)."""

    teacher: str = "embedding"
    teacher_model: str | None = None
    student: str = MINILM
    seeds: int = 3
    budget: float | None = DEFAULT_BUDGET
    """Compute budget of every strategy, in passes of ``all`` over the pool (scoring included)."""
    steps: int | None = None
    """A fixed step budget instead (the equal-steps comparison); replaces ``budget``."""
    eval_points: int = 8
    """Gold-set evaluations along each run, at 1/n ... n/n of its budget: the learning curves."""
    batch_size: int = 32
    learning_rate: float = 1e-4
    max_length: int = 64
    momentum: float = DEFAULT_MOMENTUM
    workers: int = 1
    cpus_per_worker: float = field(default_factory=lambda: float(max(1, os.cpu_count() or 1)))
    """Torch threads per training worker (default: every core, for the 1 worker)."""
    pool_size: int | None = 1500
    gold_size: int | None = None
    sample_seed: int = 0
    overrides: list[str] = field(default_factory=list)

    @property
    def budget_text(self) -> str:
        if self.steps is not None:
            return f"{self.steps} steps of batch {self.batch_size} for every strategy (equal steps)"
        return f"a compute budget of {self.budget:g} passes of `all` over the pool for every strategy (equal compute)"


def base_config(data: BenchData, settings: BenchSettings) -> PipelineConfig:
    """The pipeline config every run starts from (strategy, M and seed are set per run)."""
    raw: dict[str, Any] = {
        "task": {"name": data.name, "labels": [label.model_dump(exclude_none=True) for label in data.labels]},
        "data": {
            "input": str(data.pool_path),
            "format": "jsonl",
            "id_column": "id",
            "label_column": "label" if data.pool_has_labels else None,
            "gold": str(data.gold_path),
        },
        "teacher": {"backend": settings.teacher},
        "student": {"model": settings.student, "max_length": settings.max_length},
        "selection": {"momentum": settings.momentum},
        "training": {
            "workers": settings.workers,
            "cpus_per_worker": settings.cpus_per_worker,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "max_steps": settings.steps,
            "budget": None if settings.steps is not None else settings.budget,
            "eval_points": settings.eval_points,
            "checkpoint_every": 1_000_000,  # one run is minutes; a lost one is simply redone
        },
    }
    if settings.teacher_model:
        raw["teacher"][settings.teacher] = {"model": settings.teacher_model}
    for override in settings.overrides:
        _apply_override(raw, override)
    return validate_config(raw, "benchmark settings")


def run_config(base: PipelineConfig, variant: Variant, seed: int) -> PipelineConfig:
    config = base.model_copy(deep=True)
    config.selection.strategy = variant.strategy  # type: ignore[assignment]
    config.selection.candidates_per_step = variant.candidates_per_step
    config.selection.fill_batch = variant.fill
    config.training.seed = seed
    return config


# --------------------------------------------------------------------------- aggregation


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _full_compute(runs: list[dict[str, Any]]) -> float | None:
    """``all``'s spent compute at the end of its runs (passes of ``all``): the unit of the compute axis.

    Without ``all`` among the runs, the mean spent compute of every run (the shared budget).
    """
    finished = [run for run in runs if run.get("curve")]
    spent = [run["curve"][-1]["all_passes"] for run in finished if run["strategy"] == "all"]
    spent = spent or [run["curve"][-1]["all_passes"] for run in finished]
    return statistics.fmean(spent) if spent else None


def first_reaching(curve: list[dict[str, Any]], target: float) -> float | None:
    """The compute (passes of ``all``) at the first curve point with macro-F1 >= ``target``."""
    return next((point["all_passes"] for point in curve if point["macro_f1"] >= target - 1e-12), None)


def mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Point-wise mean ± std over seeds (the k-th evaluation of every seed, at the same budget fraction)."""
    curves = [run["curve"] for run in runs if run.get("curve")]
    if not curves:
        return []
    length = min(len(curve) for curve in curves)
    out = []
    for k in range(length):
        compute, _ = _mean_std([curve[k]["all_passes"] for curve in curves])
        f1, f1_std = _mean_std([curve[k]["macro_f1"] for curve in curves])
        usage, _ = _mean_std([curve[k].get("data_usage", math.nan) for curve in curves])
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
    full = _full_compute(runs)
    everything = [run for run in runs if run["strategy"] == "all" and run.get("curve")]
    all_best = statistics.fmean(max(p["macro_f1"] for p in run["curve"]) for run in everything) if everything else None
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
        ):  # fmt: skip
            values = [float(run[key]) for run in mine if run.get(key) is not None]
            if values:
                entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std(values)
        curves = [run["curve"] for run in mine if run.get("curve")]
        if curves and full:
            best = [max(curve, key=lambda p: p["macro_f1"]) for curve in curves]
            entry["best_macro_f1_mean"], entry["best_macro_f1_std"] = _mean_std([p["macro_f1"] for p in best])
            entry["best_at_mean"], entry["best_at_std"] = _mean_std([p["all_passes"] / full for p in best])
            targets = {"teacher": teacher_f1, "all_best": all_best}
            for label, target in targets.items():
                if target is None:
                    continue
                reached = [c / full for c in (first_reaching(curve, target) for curve in curves) if c is not None]
                entry[f"to_{label}_reached"] = len(reached)
                if reached:
                    entry[f"to_{label}_mean"], entry[f"to_{label}_std"] = _mean_std(reached)
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
    """Spent compute, its scoring share, sample-steps trained and wall time, per variant."""
    lines = [
        "| strategy | FLOPs spent (passes of `all`) | scoring share of FLOPs | sample-steps trained | wall time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in summary.items():
        lines.append(
            f"| {name} | {_cell(entry.get('compute_mean'), entry.get('compute_std'), digits=2)} | "
            f"{_cell(entry.get('scoring_share_mean'), entry.get('scoring_share_std'), as_percent=True)} | "
            f"{_cell(entry.get('sample_step_usage_mean'), entry.get('sample_step_usage_std'), as_percent=True)} | "
            f"{_cell(entry.get('wall_time_s_mean'), entry.get('wall_time_s_std'), digits=0)} |"
        )
    return lines


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


def render_plot(results: dict[str, Any], path: Path) -> None:
    """Left: gold macro-F1 against compute, a mean curve and ±std band per strategy, the teacher a
    line. Right: final macro-F1 against data usage (mean ± std, the seeds faint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    figure, (curves, usage) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    colors = plt.get_cmap("tab10")
    full = _full_compute(results["runs"]) or 1.0
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


def write_results(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``quality.png`` into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "results.json", "md": output / "results.md", "png": output / "quality.png"}
    write_json(paths["json"], results)
    write_text(paths["md"], render_markdown(results))
    render_plot(results, paths["png"])
    return paths


# --------------------------------------------------------------------------- stages (the contracts)


def _label(config: PipelineConfig, output: Path) -> Path:
    """The teacher labels ``config.data.input`` into ``output`` (Parquet); returns the directory."""
    from llkd_ray.label.run import label_corpus

    label_corpus(config, output=output)
    return output


def _train(config: PipelineConfig, labels: Path, output: Path) -> dict[str, Any]:
    """Train one student, evaluated on the gold set along its run; returns its training summary."""
    from llkd_ray.train import train_student

    return train_student(config, labels=labels, output=output, eval_data=config.data.gold)


# --------------------------------------------------------------------------- the benchmark


def _usage(summary: dict[str, Any]) -> tuple[float, float]:
    """Data usage (fraction of the pool ever selected) and selected sample-steps over all."""
    usage = summary["data_usage"]
    return usage["pool_fraction"], usage["sample_step_fraction"]


def teacher_scores(
    data: BenchData, base: PipelineConfig, work: Path, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """Label the pool once (reused when already there) and the gold set; the teacher's own scores."""
    from llkd_ray.evaluate import teacher_gold_metrics

    teacher_key = stable_hash(
        {
            "teacher": base.teacher.model_dump(mode="json"),
            "task": base.task.model_dump(mode="json"),
            "pool": hashlib.sha256(data.pool_path.read_bytes()).hexdigest(),
            "gold": hashlib.sha256(data.gold_path.read_bytes()).hexdigest(),
        }
    )
    pool_labels = work / f"labels-{teacher_key}"
    gold_labels = work / f"teacher-gold-{teacher_key}"
    started = time.perf_counter()
    if not (pool_labels / MANIFEST).is_file():
        log(f"teacher: labelling the pool ({data.pool_rows} rows)")
        _label(base, pool_labels)
    if not (gold_labels / MANIFEST).is_file():
        log(f"teacher: labelling the gold set ({data.gold_rows} rows)")
    gold_config = base.model_copy(deep=True)
    gold_config.data.input = str(data.gold_path)
    gold_config.data.label_column = "label"
    truth = {row_id: data.gold_labels[row_id] for row_id in sorted(data.gold_labels)}
    scores = teacher_gold_metrics(gold_config, truth, gold_labels)
    teacher: dict[str, Any] = {
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "labelling_wall_time_s": time.perf_counter() - started,
    }
    pool_rows = read_label_table(pool_labels, ["id", "pseudo_label", "confidence"]).to_pylist()
    teacher["pool_labelled"] = len(pool_rows)
    teacher["pool_mean_confidence"] = statistics.fmean(row["confidence"] for row in pool_rows) if pool_rows else None
    if data.pool_labels:
        agree = [
            row["pseudo_label"] == data.pool_labels[row["id"]] for row in pool_rows if row["id"] in data.pool_labels
        ]
        teacher["pool_accuracy"] = sum(agree) / len(agree) if agree else None
    return pool_labels, teacher


def run_key(config: PipelineConfig, labels: Path) -> str:
    """What a run's result depends on: its config's settings that differ from the defaults (so a
    config field added later, with its default, keeps finished runs valid and a long benchmark
    resumes across versions) and the teacher's labels."""
    return stable_hash({"config": config.model_dump(mode="json", exclude_defaults=True), "labels": labels.name})


def _finished_run(result_path: Path, key: str, earlier: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run recorded at ``result_path`` with this key, if any; an ``earlier`` run (``--reuse``)
    is recorded there first."""
    if earlier is not None and not result_path.is_file():
        write_json(result_path, earlier | {"key": key, "reused": True})
    run = read_json(result_path)
    return run if isinstance(run, dict) and run.get("key") == key else None


def _train_run(config: PipelineConfig, variant: Variant, seed: int, key: str, labels: Path, run_dir: Path) -> dict:
    """Train one run and record its result in ``run_dir/result.json``."""
    started = time.perf_counter()
    summary = _train(config, labels, run_dir / "train")
    train_time = time.perf_counter() - started
    run = run_record(summary, variant, seed, key)
    run["train_wall_time_s"] = train_time
    run["wall_time_s"] = time.perf_counter() - started
    write_json(run_dir / "result.json", run)
    return run


def _trained_line(run: dict[str, Any]) -> str:
    return (
        f"macro-F1 {run['macro_f1']:.3f} (best {max(p['macro_f1'] for p in run['curve']):.3f}), "
        f"accuracy {run['accuracy']:.3f}, data usage {percent(run['data_usage'], '–')}, {run['compute']:.2f} passes "
        f"of `all` ({percent(run['scoring_share'], '–')} scoring), {run['steps']} steps, {run['wall_time_s']:.0f} s"
    )


def run_benchmark(
    data: BenchData,
    settings: BenchSettings,
    variants: list[Variant],
    output: Path,
    *,
    train: bool = True,
    reuse: Sequence[Path] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Label once, train every variant and seed from the same labels, score each on the gold set.

    Runs go seed by seed (every variant of seed 0 first), so a benchmark cut short still compares
    every variant. ``train=False`` only collects the runs finished so far. ``reuse``: earlier
    ``results.json`` files of the same settings; their runs count as finished (a benchmark moved to
    another machine or checkout resumes from its committed results).
    """
    work = output / "work"
    base = base_config(data, settings)
    if train:
        from llkd_ray.runtime import ensure_ray

        ensure_ray(base)  # a private local Ray with room for the trainer and Ray Data, or the job's cluster
    labels_dir, teacher = teacher_scores(data, base, work, log)
    log(f"teacher on the gold set: accuracy {teacher['accuracy']:.3f}, macro-F1 {teacher['macro_f1']:.3f}")
    reused = reusable_runs(reuse, data, settings)
    runs: list[dict[str, Any]] = []
    total = len(variants) * settings.seeds
    for seed in range(settings.seeds):
        for variant in variants:
            config = run_config(base, variant, seed)
            key = run_key(config, labels_dir)
            run_dir = work / "runs" / variant.slug / f"seed{seed}"
            run = _finished_run(run_dir / "result.json", key, reused.get((variant.name, seed)))
            if run is not None:
                runs.append(run)
                log(f"[{len(runs)}/{total}] {variant.name} seed {seed}: done before, macro-F1 {run['macro_f1']:.3f}")
            elif train:
                runs.append(_train_run(config, variant, seed, key, labels_dir, run_dir))
                log(f"[{len(runs)}/{total}] {variant.name} seed {seed}: {_trained_line(runs[-1])}")
    return benchmark_results(data, settings, variants, base, teacher, runs)


def benchmark_results(
    data: BenchData,
    settings: BenchSettings,
    variants: list[Variant],
    base: PipelineConfig,
    teacher: dict[str, Any],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """What ``results.json`` holds: the data, the settings, the teacher, every run and their summary."""
    summary = summarize(runs, [v.name for v in variants], teacher["macro_f1"])
    return {
        "benchmark": "quality",
        "data": {
            "name": data.name,
            "pool": data.source["pool"],
            "gold": data.source["gold"],
            "pool_rows": data.pool_rows,
            "pool_total": int(data.source["pool_total"]),
            "gold_rows": data.gold_rows,
            "gold_total": int(data.source["gold_total"]),
            "labels": [label.name for label in data.labels],
        },
        "settings": asdict(settings) | {"variants": [v.name for v in variants], "config": base.model_dump(mode="json")},
        "teacher": teacher,
        "runs": runs,
        "summary": summary,
        "plateau": plateau_check(summary),
    }


def reusable_runs(paths: Sequence[Path], data: BenchData, settings: BenchSettings) -> dict[tuple[str, int], Any]:
    """The runs of earlier ``results.json`` files, by (variant, seed), checked to share our settings."""
    mine = asdict(settings)
    reused: dict[tuple[str, int], Any] = {}
    for path in paths:
        try:
            earlier = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"--reuse {path}: not a readable results.json ({error})") from None
        theirs = {k: v for k, v in earlier.get("settings", {}).items() if k in mine}
        differing = sorted(k for k in mine if k != "cpus_per_worker" and theirs.get(k) != mine[k])
        same_data = all(earlier.get("data", {}).get(k) == getattr(data, k) for k in ("name", "pool_rows", "gold_rows"))
        if differing or not same_data:
            what = ", ".join(differing) if differing else "the data set"
            raise ConfigError(f"--reuse {path}: its runs were made with other settings ({what})")
        reused |= {(run["variant"], run["seed"]): run for run in earlier.get("runs", [])}
    return reused


def run_record(summary: dict[str, Any], variant: Variant, seed: int, key: str) -> dict[str, Any]:
    """One run's line in ``results.json``, from its training summary (its curve's last point is final)."""
    curve = summary.get("curve") or []
    if not curve:
        raise DataError(f"run {variant.name} seed {seed} recorded no gold-set evaluation")
    final = curve[-1]
    compute = summary["compute"]
    pool_fraction, step_fraction = _usage(summary)
    keep = ("step", "progress", "all_passes", "flops", "elapsed_s", "data_usage", "accuracy", "macro_f1")
    return {
        "key": key,
        "variant": variant.name,
        "strategy": variant.strategy,
        "candidates_per_step": variant.candidates_per_step,
        "seed": seed,
        "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"],
        "per_class_f1": final["per_class_f1"],
        "curve": [{k: point.get(k) for k in keep} for point in curve],
        "data_usage": pool_fraction,
        "sample_step_usage": step_fraction,
        "steps": summary.get("steps"),
        "compute": compute["all_passes"],
        "flops": compute["flops"],
        "scoring_share": compute["scoring_flops"] / compute["flops"] if compute["flops"] else None,
        "compute_detail": compute,
        "budget_spent": summary.get("budget_spent"),
    }


# --------------------------------------------------------------------------- quick mode


#: ``--quick``: a tiny pool, a tiny student, one seed, one pass of compute, a 4-point curve (CI).
QUICK = {
    "pool_size": 96,
    "gold_size": 96,
    "seeds": 1,
    "budget": 1.0,
    "eval_points": 4,
    "batch_size": 16,
    "max_length": 32,
}


# --------------------------------------------------------------------------- command line


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (a built-in set, or a pool + gold pair with label descriptions)")
    data.add_argument(
        "--dataset",
        "--data",
        dest="dataset",
        default=None,
        help="builtin:sst2 or builtin:trec (default builtin:sst2 when no --pool is given)",
    )
    data.add_argument(
        "--pool", help="unlabeled pool, JSONL with 'text' (a 'label' is kept hidden, to score the teacher)"
    )
    data.add_argument("--gold", help="gold set, JSONL with 'text' and 'label'")
    data.add_argument("--labels", help="label descriptions, YAML: {name: description} or a list of {name, description}")
    data.add_argument("--pool-size", type=int, help="sample this many pool rows (default 1500; 0 = the whole pool)")
    data.add_argument("--gold-size", type=int, help="sample this many gold rows (default: the whole gold set)")
    models = parser.add_argument_group("models")
    models.add_argument(
        "--teacher",
        choices=("embedding", "hf", "vllm"),
        default="embedding",
        help="teacher backend (default: the offline embedding teacher)",
    )
    models.add_argument("--teacher-model", help="teacher model (hub id or local dir; default the backend's)")
    models.add_argument("--student", help=f"student model (default {MINILM}; --quick: a tiny random BERT)")
    runs = parser.add_argument_group("strategies and budget")
    runs.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default all five)")
    runs.add_argument(
        "--candidates",
        default="1",
        help="llkd's candidates_per_step M values to compare, comma-separated; fillN for adaptive M "
        "capped at N (selection.fill_batch) (default 1, the default M)",
    )
    runs.add_argument("--seeds", type=int, help="seeds per strategy (default 3)")
    runs.add_argument(
        "--budget",
        type=float,
        help=f"compute budget of every strategy, in passes of `all` over the pool (default {DEFAULT_BUDGET:g})",
    )
    runs.add_argument(
        "--steps", type=int, help="compare at equal steps instead: this many training steps for every strategy"
    )
    runs.add_argument("--eval-points", type=int, help="gold-set evaluations along each run (default 8)")
    runs.add_argument("--batch-size", type=int, help="global batch size (default 32)")
    runs.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, help="default 1e-4")
    runs.add_argument("--max-length", type=int, help="student max tokens (default 64)")
    runs.add_argument("--momentum", type=float, help=f"threshold EMA momentum (default {DEFAULT_MOMENTUM})")
    runs.add_argument("--workers", type=int, help="Ray Train workers per run (default 1)")
    runs.add_argument(
        "--cpus-per-worker", type=float, help="CPUs (torch threads) per worker (default: cores / workers)"
    )
    runs.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any pipeline config value for every run, e.g. --set selection.weighting=none",
    )
    parser.add_argument("--output", "-o", help="output directory (default runs/bench-quality-NAME)")
    parser.add_argument("--quick", action="store_true", help="tiny pool and student, one seed, a few steps (CI)")
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: write the results of the runs finished so far"
    )
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="count the runs of an earlier results.json of the same settings as finished (repeatable)",
    )


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    settings = BenchSettings(teacher=args.teacher, teacher_model=args.teacher_model, overrides=list(args.overrides))
    if args.quick:
        for key, value in QUICK.items():
            setattr(settings, key, value)
    keys = ("seeds", "budget", "steps", "eval_points", "batch_size", "learning_rate", "max_length", "momentum")
    for key in (*keys, "workers", "gold_size"):
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    if args.steps is not None and args.budget is not None:
        raise ConfigError("--budget (equal compute) and --steps (equal steps) are two budgets; give one of them")
    if args.steps is not None:
        settings.budget = None
    else:
        settings.steps = None
    if settings.budget is not None and settings.budget <= 0:
        raise ConfigError("--budget must be positive (passes of `all` over the pool, e.g. 5)")
    settings.cpus_per_worker = args.cpus_per_worker or float(max(1, (os.cpu_count() or 1) // settings.workers))
    if args.pool_size is not None:
        settings.pool_size = args.pool_size or None
    if args.student:
        settings.student = args.student
    for key in ("seeds", "steps", "eval_points", "batch_size", "max_length", "workers"):
        if getattr(settings, key) is not None and getattr(settings, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")
    return settings


def quality_main(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """``llkd bench quality``: run the benchmark and write results.json, results.md, quality.png."""
    variants = build_variants(
        [s.strip() for s in args.strategies.split(",") if s.strip()], parse_candidates(args.candidates)
    )
    settings = settings_from_args(args)
    dataset = args.dataset or (None if args.pool else "builtin:sst2")
    name = dataset_name(dataset, args.pool)
    output = Path(args.output or f"runs/bench-quality-{name}{'-quick' if args.quick else ''}")
    data = prepare_data(
        dataset=dataset,
        pool=args.pool,
        gold=args.gold,
        labels_file=args.labels,
        pool_size=settings.pool_size,
        gold_size=settings.gold_size,
        sample_seed=settings.sample_seed,
        directory=output / "work" / "data",
    )
    if args.quick and not args.student:
        from llkd_ray.testing import build_tiny_encoder

        settings.student = str(build_tiny_encoder(output / "work" / "tiny-student"))
    log(
        f"quality benchmark on {data.name}: pool {data.pool_rows} rows, gold {data.gold_rows} rows, "
        f"{len(variants)} strategies x {settings.seeds} seed(s), {settings.budget_text}"
    )
    started = time.perf_counter()
    reuse = [Path(p) for p in args.reuse]
    results = run_benchmark(data, settings, variants, output, train=not args.report_only, reuse=reuse, log=log)
    results["wall_time_s"] = time.perf_counter() - started
    paths = write_results(results, output)
    log("")
    log(paths["md"].read_text())
    log(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``benchmarks/quality.py``: the arguments and errors of ``llkd bench quality``."""
    parser = argparse.ArgumentParser(prog="benchmarks/quality.py", description=__doc__.splitlines()[0])
    add_quality_arguments(parser)
    return run_reporting_errors(quality_main, parser.parse_args(argv))
