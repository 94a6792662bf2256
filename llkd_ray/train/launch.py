"""The driver: ``train_student`` checks the labels, plans the run, launches Ray Train and writes the results.

It builds the Ray Dataset (lazily, from the Parquet parts), the ``TorchTrainer`` (``ScalingConfig``,
``RunConfig`` with ``FailureConfig`` and ``CheckpointConfig``) whose workers run
``train_loop_per_worker`` (a :class:`~llkd_ray.train.recipe.StudentTrainingRecipe` each), runs it,
and writes ``OUTPUT/student/``, ``OUTPUT/metrics.jsonl``, ``OUTPUT/selected_ids.parquet`` and
``OUTPUT/training_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llkd_ray.artifacts import TRAINING_SUMMARY
from llkd_ray.compute import ComputeMeter, all_pass_flops, format_flops
from llkd_ray.config import PipelineConfig
from llkd_ray.console import Progress, quiet_train_worker, train_logging_config, verbose
from llkd_ray.tracking import TrackingRun, ending, start_run
from llkd_ray.train.checkpoint import SELECTED_IDS, TrainState, read_state
from llkd_ray.train.data import LabeledPool, build_dataset, estimate_pool_tokens, validate_labels_dir
from llkd_ray.train.plan import TrainingPlan
from llkd_ray.train.recipe import FaultInjection, StudentTrainingRecipe

logger = logging.getLogger(__name__)

#: Placeholder for "evaluate on ``config.data.gold``" in :func:`train_student`.
CONFIG_GOLD = "config"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: build the recipe and run it."""
    if loop_config.get("quiet_logs"):
        quiet_train_worker()
    recipe = StudentTrainingRecipe.from_loop_config(loop_config)
    recipe.setup()
    recipe.train()


def _gold_payload(config: PipelineConfig, eval_data: str | None) -> dict[str, Any] | None:
    reference = config.data.gold if eval_data == CONFIG_GOLD else eval_data
    if not reference:
        return None
    from llkd_ray.corpus import read_gold

    frame = read_gold(reference, config.task.label_names)
    return {
        "reference": reference,
        "texts": [str(t) for t in frame["text"]],
        "labels": [str(label) for label in frame["label"]],
        "label_names": config.task.label_names,
    }


def format_training(summary: dict[str, Any]) -> str:
    """The training stage's result lines, from its ``training_summary.json``."""
    usage, compute = summary["data_usage"], summary["compute"]
    passes = f" = {compute['all_passes']:.2f} passes of `all`" if compute.get("all_passes") is not None else ""
    scoring = compute["scoring_flops"] / compute["flops"] if compute["flops"] else 0.0
    line = (
        f"trained {summary['strategy']} student: {summary['steps']} steps on {summary['workers']} workers, "
        f"{usage['pool_fraction']:.1%} of the pool selected at least once, "
        f"{summary['samples_per_s']:.1f} samples/s -> {summary['student']}\n"
        f"compute: {format_flops(compute['flops'])}{passes} ({scoring:.0%} scoring, {1 - scoring:.0%} training); "
        f"time {summary['scoring_s']:.0f} s scoring, {summary['training_s']:.0f} s training, "
        f"{summary['selection_s']:.1f} s selection"
    )
    final = summary.get("final_metrics")
    if final:
        line += f"\ngold {summary['gold']}: accuracy {final['accuracy']:.4f}, macro-F1 {final['macro_f1']:.4f}"
    return line


def train_student(
    config: PipelineConfig,
    labels: str | Path,
    output: str | Path,
    *,
    eval_data: str | None = CONFIG_GOLD,
    fault_injection: FaultInjection | None = None,
    tracking: TrackingRun | None = None,
    track_student: bool = True,
) -> dict[str, Any]:
    """Train a student on the labels in ``labels`` as ``config`` says; write it and its records to ``output``.

    The config is taken as it is: a caller with options of its own (``llkd train --workers``)
    applies them to the config first. ``eval_data`` is the gold set evaluated during training:
    the config's ``data.gold`` by default, another reference, or None. Returns the training summary
    (also written to ``output/training_summary.json``). With ``tracking.backend: mlflow`` the run is tracked in
    ``tracking`` (the caller's MLflow run, which it ends) or in a run of its own, ended here; the
    summary, ``metrics.jsonl`` and (``track_student``) the student are logged as artifacts.
    """
    from transformers import AutoTokenizer

    from llkd_ray.runtime import ensure_ray
    from llkd_ray.student.model import resolve_model_path

    wall_started = time.perf_counter()
    pool = validate_labels_dir(labels, config.task.label_names)
    student_path = resolve_model_path(config.student.model)
    pool_tokens = estimate_pool_tokens(pool, AutoTokenizer.from_pretrained(student_path), config.student.max_length)
    plan = TrainingPlan.build(config, pool.rows, pool_tokens)
    output = Path(output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)

    ensure_ray(config, log_dir=output / "logs")
    gold = _gold_payload(config, eval_data)
    own_run = None if tracking is not None else start_run(config, output, f"train-{config.selection.strategy}")
    tracking = tracking or own_run
    with ending(own_run):
        state, compute = _fit(config, plan, pool, output, student_path, gold, fault_injection, tracking)
        summary = _training_summary(config, plan, pool, pool_tokens, state, compute)
        summary["labels"], summary["student"] = str(labels), str(output / "student")
        summary["gold"] = gold["reference"] if gold else None
        summary["wall_time_s"] = round(time.perf_counter() - wall_started, 3)
        (output / TRAINING_SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        if tracking is not None:
            tracked = [output / TRAINING_SUMMARY, output / "metrics.jsonl", output / SELECTED_IDS]
            tracking.log_artifacts([*tracked, *([output / "student"] if track_student else [])])
    return summary


def _fit(
    config: PipelineConfig,
    plan: TrainingPlan,
    pool: LabeledPool,
    output: Path,
    student_path: str,
    gold: dict[str, Any] | None,
    fault_injection: FaultInjection | None,
    tracking: TrackingRun | None = None,
) -> tuple[TrainState, ComputeMeter]:
    """Run the Ray Train job; copy the final student and records into ``output``; return its state."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    training = config.training
    dataset = build_dataset(pool, plan, training.seed, student_path, config.student.max_length)
    # The tokenising map's tasks finish in any order; without preserve_order a worker's rows would
    # too, so one seed would not give one run, and a restored worker's skip (a count of batches)
    # would not skip the rows it had consumed.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    storage = training.storage_path or str(output / "ray")
    run_name = f"llkd-train-{config.selection.strategy}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "plan": asdict(plan),
            "output": str(output),
            "student_path": student_path,
            "gold": gold,
            "fault": asdict(fault_injection) if fault_injection else None,
            "tracking": tracking.to_dict() if tracking else None,
            "quiet_logs": not verbose(),
        },
        scaling_config=ScalingConfig(
            num_workers=training.workers,
            use_gpu=training.use_gpu,
            resources_per_worker={"CPU": training.cpus_per_worker} | ({"GPU": 1} if training.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=train_logging_config(),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )
    with _metrics_progress(output / "metrics.jsonl", plan):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a final checkpoint")

    with result.checkpoint.as_directory() as final:
        final = Path(final)
        student_dir = output / "student"
        shutil.rmtree(student_dir, ignore_errors=True)
        shutil.copytree(final / "student", student_dir)
        for name in ("metrics.jsonl", SELECTED_IDS):
            if (final / name).is_file():
                shutil.copyfile(final / name, output / name)
        saved = read_state(final)
    if training.storage_path is None:  # the checkpoints served their purpose
        shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(storage).rmdir()
    return TrainState(**saved["state"]), ComputeMeter(**saved["compute"])


@contextlib.contextmanager
def _metrics_progress(path: Path, plan: TrainingPlan, poll_s: float = 1.0) -> Iterator[Progress]:
    """The train stage's progress bar, fed from the ``progress`` of the records rank 0 appends to
    ``metrics.jsonl`` (the driver reads the file; on a cluster without a shared ``output`` the bar
    stays put). Steps of the step budget, or percent of the compute budget."""
    total, unit = (100, "% of budget") if plan.budget else (plan.total_steps, "steps")
    stop = threading.Event()
    path.unlink(missing_ok=True)  # a previous run's records are not this run's progress

    def follow(progress: Progress) -> None:
        offset = 0
        while not stop.wait(poll_s):
            with contextlib.suppress(OSError):
                with path.open("rb") as handle:
                    if path.stat().st_size < offset:  # rewritten from a checkpoint's copy on a resume
                        offset = 0
                    handle.seek(offset)
                    chunk = handle.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                offset += len(complete)
                done = [json.loads(line).get("progress") for line in complete.splitlines() if line.strip()]
                done = [d for d in done if d is not None]
                if done:
                    progress.update(round(max(done) * total, 2))

    with Progress("train", total, unit) as progress:
        watcher = threading.Thread(target=follow, args=(progress,), name="llkd-train-progress", daemon=True)
        watcher.start()
        try:
            yield progress
        finally:
            stop.set()
            watcher.join()


def _training_summary(
    config: PipelineConfig,
    plan: TrainingPlan,
    pool: LabeledPool,
    pool_tokens: int,
    state: TrainState,
    compute: ComputeMeter,
) -> dict[str, Any]:
    """What ``training_summary.json`` records of a finished run; the caller adds the paths, the
    gold set and the wall time, which it alone knows."""
    training = config.training
    unit = all_pass_flops(compute.parameters, pool_tokens) if pool_tokens else None
    spent = compute.flops / (unit * plan.budget) if unit and plan.budget else None
    if plan.budget and spent is not None and spent < 1.0 - 1e-9:
        logger.warning(
            "training stopped at its step cap (%d steps) with %.0f%% of the budget spent", state.step, 100 * spent
        )
    seconds = state.train_seconds
    return {
        "strategy": config.selection.strategy,
        "config_hash": config.section_hash("task", "selection", "student", "training"),
        "student_model": config.student.model,
        "workers": training.workers,
        "batch_size": training.batch_size,
        "candidates_per_step": plan.candidates_per_step,
        "steps": state.step,
        "epochs": state.step / plan.steps_per_epoch,
        "budget": plan.budget,
        "budget_spent": spent,
        "pool_rows": pool.rows,
        "pool_tokens": pool_tokens,
        "student_parameters": compute.parameters,
        "all_pass_flops": unit,
        "compute": compute.record(unit),
        "data_usage": state.data_usage(pool.rows),
        "final_loss": state.last_loss,
        "final_metrics": state.last_eval,
        "curve": state.curve,
        "stop": state.stop or None,
        "attempts": state.attempt + 1,
        "resumed_from_steps": state.resumed_from,
        "train_loop_s": round(seconds, 3),
        "scoring_s": round(compute.scoring_s, 3),
        "training_s": round(compute.training_s, 3),
        "selection_s": round(compute.selection_s, 3),
        "selection_share": compute.selection_s / seconds if seconds else None,
        "samples_per_s": state.candidates_seen / seconds if seconds else None,
        "trained_samples_per_s": compute.trained_samples / seconds if seconds else None,
    }
