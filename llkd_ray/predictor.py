"""The one way from texts to class probabilities: serving, ``llkd eval`` and the trainer's gold set.

:class:`Predictor` has the shape of a ``transformers`` pipeline — :meth:`~Predictor.preprocess`
tokenises at the model's length limit and flags the texts it cut, :meth:`~Predictor._forward`
runs batches of similar length in inference mode and returns softmax probabilities,
:meth:`~Predictor.postprocess` ranks the labels (top-k) — so every reader of a student truncates,
batches and ranks the same way.

The length limit is the one the student trained at. :func:`save_classifier` (what training
saves the student with) records it in the model directory — as the tokenizer's
``model_max_length``, which ``transformers.pipeline(..., truncation=True)`` honours, and as
``llkd_max_length`` in ``config.json`` — and :func:`length_limit` reads it back, so ``llkd serve``,
``llkd eval`` and a plain pipeline all cut a long text where training did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: ``config.json`` field holding the token length the student was trained at.
MAX_LENGTH_FIELD = "llkd_max_length"
#: Hugging Face writes a huge integer for "no limit"; anything above this is not a limit.
_NO_LIMIT = 1_000_000
#: The limit of a model that declares none (BERT's position embeddings).
_DEFAULT_LIMIT = 512
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def length_limit(tokenizer: Any, config: Any, cap: int | None = None) -> int:
    """The token limit of a model: the least of the tokenizer's, the position embeddings', the
    recorded training length and ``cap`` (limits Hugging Face marks as "none" are ignored)."""
    limits = (
        getattr(tokenizer, "model_max_length", None),
        getattr(config, "max_position_embeddings", None),
        getattr(config, MAX_LENGTH_FIELD, None),
        cap,
    )
    return min((n for n in limits if isinstance(n, int) and 0 < n < _NO_LIMIT), default=_DEFAULT_LIMIT)


def save_classifier(model: torch.nn.Module, tokenizer: Any, directory: str | Path, max_length: int) -> int:
    """Save a classifier and its tokenizer with the training length recorded; returns that length.

    Without it the tokenizer keeps the base model's limit (512) and every reader that trusts the
    directory — ``transformers.pipeline``, ``llkd serve`` — truncates differently from training.
    """
    limit = length_limit(tokenizer, model.config, max_length)
    setattr(model.config, MAX_LENGTH_FIELD, limit)
    model.save_pretrained(directory)
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = limit
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.model_max_length = previous  # the caller's tokenizer is left as it was
    return limit


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and ``torch.inference_mode`` for a block; a training model goes back to training."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the GPU when there is one; ``cuda`` without a GPU is an error, not a CPU run."""
    if isinstance(device, torch.device):
        return device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no GPU is visible here")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Encoded:
    """Tokenised texts, unpadded: the model inputs per text and whether each text was cut."""

    features: dict[str, list[list[int]]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]


class Predictor:
    """A sequence classifier and its tokenizer: texts in, label probabilities and rankings out.

    ``batch_size`` caps the texts of one forward pass (None: no cap, for callers that batch
    already, like the serving replica). The model is used as it is (device, dtype); a model in
    training mode is put back in it after each call.
    """

    #: On CPU, texts are sorted by length and split so that padding wastes at most this fraction
    #: of the tokens (CPU cost grows with padded tokens); on GPU a chunk is only capped by size.
    CPU_PADDING_SLACK = 1.25

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, *, max_length: int | None = None, batch_size: int | None = None
    ) -> None:
        config = model.config
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.labels: list[str] = [config.id2label[i] for i in range(config.num_labels)]
        self.max_length = length_limit(tokenizer, config, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "auto",
        half_on_gpu: bool = False,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> Predictor:
        """A predictor for a model directory (or ``builtin:``/hub reference); no remote code.

        ``half_on_gpu`` runs a GPU model in bfloat16 (float16 where bf16 is unsupported), as
        serving does; evaluation keeps float32. ``max_length`` can only lower the saved limit.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        from llkd_ray.errors import LlkdError
        from llkd_ray.models import resolve_model_path

        transformers_logging.disable_progress_bar()
        reference, target = resolve_model_path(str(model_dir)), resolve_device(device)
        dtype = torch.float32
        if half_on_gpu and target.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            tokenizer = AutoTokenizer.from_pretrained(reference, trust_remote_code=False)
            model = AutoModelForSequenceClassification.from_pretrained(reference, trust_remote_code=False, dtype=dtype)
        except OSError as error:
            raise LlkdError(f"cannot load the model {model_dir}: {str(error).splitlines()[0]}") from None
        return cls(model.to(target).eval(), tokenizer, max_length=max_length, batch_size=batch_size)

    # ------------------------------------------------------------------ the pipeline

    def __call__(self, texts: Sequence[str], *, top_k: int | None = None) -> list[dict[str, Any]]:
        """One prediction per text, in order: ``{"label", "score", "scores", "truncated"}``."""
        probabilities, truncated = self.probabilities(texts)
        return self.postprocess(probabilities, truncated, top_k=top_k)

    def probabilities(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """Softmax probabilities (rows in text order, columns in label order) and truncation flags."""
        encoded = self.preprocess(texts)
        return self._forward(encoded), encoded.truncated

    def predict_indices(self, texts: Sequence[str]) -> list[int]:
        """The most probable class index per text."""
        return self.probabilities(texts)[0].argmax(dim=-1).tolist()

    def preprocess(self, texts: Sequence[str]) -> Encoded:
        """Tokenise at :attr:`max_length` (no padding yet) and flag the texts that were cut."""
        texts = list(texts)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        if encoded.encodings is not None:
            truncated = [bool(e.overflowing) for e in encoded.encodings]
        else:  # a slow tokenizer: count the tokens without truncation
            full = self.tokenizer(texts, truncation=False)["input_ids"]
            truncated = [len(ids) > self.max_length for ids in full]
        return Encoded({k: v for k, v in encoded.items() if k in _MODEL_INPUTS}, truncated)

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        """Text indices by ascending length, in chunks of at most ``batch_size`` (and, on CPU, of
        bounded padding)."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        cap = self.batch_size or len(order) or 1
        slack = self.CPU_PADDING_SLACK if self.device.type == "cpu" else float("inf")
        chunks: list[list[int]] = []
        current: list[int] = []
        tokens = 0
        for index in order:  # ascending length: the newest text is the longest of its chunk
            length = lengths[index]
            if current and (len(current) == cap or (len(current) + 1) * length > slack * (tokens + length)):
                chunks.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += length
        return [*chunks, current] if current else chunks

    def _forward(self, encoded: Encoded) -> torch.Tensor:
        """Probabilities for every text (float32 on the CPU), one forward pass per chunk."""
        probabilities = torch.zeros(len(encoded.truncated), len(self.labels))
        device = self.device
        with inference(self.model):
            for chunk in self._chunks(encoded.lengths):
                batch = self.tokenizer.pad(
                    {k: [v[i] for i in chunk] for k, v in encoded.features.items()}, return_tensors="pt"
                )
                logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits
                probabilities[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
        return probabilities

    def postprocess(
        self, probabilities: torch.Tensor, truncated: Sequence[bool], *, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """Per text: the most probable label and its probability, the ``top_k`` most probable
        labels with theirs (every label by default; more than there are keeps them all), and
        whether the text was cut."""
        k = min(top_k or len(self.labels), len(self.labels))
        predictions = []
        for row, cut in zip(probabilities.tolist(), truncated, strict=True):
            ranked = sorted(zip(self.labels, row, strict=True), key=lambda pair: -pair[1])
            predictions.append(
                {"label": ranked[0][0], "score": ranked[0][1], "scores": dict(ranked[:k]), "truncated": bool(cut)}
            )
        return predictions
