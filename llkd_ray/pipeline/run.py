"""The end-to-end pipeline: label → train → evaluate → report → (serve), resumable stage by stage.

``run_pipeline`` writes everything under one run directory (:class:`~llkd_ray.artifacts.RunLayout`)::

    RUN/config.yaml           the resolved config of the latest run
    RUN/labels/               teacher pseudo-labels of the pool (label stage)
    RUN/rounds/               with ``labeling`` on: each round's slice, records and student (label stage)
    RUN/train/                the student, metrics.jsonl, training_summary.json (train stage)
    RUN/eval/teacher_gold/    the teacher's labels of the gold set (evaluate stage)
    RUN/eval.json             teacher and student metrics on the gold set (evaluate stage)
    RUN/report/index.html     the run report with its PNG plots (report stage)
    RUN/_stages/STAGE.json    one marker per stage: config hash, status, wall time
    RUN/tracking.json         the record of this invocation's MLflow run (tracking.backend: mlflow)
    RUN/mlruns/               the MLflow file store, unless tracking.uri / MLFLOW_TRACKING_URI says otherwise
    RUN/logs/                 Ray's own logs (driver, Data, Train); on the console with --verbose

A stage is skipped when its marker says ``done`` with the hash of the config sections it depends
on and its outputs are there, and no stage before it ran in this invocation. Markers are written
atomically: ``running`` before the stage starts, ``done`` after its outputs are complete. A stage
that was interrupted (``running`` with the same hash) is resumed where the stage supports it
(labeling commits its output exactly once) and redone from scratch otherwise. ``force`` redoes the
named stage and every stage after it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from llkd_ray.artifacts import MANIFEST, STAGES, RunLayout, percent, read_json, write_json, write_text
from llkd_ray.compute import compute_by_stage, compute_rows, format_flops
from llkd_ray.config import PipelineConfig, load_config
from llkd_ray.console import verbose
from llkd_ray.errors import ConfigError, LlkdError
from llkd_ray.pipeline.rounds import read_rounds, rounds_lines, with_earlier_rounds
from llkd_ray.tracking import TrackingRun, ending, start_run

#: Config sections each stage's output depends on (its hash decides whether it is redone).
_LABEL_SECTIONS = ("task", "data", "teacher")
_MODEL_SECTIONS = (*_LABEL_SECTIONS, "selection", "student", "training")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "label": _LABEL_SECTIONS,
    "train": _MODEL_SECTIONS,
    "evaluate": _MODEL_SECTIONS,
    "report": _MODEL_SECTIONS,
}

#: Stages whose interrupted output the stage itself resumes (the others start over).
_RESUMABLE = frozenset({"label"})

Log = Callable[[str], None]


# --------------------------------------------------------------------------- markers


def read_marker(layout: RunLayout, stage: str) -> dict[str, Any] | None:
    return read_json(layout.marker(stage))


def stage_hash(config: PipelineConfig, stage: str) -> str:
    """The hash of the sections a stage depends on; ``labeling`` counts only when its rounds are on,
    so the runs written before it existed keep their hashes."""
    rounds = ("labeling",) if config.labeling.enabled else ()
    return config.section_hash(*STAGE_SECTIONS[stage], *rounds)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- planning


@dataclass
class StageRun:
    """What a stage is given: the config, the run directory, where its lines go, and this
    invocation's MLflow run. Stages of one invocation hand each other what they have in memory;
    the files in the run directory are the record a later invocation resumes from."""

    config: PipelineConfig
    layout: RunLayout
    log: Log = print
    tracking: TrackingRun | None = None


@dataclass
class StageRecord:
    name: str
    status: str
    """``ran``, ``resumed`` or ``skipped`` (done earlier with the same config)."""
    wall_s: float
    hash: str


@dataclass
class PipelineResult:
    run_dir: Path
    stages: dict[str, StageRecord] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return RunLayout(self.run_dir).report_index


def plan_stages(config: PipelineConfig, layout: RunLayout, *, force: str | None = None) -> dict[str, str]:
    """What each stage will do: ``skip`` (done with this config), ``resume`` or ``run``.

    A stage runs when its marker is missing, not ``done``, of another config hash, its outputs are
    gone, it is at or after ``force``, or any stage before it runs.
    """
    if force is not None and force not in STAGES:
        raise ConfigError(f"--force {force!r}: unknown stage; stages are {', '.join(STAGES)}")
    forced_from = STAGES.index(force) if force else len(STAGES)
    plan: dict[str, str] = {}
    upstream_runs = False
    for position, stage in enumerate(STAGES):
        marker = read_marker(layout, stage)
        same_config = marker is not None and marker.get("hash") == stage_hash(config, stage)
        if upstream_runs or position >= forced_from or not same_config:
            plan[stage] = "run"
        elif marker.get("status") == "done" and layout.complete(stage):
            plan[stage] = "skip"
        elif stage in _RESUMABLE and marker.get("status") == "running":
            plan[stage] = "resume"
        else:
            plan[stage] = "run"
        upstream_runs = upstream_runs or plan[stage] != "skip"
    return plan


# --------------------------------------------------------------------------- the stages


def label_stage(run: StageRun) -> dict[str, Any]:
    """The teacher labels the pool: all of it, or (``labeling`` on) slices chosen in rounds."""
    from llkd_ray.label.run import label_corpus

    config, layout, log = run.config, run.layout, run.log
    log(f"label: teacher {config.teacher.backend} labels {config.data.input} -> {layout.labels}")
    if config.labeling.enabled:
        from llkd_ray.pipeline.rounds_loop import label_rounds

        label_rounds(config, layout, log)
    else:
        log(label_corpus(config, output=layout.labels).summary())
    return read_json(layout.labels / MANIFEST) or {}


def train_stage(run: StageRun) -> dict[str, Any]:
    from llkd_ray.train.launch import format_training, train_student

    config, layout, log = run.config, run.layout, run.log
    if config.labeling.enabled:  # the last round: its share of the budget, from the previous round's student
        from llkd_ray.pipeline.rounds_loop import final_round_config

        config = final_round_config(config, layout)
    log(f"train: {config.selection.strategy} student on {config.training.workers} workers -> {layout.train}")
    log(format_training(train_student(config, labels=layout.labels, output=layout.train, tracking=run.tracking)))
    return training_summary(layout)


def evaluate_stage(run: StageRun) -> dict[str, Any]:
    """Teacher and student on the gold set, through the same metrics; writes ``eval.json``."""
    from llkd_ray.corpus import read_gold
    from llkd_ray.evaluate import student_gold_metrics, teacher_gold_metrics

    config, layout, log = run.config, run.layout, run.log
    if not config.data.gold:
        raise ConfigError("data.gold: the evaluate stage needs a gold set (text, label)")
    names = config.task.label_names
    gold = read_gold(config.data.gold, names)
    log(f"evaluate: teacher labels the gold set {config.data.gold} ({len(gold)} rows)")
    teacher_config = config.model_copy(deep=True)
    teacher_config.data.input = config.data.gold
    teacher_config.data.format = "auto"
    teacher_config.data.text_column = "text"
    teacher_config.data.id_column = None
    teacher_config.data.label_column = "label"
    teacher_config.data.limit = None
    gold_labels = dict(zip(gold["id"], gold["label"], strict=True))
    teacher = teacher_gold_metrics(teacher_config, gold_labels, layout.teacher_gold)

    log(f"evaluate: student {layout.student} predicts the gold set")
    student = student_gold_metrics(
        layout.student, list(gold["text"]), list(gold["label"]), names, max_length=config.student.max_length
    )

    summary = training_summary(layout)
    result = {
        "gold": config.data.gold,
        "gold_rows": len(gold),
        "labels": names,
        "teacher": {"backend": config.teacher.backend, **teacher},
        "student": {"model": str(layout.student), **student},
        "data_usage": summary.get("data_usage"),
        "compute": run_compute(layout, summary),
        "strategy": config.selection.strategy,
        "config_hash": stage_hash(config, "evaluate"),
    }
    write_json(layout.eval_json, result)
    log(
        f"evaluate: macro-F1 teacher {teacher['macro_f1']:.3f}, student {student['macro_f1']:.3f} "
        f"on {len(gold)} gold rows -> {layout.eval_json}"
    )
    return result


def report_stage(run: StageRun) -> dict[str, Any]:
    from llkd_ray.report.page import build_report

    index = build_report(run.layout.root)
    run.log(f"report: {index}")
    return {"index": str(index)}


def serve_stage(run: StageRun) -> dict[str, Any]:
    from llkd_ray.serve.server import run_server

    serving = run.config.serving
    run.log(f"serve: {run.layout.student} on http://{serving.host}:{serving.port} (Ctrl-C stops)")
    run_server(run.layout.student, run.config)
    return {}


STAGE_FUNCTIONS: dict[str, Callable[[StageRun], dict[str, Any]]] = {
    "label": label_stage,
    "train": train_stage,
    "evaluate": evaluate_stage,
    "report": report_stage,
}


# --------------------------------------------------------------------------- reading outputs


def training_summary(layout: RunLayout) -> dict[str, Any]:
    return read_json(layout.training_summary) or {}


def run_compute(layout: RunLayout, summary: dict[str, Any]) -> dict[str, Any]:
    """``eval.json``'s ``compute``: FLOPs by stage with shares, and (apart, being evaluation, not
    the method) what the teacher spent labeling the gold set."""
    compute = compute_by_stage(read_json(layout.labels / MANIFEST) or {}, with_earlier_rounds(layout, summary))
    gold = (read_json(layout.teacher_gold / MANIFEST) or {}).get("teacher_compute") or {}
    return compute | {"teacher_gold_flops": gold.get("flops")}


def compute_lines(evaluation: dict[str, Any]) -> list[str]:
    """The summary's compute by stage (``not recorded`` for a run written before it was counted)."""
    compute = evaluation.get("compute")
    lines = ["Compute by stage (2·N FLOPs per token forward, 6·N forward+backward):"]
    lines += [f"  {name:<17} {flops:>14}  {share:>6}" for name, flops, share in compute_rows(compute)]
    if isinstance(compute, dict) and compute.get("teacher_gold_flops") is not None:
        lines.append(f"  (the teacher on the gold set, for evaluation: {format_flops(compute['teacher_gold_flops'])})")
    return lines


# --------------------------------------------------------------------------- running


def run_pipeline(
    config: PipelineConfig,
    output: str | Path,
    *,
    serve: bool = False,
    force: str | None = None,
    log: Log = print,
) -> PipelineResult:
    """Run label → train → evaluate → report (→ serve) into ``output``, skipping finished stages."""
    layout = RunLayout(Path(output))
    layout.root.mkdir(parents=True, exist_ok=True)
    plan = plan_stages(config, layout, force=force)
    write_text(layout.config, config.to_yaml())
    result = PipelineResult(run_dir=layout.root)
    if serve or any(action != "skip" for action in plan.values()):
        # A local Ray sized for the trainer's workers plus Ray Data's readers (or the job's cluster).
        from llkd_ray.runtime import ensure_ray

        ensure_ray(config, log_dir=layout.logs)
    tracking = _start_tracking(config, layout)
    with ending(tracking):
        _run_stages(StageRun(config, layout, log, tracking), plan, result)
        if tracking is not None:
            tracking.log_artifacts([layout.config, layout.eval_json, layout.report])
    if tracking is not None:
        log(f"tracking: MLflow run {tracking.run_id} in {tracking.uri}")
    result.eval = read_json(layout.eval_json) or {}
    if serve:  # blocks until interrupted: nothing to record or skip
        log(format_summary(result))
        serve_stage(StageRun(config, layout, log, tracking))
    return result


def _run_stages(run: StageRun, plan: dict[str, str], result: PipelineResult) -> None:
    """Each stage in order: skipped, or run between its ``running`` and ``done`` markers."""
    config, layout, log = run.config, run.layout, run.log
    for stage, action in plan.items():
        digest = stage_hash(config, stage)
        if action == "skip":
            marker = read_marker(layout, stage) or {}
            log(f"{stage}: done earlier with the same config ({digest}), skipped")
            result.stages[stage] = StageRecord(stage, "skipped", float(marker.get("wall_s", 0.0)), digest)
            continue
        if action == "run":
            for path in layout.outputs(stage):
                _remove(path)
        started_at = _now()
        marker = {
            "stage": stage,
            "hash": digest,
            "sections": list(STAGE_SECTIONS[stage]),
            "status": "running",
            "started_at": started_at,
        }
        write_json(layout.marker(stage), marker)
        started = time.perf_counter()
        summary = STAGE_FUNCTIONS[stage](run)
        wall = time.perf_counter() - started
        write_json(
            layout.marker(stage),
            {**marker, "status": "done", "finished_at": _now(), "wall_s": wall, "summary": _jsonable(summary)},
        )
        result.stages[stage] = StageRecord(stage, "resumed" if action == "resume" else "ran", wall, digest)


def _start_tracking(config: PipelineConfig, layout: RunLayout) -> TrackingRun | None:
    """This invocation's MLflow run (``tracking.backend``), named after the run directory, which the
    train stage's workers log their metrics to; ``RUN/tracking.json`` records its id."""
    layout.tracking.unlink(missing_ok=True)
    tracking = start_run(config, layout.root, layout.root.resolve().name, tags={"llkd.command": "run"})
    if tracking is not None:
        write_json(layout.tracking, tracking.to_dict())
    return tracking


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    """A small JSON-safe digest of a stage's summary for its marker (scalars only)."""
    return {k: v for k, v in summary.items() if isinstance(v, str | int | float | bool) or v is None}


# --------------------------------------------------------------------------- the demo


DEMO_CONFIGS = {False: "demo.yaml", True: "quick.yaml"}


def packaged_config(name: str) -> Path:
    """A config shipped inside the package (``llkd_ray/configs/NAME``)."""
    path = resources.files("llkd_ray") / "configs" / name
    if not path.is_file():
        raise LlkdError(f"packaged config {name} is missing from the installation")
    return Path(str(path))


def demo_config(quick: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(packaged_config(DEMO_CONFIGS[quick]), overrides)


def run_demo(
    quick: bool = False,
    output: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    force: str | None = None,
    log: Log = print,
) -> PipelineResult:
    """The offline demo (SST-2, embedding teacher, MiniLM student): run it and print its table."""
    config = demo_config(quick, overrides)
    output = Path(output) if output else Path("runs") / ("demo-quick" if quick else "demo")
    started = time.perf_counter()
    result = run_pipeline(config, output, force=force, log=log)
    log("")
    log(format_summary(result, total_s=time.perf_counter() - started))
    return result


def format_summary(result: PipelineResult, total_s: float | None = None) -> str:
    """The demo's table: teacher and student on the gold set, data usage, wall time per stage."""
    evaluation = result.eval
    rows = [("", "accuracy", "macro-F1")]
    for who in ("teacher", "student"):
        metrics = evaluation.get(who, {})
        rows.append((who, *(f"{metrics.get(key, float('nan')):.3f}" for key in ("accuracy", "macro_f1"))))
    width = max(len(r[0]) for r in rows)
    lines = [f"Gold set: {evaluation.get('gold', '?')} ({evaluation.get('gold_rows', '?')} rows)"]
    lines += [f"  {name:<{width}}  {acc:>8}  {f1:>8}" for name, acc, f1 in rows]
    teacher, student = evaluation.get("teacher", {}), evaluation.get("student", {})
    if "macro_f1" in teacher and "macro_f1" in student:
        delta = student["macro_f1"] - teacher["macro_f1"]
        verdict = "beats its teacher" if delta > 0 else "does not beat its teacher"
        lines.append(f"  the student {verdict}: {delta:+.3f} macro-F1")
    usage = evaluation.get("data_usage")
    if isinstance(usage, dict):
        lines.append(
            f"Data usage: {percent(usage.get('pool_fraction'))} of the labeled pool selected at least once; "
            f"{percent(usage.get('sample_step_fraction'))} of sample-steps back-propagated"
        )
    elif isinstance(usage, int | float):
        lines.append(f"Data usage: {percent(usage)} of the labeled pool")
    lines += compute_lines(evaluation)
    lines += rounds_lines(read_rounds(RunLayout(result.run_dir)))
    lines.append("Wall time per stage:")
    for record in result.stages.values():
        note = " (done earlier, skipped)" if record.status == "skipped" else ""
        lines.append(f"  {record.name:<9} {record.wall_s:8.1f} s{note}")
    if total_s is not None:
        lines.append(f"  {'total':<9} {total_s:8.1f} s")
    lines.append(f"Report: {result.report}")
    logs = RunLayout(result.run_dir).logs
    if logs.is_dir() and not verbose():
        lines.append(f"Ray's logs: {logs}/ (--verbose shows them on the console)")
    return "\n".join(lines)
