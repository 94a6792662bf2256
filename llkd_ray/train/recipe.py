"""One Ray Train worker's run: :class:`StudentTrainingRecipe`, in the shape of torchtune's recipe class.

``setup`` builds the model (``load_student``), optimizer (``build_optimizer``), schedule, selector
and candidate stream (``ray.train.get_dataset_shard``) from the config and restores them from
``ray.train.get_checkpoint()`` with ``load_checkpoint``; ``train`` is the loop (a step, the
optimizer step, the step's record in ``metrics.jsonl``, gold-set evaluations along the run, the
reports to Ray Train); ``save_checkpoint`` writes what a restart needs. Callbacks
(:class:`StepCallback`, e.g. :class:`FaultInjection`) run after every step. Ray is imported inside
the methods that talk to Ray Train.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llkd_ray.compute import (
    COMPUTE_SECONDS,
    ComputeMeter,
    ProgressSchedule,
    StepCompute,
    all_pass_flops,
    non_embedding_parameters,
)
from llkd_ray.config import PipelineConfig
from llkd_ray.student.model import load_student, save_classifier
from llkd_ray.student.predictor import Predictor
from llkd_ray.tracking import TrackingRun
from llkd_ray.train.checkpoint import TrainState, read_state, state_payload, write_selected_ids, write_state
from llkd_ray.train.data import Batch, CandidateStream
from llkd_ray.train.optimizer import build_optimizer
from llkd_ray.train.plan import TrainingPlan
from llkd_ray.train.scores import ScoreStore
from llkd_ray.train.selection import Selection, Selector
from llkd_ray.train.step import StepContext, StepResult, fill_step, train_step, unwrap_model
from llkd_ray.train.stopping import STOP_DECAY, ProbeStopper, check, probe_size


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "no":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():  # auto
        return torch.bfloat16
    return None


def _compiles(mode: bool | str, device: torch.device) -> bool:
    """``training.compile``: ``auto`` compiles on CUDA only (measured: docs/training.md, GPU path)."""
    return device.type == "cuda" if mode == "auto" else bool(mode)


def _collectives(world_size: int) -> tuple[Callable[[torch.Tensor], Any] | None, Callable[[Any], list[Any]]]:
    """The all-reduce for the selector and an all-gather of Python objects (identity on 1 worker)."""
    if world_size == 1:
        return None, lambda obj: [obj]
    import torch.distributed as dist

    def all_reduce(tensor: torch.Tensor) -> None:
        # gloo takes the CPU float64 tensor as it is; NCCL needs it on the GPU.
        if dist.get_backend() == "nccl":
            on_device = tensor.cuda()
            dist.all_reduce(on_device)
            tensor.copy_(on_device.cpu())
        else:
            dist.all_reduce(tensor)

    def all_gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out

    return all_reduce, all_gather


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, allow_nan=False) + "\n")


class StepCallback:
    """A hook the recipe calls after every step (after its metrics are written)."""

    def on_step_end(self, recipe: StudentTrainingRecipe) -> None:  # pragma: no cover - interface
        pass


@dataclass(frozen=True)
class FaultInjection(StepCallback):
    """A testing hook: the worker of ``rank`` exits (like a lost process) right after ``step``,
    on the first attempt only — the ``marker`` file it writes records that it did."""

    step: int
    marker: str
    rank: int = 1

    def on_step_end(self, recipe: StudentTrainingRecipe) -> None:
        if recipe.rank == self.rank and recipe.state.step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text(f"worker {recipe.rank} exited after step {recipe.state.step}\n")
            os._exit(1)


class StudentTrainingRecipe:
    """One Ray Train worker's run, in the shape of torchtune's single-device recipe.

    ``setup`` builds the model, optimizer, schedule, selector and candidate stream from the config
    (restoring them with ``load_checkpoint`` when Ray Train hands one back); ``train`` is the loop;
    ``save_checkpoint`` writes what a restart needs. The compute accounting and the budget live in
    ``self.compute`` (a :class:`~llkd_ray.compute.ComputeMeter`, global over workers) and
    :meth:`progress`.
    """

    def __init__(
        self,
        config: PipelineConfig,
        plan: TrainingPlan,
        output: Path,
        student_path: str,
        gold: dict[str, Any] | None = None,
        callbacks: list[StepCallback] | None = None,
        tracking: TrackingRun | None = None,
    ) -> None:
        self.config, self.plan, self.output = config, plan, output
        self.student_path, self.gold = student_path, gold
        self.callbacks = callbacks or []
        self.tracking = tracking
        """Rank 0 logs each record of ``metrics.jsonl`` to this MLflow run too (``tracking.backend``)."""
        self.metrics_path = output / "metrics.jsonl"
        self.label_names = config.task.label_names
        self.state = TrainState()
        self.compute = ComputeMeter()
        self.scores = ScoreStore(plan.score_ttl)
        self.stopper: ProbeStopper | None = None

    @staticmethod
    def from_loop_config(loop_config: dict[str, Any]) -> StudentTrainingRecipe:
        fault = loop_config.get("fault")
        return StudentTrainingRecipe(
            PipelineConfig.model_validate(loop_config["config"]),
            TrainingPlan(**loop_config["plan"]),
            Path(loop_config["output"]),
            loop_config["student_path"],
            loop_config.get("gold"),
            callbacks=[FaultInjection(**fault)] if fault else [],
            tracking=TrackingRun.from_dict(loop_config.get("tracking")),
        )

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        import ray.train
        import ray.train.torch

        training, selection = self.config.training, self.config.selection
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(training.cpus_per_worker)))
        self.all_reduce, self.all_gather = _collectives(self.world)
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)

        if training.stop == "auto":
            probe = probe_size(self.plan.pool_rows, self.world)
            self.stopper = ProbeStopper(
                probe,
                training.stop_checks,
                training.stop_churn,
                training.stop_window,
                STOP_DECAY,
                training.stop_selected,
            )
        checkpoint = ray.train.get_checkpoint()
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as restored:
            source = str(Path(restored) / "student") if restored else self.student_path
            model, self.tokenizer = load_student(source, self.label_names, training.seed)
            self.compute.parameters = non_embedding_parameters(model)
            self.compiled = _compiles(training.compile, self.device)
            if self.compiled:  # in place: parameter names, state_dict and saving are unchanged
                model.compile()
            self.model = ray.train.torch.prepare_model(model)
            self.optimizer = build_optimizer(self.model, training.learning_rate, training.weight_decay)
            self.schedule = ProgressSchedule(self.plan.warmup)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
            self.selector = Selector(
                len(self.label_names),
                strategy=selection.strategy,
                momentum=selection.momentum,
                weighting=selection.weighting,
                seed=training.seed,
                all_reduce=self.all_reduce,
                rank=self.rank,
                world_size=self.world,
            )
            if restored:
                self.load_checkpoint(Path(restored))
            elif self.rank == 0:
                self.metrics_path.unlink(missing_ok=True)
        # One budget unit (a pass of `all` over the pool) in FLOPs, and the budget itself.
        self.unit_flops = (
            all_pass_flops(self.compute.parameters, self.plan.pool_tokens) if self.plan.pool_tokens else None
        )
        self.budget_flops = self.plan.budget * self.unit_flops if self.plan.budget and self.unit_flops else None

        autocast_dtype = _autocast_dtype(training.mixed_precision, self.device)
        self.ctx = StepContext(
            tokenizer=self.tokenizer,
            max_length=self.config.student.max_length,
            device=self.device,
            world_size=self.world,
            soft_loss=selection.loss == "soft",
            autocast_dtype=autocast_dtype,
            scaler=torch.amp.GradScaler(self.device.type) if autocast_dtype == torch.float16 else None,
            pad_to_max_length=self.compiled,
            selector=self.selector,  # the very objects the checkpoint saves and restores in place
            micro_batches=self.plan.accumulation,
            sample_rate=self.plan.sample_rate,
            scores=self.scores,
        )
        self.stream = CandidateStream(
            ray.train.get_dataset_shard("train"),
            self.plan.worker_candidates,
            training.seed + self.rank,
            self.state.batches_consumed,
        )

    def load_checkpoint(self, directory: Path) -> None:
        """Restore the optimizer, schedule, selector, counters and (rank 0) the metrics so far."""
        saved = read_state(directory)
        self.state = TrainState(**saved["state"])
        self.compute = ComputeMeter(**saved["compute"])
        self.selector.load_state_dict(saved["selector"])
        if "scores" in saved:
            self.scores.load_state_dict(saved["scores"])
        if self.stopper is not None and saved.get("stopper"):
            self.stopper.load_state_dict(saved["stopper"])
        if "optimizer" in saved:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        self.state.attempt += 1
        self.state.resumed_from.append(self.state.step)
        if self.rank == 0:  # the metrics as of the checkpoint: steps after it are redone
            shutil.copyfile(directory / "metrics.jsonl", self.metrics_path)
            _write_jsonl(self.metrics_path, {"kind": "resume", "step": self.state.step, "attempt": self.state.attempt})

    # ------------------------------------------------------------------ the budget

    def progress(self) -> float:
        """The fraction of the run done: compute spent over the budget, or steps over the steps."""
        if self.budget_flops:
            return self.compute.flops / self.budget_flops
        return self.state.step / self.plan.total_steps

    def finished(self) -> bool:
        end = self.stopper.end() if self.stopper else 1.0
        return self.progress() >= end - 1e-9 or self.state.step >= self.plan.total_steps

    def _evaluation_due(self) -> bool:
        if not self.gold:
            return False
        if self.plan.eval_points:
            return self.finished() or self.progress() >= self.state.next_eval / self.plan.eval_points - 1e-9
        return self.state.step % self.plan.steps_per_epoch == 0 or self.finished()

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        """Steps until the budget is spent: each one selects and back-propagates (``_step``), takes the
        optimizer step, is accounted over the workers and recorded; evaluations, callbacks and the
        reports to Ray Train (with a checkpoint every ``checkpoint_every`` steps) follow."""
        state, training = self.state, self.config.training
        self.model.train()
        started = time.perf_counter() - state.train_seconds
        while not self.finished():
            result = self._step()
            clock = time.perf_counter()
            self._optimizer_step(result.selection.selected > 0)
            result.compute.training_s += time.perf_counter() - clock
            step = self._account(result)
            state.train_seconds = time.perf_counter() - started
            if self.rank == 0:
                self._record(self._step_record(result.selection, step))

            if self._evaluation_due():
                self.evaluate()
                started = time.perf_counter() - state.train_seconds  # evaluation is not training time
            if self.stopper is not None and self.stopper.due(self.progress()):
                self._stop_check()
            for callback in self.callbacks:
                callback.on_step_end(self)
            if self.finished():
                break
            if state.step % training.checkpoint_every == 0:
                self._report(with_checkpoint=True)
            elif state.step % training.report_every == 0:
                self._report()
        self._report(final=True)

    def _stop_check(self) -> None:
        """``stop: auto``: one churn check on the probe; once the stop is called, the schedule's decay."""
        predictor = Predictor(unwrap_model(self.model), self.tokenizer, max_length=self.ctx.max_length, batch_size=64)
        counts = (self.state.candidates_seen, self.state.rows_selected)
        record, tokens = check(self.stopper, predictor.predict_indices, self.progress(), self.all_gather, counts)
        self.model.train()
        self.compute.probe_tokens += tokens
        record |= {
            "step": self.state.step,
            "all_passes": self.compute.flops / self.unit_flops if self.unit_flops else None,
        }
        self.state.stop.setdefault("checks", []).append(record)
        if self.stopper.stopped_at is not None:
            self.schedule.stop(self.stopper.stopped_at, self.stopper.end())
            self.state.stop |= {"stopped_at": self.stopper.stopped_at, "all_passes_at_stop": record["all_passes"]}
        if self.rank == 0:
            _write_jsonl(self.metrics_path, record)

    def _step(self) -> StepResult:
        """This worker's part of one optimizer step, up to the gradients: adaptive M or one draw."""
        plan = self.plan
        end = self.stopper.end() if self.stopper else 1.0
        self.selector.annealing = plan.anneal > 0 and self.progress() >= end - plan.anneal - 1e-9
        scoring = "none" if self.selector.annealing else plan.scoring
        if plan.fill:
            return fill_step(
                self.model,
                self._draw,
                self.ctx,
                capacity=plan.worker_rows,
                target=plan.batch_size,
                max_draws=plan.candidates_per_step,
                scoring=scoring,
            )
        return train_step(
            self.model, self._draw(), self.ctx, capacity=plan.worker_rows if plan.scored else None, scoring=scoring
        )

    def _account(self, result: StepResult) -> StepCompute:
        """Gather the step over the workers into the counters, the compute meter and the schedule;
        return the step's global compute."""
        state = self.state
        clock = time.perf_counter()
        shares = (result.selected_ids, result.loss, asdict(result.compute), self.scores.take_pending())
        gathered = self.all_gather(shares)
        if self.scores.enabled:  # every worker keeps every worker's new scores (docs: train/scores.py)
            self.scores.commit([entry for share in gathered for entry in share[3]])
        step = StepCompute.total([StepCompute(**share[2]) for share in gathered])
        step.selection_s += time.perf_counter() - clock  # gathering the ids is selection's bookkeeping
        self.compute.add(step)
        state.step += 1
        state.candidates_seen += result.selection.candidates
        state.rows_selected += result.selection.selected
        state.last_loss = sum(share[1] for share in gathered)
        if self.rank == 0:
            for ids, *_ in gathered:
                for row_id in ids:
                    state.selected_counts[row_id] = state.selected_counts.get(row_id, 0) + 1
        self.schedule.progress = self.progress()
        with warnings.catch_warnings():  # a step that selected nothing skips optimizer.step()
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return step

    def _draw(self) -> Batch:
        self.state.batches_consumed += 1
        batch = self.stream.next()
        if self.stopper is not None:
            self.stopper.collect(batch.texts, self.tokenizer, self.ctx.max_length)
        return batch

    def _optimizer_step(self, any_selected: bool) -> None:
        if any_selected:
            if self.ctx.scaler is not None:
                self.ctx.scaler.step(self.optimizer)
                self.ctx.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _step_record(self, selection: Selection, step: StepCompute) -> dict[str, Any]:
        state, names = self.state, self.label_names
        return {
            "step": state.step,
            "epoch": state.step / self.plan.steps_per_epoch,
            "progress": self.progress(),
            "loss": _finite(state.last_loss),
            "lr": self.scheduler.get_last_lr()[0],
            "selected_fraction": selection.selected_fraction,
            "selected": selection.selected,
            "candidates": selection.candidates,
            "teacher_thresholds": dict(zip(names, selection.teacher_thresholds.tolist(), strict=True)),
            "student_thresholds": dict(zip(names, selection.student_thresholds.tolist(), strict=True)),
            "teacher_level": float(self.selector.teacher_level),
            "student_level": float(self.selector.student_level),
            "confidence_selected": _finite(selection.confidence_selected),
            "confidence_rejected": _finite(selection.confidence_rejected),
            "data_usage": state.data_usage(self.plan.pool_rows),
            "step_compute": asdict(step),
            "compute": self.compute.record(self.unit_flops),
            "elapsed_s": round(state.train_seconds, 3),
            "samples_per_s": state.candidates_seen / state.train_seconds if state.train_seconds else None,
            "attempt": state.attempt,
            "annealing": self.selector.annealing,
        }

    def evaluate(self) -> None:
        """Every worker predicts its share of the gold set; rank 0 records the metrics on the curve."""
        from llkd_ray.metrics import classification_metrics

        gold, state = self.gold or {}, self.state
        texts = gold["texts"][self.rank :: self.world]
        predictor = Predictor(unwrap_model(self.model), self.tokenizer, max_length=self.ctx.max_length, batch_size=64)
        predicted = predictor.predict_indices(texts)
        self.model.train()
        if self.plan.eval_points:
            state.next_eval = math.floor(self.progress() * self.plan.eval_points + 1e-9) + 1
        shares = self.all_gather(predicted)
        if self.rank != 0:
            return
        merged = [0] * len(gold["texts"])
        for r, share in enumerate(shares):
            merged[r :: self.world] = share
        metrics = classification_metrics(gold["labels"], [self.label_names[i] for i in merged], self.label_names)
        record = {
            "kind": "eval",
            "step": state.step,
            "epoch": state.step / self.plan.steps_per_epoch,
            "progress": self.progress(),
            "flops": self.compute.flops,
            "all_passes": self.compute.flops / self.unit_flops if self.unit_flops else None,
            "elapsed_s": round(state.train_seconds, 3),
            **{kind: round(getattr(self.compute, kind), 3) for kind in COMPUTE_SECONDS},
            "data_usage": state.data_usage(self.plan.pool_rows)["pool_fraction"],
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "per_class_f1": {name: metrics["per_class"][name]["f1"] for name in self.label_names},
        }
        state.curve.append(record | {"n": metrics["n"]})
        self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        """Rank 0: a record of ``metrics.jsonl`` (a step or an evaluation), and to MLflow when tracked."""
        _write_jsonl(self.metrics_path, record)
        if self.tracking is not None:
            self.tracking.log_record(record)

    # ------------------------------------------------------------------ checkpoints

    def _report(self, final: bool = False, with_checkpoint: bool = False) -> None:
        """``ray.train.report`` on every worker (it is a barrier); rank 0 attaches the checkpoint."""
        import ray.train

        metrics = {
            "step": self.state.step,
            "loss": self.state.last_loss,
            "pool_fraction": self.state.data_usage(self.plan.pool_rows)["pool_fraction"],
            "progress": self.progress(),
        }
        if not (with_checkpoint or final):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                self.save_checkpoint(Path(tmp), final)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None)

    def save_checkpoint(self, directory: Path, final: bool = False) -> None:
        """The student, the training state and the metrics so far; the selections when ``final``."""
        # The training length goes with the student, so serving and pipelines truncate as training did.
        save_classifier(unwrap_model(self.model), self.tokenizer, directory / "student", self.ctx.max_length)
        optimizer, scheduler = (None, None) if final else (self.optimizer.state_dict(), self.scheduler.state_dict())
        payload = state_payload(self.state, self.compute, self.selector.state_dict(), optimizer, scheduler)
        payload["scores"] = self.scores.state_dict()
        payload["stopper"] = self.stopper.state_dict() if self.stopper else None
        write_state(directory, payload)
        if self.metrics_path.is_file():
            shutil.copyfile(self.metrics_path, directory / "metrics.jsonl")
        if final:
            write_selected_ids(directory, self.state.selected_counts)
