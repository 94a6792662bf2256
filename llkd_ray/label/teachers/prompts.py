"""LLM prompts: rendered and tokenized here, by :class:`PromptEncoder`, for both LLM backends.

So ``hf`` and ``vllm`` see identical token ids (and agree to float precision). Texts whose prompt
would not fit the teacher's context are truncated (the text, never the instruction or the answer
cue) and flagged. :func:`encode_prompts` is the same encoder as a Ray Data task, for vLLM.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from llkd_ray.config import TaskConfig
from llkd_ray.errors import ConfigError, LlkdError

#: Tokens an LLM prompt keeps free for the answer (vLLM generates one token).
ANSWER_TOKENS = 1

#: Below this many tokens left for the text, a prompt template is rejected as too long.
MIN_TEXT_TOKENS = 8


def label_list(task: TaskConfig) -> str:
    """The label lines of the prompt: each label's answer word and its description."""
    return "\n".join(f"- {label.answer}: {label.description}" for label in task.labels)


def render_prompt(task: TaskConfig, template: str, text: str) -> str:
    return template.format(instruction=task.instruction, label_list=label_list(task), text=text, task=task.name)


class PromptEncoder:
    """Renders the prompt for a text (with the chat template when the tokenizer has one) and
    tokenizes it, truncating the text so that the prompt plus ``reserve`` tokens fit ``max_len``."""

    def __init__(self, tokenizer: Any, task: TaskConfig, template: str, max_len: int, reserve: int = ANSWER_TOKENS):
        self.tokenizer = tokenizer
        self.task = task
        self.template = template
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.budget = max_len - reserve
        overhead = len(self._ids(""))
        if self.budget - overhead < MIN_TEXT_TOKENS:
            raise ConfigError(
                f"the teacher prompt without any text already takes {overhead} tokens, leaving "
                f"{self.budget - overhead} of max_model_len {max_len} for the text; raise max_model_len "
                "or shorten teacher.prompt_template"
            )

    def render(self, text: str) -> str:
        prompt = render_prompt(self.task, self.template, text)
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def _ids(self, text: str) -> list[int]:
        return self._tokenize([self.render(text)])[0]

    def _tokenize(self, rendered: list[str]) -> list[list[int]]:
        # A chat template already wrote the special tokens into the string.
        return self.tokenizer(rendered, add_special_tokens=not self.chat)["input_ids"]

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text's prompt and whether the text had to be truncated."""
        ids = self._tokenize([self.render(t) for t in texts])
        truncated = [False] * len(ids)
        for position, prompt_ids in enumerate(ids):
            if len(prompt_ids) > self.budget:
                ids[position] = self._truncate(texts[position], len(prompt_ids))
                truncated[position] = True
        return ids, truncated

    def _truncate(self, text: str, length: int) -> list[int]:
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - (length - self.budget)
        for _ in range(8):  # decoding and re-tokenizing can move a boundary by a token or two
            keep = max(keep, 0)
            ids = self._ids(self.tokenizer.decode(text_ids[:keep]))
            if len(ids) <= self.budget:
                return ids
            keep -= len(ids) - self.budget
        return ids[-self.budget :]  # unreachable in practice: the empty text fits (checked at init)


def answer_continuations(encoder: PromptEncoder) -> list[list[int]]:
    """Each label's answer as the token ids that continue the prompt.

    Without a chat template the answer follows the cue after a space (``Label: positive``); with
    one, the assistant turn starts with the answer itself.
    """
    tokenizer = encoder.tokenizer
    probe = encoder.render("an example text")
    base = encoder._tokenize([probe])[0]
    separator = "" if encoder.chat or probe[-1:].isspace() else " "
    continuations = []
    for label in encoder.task.labels:
        full = encoder._tokenize([probe + separator + label.answer])[0]
        if full[: len(base)] == base and len(full) > len(base):
            continuations.append(full[len(base) :])
        else:
            continuations.append(tokenizer(separator + label.answer, add_special_tokens=False)["input_ids"])
        if not continuations[-1]:
            raise ConfigError(f"label {label.name!r}: its answer {label.answer!r} tokenizes to nothing")
    return continuations


def check_first_tokens(task: TaskConfig, continuations: list[list[int]], tokenizer: Any, model: str) -> None:
    """Labels must start with distinct tokens to be scored from one next-token distribution."""
    seen: dict[int, str] = {}
    for label, tokens in zip(task.labels, continuations, strict=True):
        first = tokens[0]
        if first in seen:
            piece = tokenizer.convert_ids_to_tokens(first)
            raise ConfigError(
                f"labels {seen[first]!r} and {label.name!r} start with the same token {piece!r} in the tokenizer "
                f"of {model}, so one next-token distribution cannot tell them apart; give them verbalizers "
                "that start differently (task.labels[].verbalizer) or set teacher.scoring: sequence "
                "(hf backend)"
            )
        seen[first] = label.name


def forward_tokens(prompt_lengths: Sequence[int], continuations: list[list[int]], scoring: str) -> np.ndarray:
    """Real tokens an LLM teacher's forward reads per prompt (what labeling costs): the prompt, or
    with ``scoring: sequence`` K sequences of the prompt and one label's answer. Padding excluded."""
    lengths = np.asarray(prompt_lengths, dtype=np.int64)
    if scoring != "sequence":
        return lengths
    return len(continuations) * lengths + sum(map(len, continuations))


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as error:  # any loading failure is about the user's model reference
        raise LlkdError(f"cannot load the tokenizer of teacher model {model_path}: {error}") from None


# --------------------------------------------------------------------------- for vLLM: a Ray Data task


@functools.lru_cache(maxsize=4)
def _cached_encoder(model_path: str, task_json: str, template: str, max_len: int) -> PromptEncoder:
    task = TaskConfig.model_validate_json(task_json)
    return PromptEncoder(load_tokenizer(model_path), task, template, max_len)


def encode_prompts(
    batch: pd.DataFrame, *, model_path: str, task_json: str, template: str, max_len: int
) -> pd.DataFrame:
    """Ray Data task: tokenized prompts for vLLM (the tokenizer is loaded once per worker process)."""
    encoder = _cached_encoder(model_path, task_json, template, max_len)
    ids, truncated = encoder.encode(batch["text"].tolist())
    out = batch.copy()
    out["tokenized_prompt"] = ids
    out["truncated"] = truncated
    out["teacher_tokens"] = [len(prompt) for prompt in ids]  # what the engine reads: labeling's cost
    return out
