"""The benchmark's runs: label once, train every variant and seed, resume and reuse finished runs.

The teacher labels the pool once (:func:`teacher_scores`); every run trains a student from those
labels and records ``OUTPUT/work/runs/VARIANT/seedN/result.json`` under a key of its config and
labels (:func:`run_key`), so a run already there with the same key is not redone and an
interrupted benchmark resumes. ``--reuse`` counts an earlier ``results.json``'s runs as finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llkd_ray.artifacts import MANIFEST, percent, read_json, read_label_table, stable_hash, write_json
from llkd_ray.compute import COMPUTE_SECONDS, compute_seconds
from llkd_ray.config import PipelineConfig
from llkd_ray.errors import ConfigError, DataError
from llkd_ray.quality.data import BenchData
from llkd_ray.quality.labeling import (
    claim_run_dir,
    full_pool_tokens,
    labeling_record,
    labeling_summary,
    slice_quality,
    teacher_pool_flops,
    train_labeling_run,
)
from llkd_ray.quality.quiet import MachineUse
from llkd_ray.quality.settings import LABELING_SETTINGS, BenchSettings, Variant, base_config, run_config
from llkd_ray.quality.summary import plateau_check, summarize
from llkd_ray.tracking import TrackingRun, ending, start_run

# --------------------------------------------------------------------------- stages (the contracts)


def _label(config: PipelineConfig, output: Path) -> Path:
    """The teacher labels ``config.data.input`` into ``output`` (Parquet); returns the directory."""
    from llkd_ray.label.run import label_corpus

    label_corpus(config, output=output)
    return output


def _train(config: PipelineConfig, labels: Path, output: Path, tracking: TrackingRun | None = None) -> dict[str, Any]:
    """Train one student, evaluated on the gold set along its run; returns its training summary.
    ``tracking``: its MLflow run (nested under the benchmark's), metrics and records, no student."""
    from llkd_ray.train.launch import train_student

    return train_student(
        config, labels=labels, output=output, eval_data=config.data.gold, tracking=tracking, track_student=False
    )


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
    teacher["pool_flops"] = teacher_pool_flops(pool_labels)
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
    settings = config.model_dump(mode="json", exclude_defaults=True, exclude={"tracking"})  # tracking changes no result
    return stable_hash({"config": settings, "labels": labels.name})


def _finished_run(result_path: Path, key: str, earlier: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run recorded at ``result_path`` with this key, if any; an ``earlier`` run (``--reuse``)
    is recorded there first."""
    if earlier is not None and not result_path.is_file():
        write_json(result_path, earlier | {"key": key, "reused": True})
    run = read_json(result_path)
    return run if isinstance(run, dict) and run.get("key") == key else None


def _train_run(
    config: PipelineConfig,
    variant: Variant,
    seed: int,
    key: str,
    labels: Path,
    run_dir: Path,
    parent: TrackingRun | None = None,
    pool_tokens: Callable[[], int] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train one run and record its result in ``run_dir/result.json`` (and a nested MLflow run); a
    labeling variant labels its share of the pool in rounds first (:mod:`llkd_ray.quality.labeling`)."""
    started, machine = time.perf_counter(), MachineUse.start()
    if variant.labeling:
        claim_run_dir(run_dir, key)
    tags = {"llkd.strategy": variant.name, "llkd.seed": str(seed)}
    tracking = start_run(config, run_dir, f"{variant.slug}-seed{seed}", parent=parent, tags=tags) if parent else None
    with ending(tracking):
        if variant.labeling:
            summary, total, document = train_labeling_run(config, run_dir, tracking, log)
        else:
            summary = _train(config, labels, run_dir / "train", tracking)
    train_time = time.perf_counter() - started
    run = run_record(summary, variant, seed, key)
    if variant.labeling:
        assert pool_tokens is not None, "a labeling run needs the whole pool's tokens"
        run = labeling_record(run, summary["compute"], total, document, pool_tokens())
        run["labeling"]["slices"] = slice_quality(run_dir)
    run["train_wall_time_s"] = train_time
    run["wall_time_s"] = time.perf_counter() - started
    run |= machine.record()
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

        # A private local Ray with room for the trainer and Ray Data (its logs in OUTPUT/logs), or the job's cluster.
        ensure_ray(base, log_dir=output / "logs")
    labels_dir, teacher = teacher_scores(data, base, work, log)
    log(f"teacher on the gold set: accuracy {teacher['accuracy']:.3f}, macro-F1 {teacher['macro_f1']:.3f}")
    reused = reusable_runs(reuse, data, settings)
    # One MLflow run for the benchmark (tracking.backend: mlflow), a nested one per strategy and seed.
    parent = start_run(base, output, f"bench-{output.resolve().name}", tags={"llkd.command": "bench"})
    with ending(parent):
        runs = _run_all(base, settings, variants, labels_dir, work, reused, train, parent, log, data.pool_rows)
    return benchmark_results(data, settings, variants, base, teacher, runs)


def _run_all(
    base: PipelineConfig,
    settings: BenchSettings,
    variants: list[Variant],
    labels_dir: Path,
    work: Path,
    reused: dict[tuple[str, int], Any],
    train: bool,
    parent: TrackingRun | None,
    log: Callable[[str], None],
    pool_rows: int,
) -> list[dict[str, Any]]:
    """Every variant and seed: a finished run is read back, the others trained (``train``)."""
    runs: list[dict[str, Any]] = []
    total = len(variants) * settings.seeds
    pool_tokens = functools.cache(lambda: full_pool_tokens(base, labels_dir))  # once, when a labeling run needs it
    for seed in range(settings.seeds):
        for variant in variants:
            config = run_config(base, variant, seed, pool_rows)
            key = run_key(config, labels_dir)
            run_dir = work / "runs" / variant.slug / f"seed{seed}"
            run = _finished_run(run_dir / "result.json", key, reused.get((variant.name, seed)))
            if run is not None and variant.labeling and "slices" not in run["labeling"]:
                run["labeling"]["slices"] = slice_quality(run_dir)  # a run recorded before the slices were
                write_json(run_dir / "result.json", run)
            if run is not None:
                runs.append(run)
                log(f"[{len(runs)}/{total}] {variant.name} seed {seed}: done before, macro-F1 {run['macro_f1']:.3f}")
            elif train:
                runs.append(_train_run(config, variant, seed, key, labels_dir, run_dir, parent, pool_tokens, log))
                log(f"[{len(runs)}/{total}] {variant.name} seed {seed}: {_trained_line(runs[-1])}")
    return runs


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
        "labeling": labeling_summary(runs, teacher),
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
        # No fully labeled run depends on these (a run is taken by variant and seed: fewer seeds take fewer).
        ignored = ("cpus_per_worker", "seeds", *LABELING_SETTINGS)
        differing = sorted(k for k in mine if k not in ignored and theirs.get(k) != mine[k])
        same_data = all(earlier.get("data", {}).get(k) == getattr(data, k) for k in ("name", "pool_rows", "gold_rows"))
        if differing or not same_data:
            what = ", ".join(differing) if differing else "the data set"
            raise ConfigError(f"--reuse {path}: its runs were made with other settings ({what})")
        reused |= {(run["variant"], run["seed"]): run for run in earlier.get("runs", [])}
    return reused


def _reused_share(compute: dict[str, Any]) -> float | None:
    """Reused scores over all scores the selection read (reused + computed); None when none was read."""
    reused = compute.get("reused_samples", 0)
    looked = reused + compute.get("scored_samples", 0)
    return reused / looked if looked else None


def run_record(summary: dict[str, Any], variant: Variant, seed: int, key: str) -> dict[str, Any]:
    """One run's line in ``results.json``, from its training summary (its curve's last point is final)."""
    curve = summary.get("curve") or []
    if not curve:
        raise DataError(f"run {variant.name} seed {seed} recorded no gold-set evaluation")
    final = curve[-1]
    compute = summary["compute"]
    pool_fraction, step_fraction = _usage(summary)
    keep = (
        "step",
        "progress",
        "all_passes",
        "flops",
        "elapsed_s",
        *COMPUTE_SECONDS,
        "data_usage",
        "accuracy",
        "macro_f1",
    )
    seconds = compute_seconds(final)
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
        "reused_share": _reused_share(compute),
        "compute_detail": compute,
        "compute_s": seconds,
        "seconds_per_pflop": seconds / (compute["flops"] / 1e15) if seconds is not None and compute["flops"] else None,
        "budget_spent": summary.get("budget_spent"),
        "stop": _stop_point(summary.get("stop")),
    }


def _stop_point(stop: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where ``training.stop: auto`` was called (progress and passes of ``all``) and the churn it saw."""
    if not stop:
        return None
    churn = [check.get("churn") for check in stop.get("checks", [])]
    return {"stopped_at": stop.get("stopped_at"), "all_passes": stop.get("all_passes_at_stop"), "churn": churn}
