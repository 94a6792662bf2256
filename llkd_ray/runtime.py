"""Connecting to Ray: the cluster of a submitted job, or a local one on a laptop or CI."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import ray

from llkd_ray.config import PipelineConfig
from llkd_ray.errors import ConfigError


def init_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None, log_dir: Path | None = None) -> None:
    """Join the job's cluster when there is one (``RAY_ADDRESS``), else start a private local Ray.

    A job submitted with ``ray job submit`` gets ``RAY_ADDRESS`` from Ray; to run a command directly
    on a cluster you started, set ``RAY_ADDRESS=auto``. Without it we never silently join a head
    that ``ray start`` left running (``address="local"``). ``env_vars`` reach every Ray worker
    (e.g. ``VLLM_TARGET_DEVICE`` for vLLM on CPU). ``log_dir`` (``RUN/logs``) takes Ray's own logs
    off the console (:mod:`llkd_ray.console`) unless verbose.
    """
    from llkd_ray.console import attach_ray_logs, prepare_ray_logs, quiet_ray_worker, verbose

    if ray.is_initialized():
        return
    if log_dir is not None:
        prepare_ray_logs(log_dir)
    runtime_env: dict[str, Any] = {"env_vars": env_vars} if env_vars else {}
    address = os.environ.get("RAY_ADDRESS")
    if log_dir is not None and not address and not verbose():
        # A local Ray has no dashboard, hence no State API: see quiet_ray_worker.
        runtime_env["worker_process_setup_hook"] = f"{quiet_ray_worker.__module__}.{quiet_ray_worker.__name__}"
    ray.init(
        address=address or "local",
        num_cpus=None if address else num_cpus,
        runtime_env=runtime_env or None,
        include_dashboard=False if not address else None,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    if log_dir is not None:
        attach_ray_logs(log_dir)


def ensure_ray(config: PipelineConfig, log_dir: Path | None = None) -> None:
    """Start a local Ray with room for the trainer's workers *and* Ray Data's readers, or check the one we have.

    ``log_dir``: where Ray's logs go when this call starts Ray (see :func:`init_ray`)."""
    training = config.training
    needed = training.workers * training.cpus_per_worker
    if not ray.is_initialized():
        local = not os.environ.get("RAY_ADDRESS")
        init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(needed) + 1) if local else None, log_dir=log_dir)
    if os.environ.get("RAY_ADDRESS"):
        return  # a cluster (maybe autoscaling): its scheduler decides
    total = ray.cluster_resources().get("CPU", 0)
    if total - needed < 0.5:
        raise ConfigError(
            f"Ray has {total:g} CPUs and the trainer takes {training.workers} workers x "
            f"{training.cpus_per_worker:g} CPU, leaving none for Ray Data to read the labels; "
            "lower training.cpus_per_worker or training.workers"
        )
