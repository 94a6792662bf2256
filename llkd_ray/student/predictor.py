"""The one way from texts to class probabilities: serving, ``llkd eval``, the trainer's gold set and
the labeling rounds' scoring.

:class:`Predictor` has the shape of a ``transformers`` pipeline — :meth:`~Predictor.preprocess`
tokenises at the model's length limit and flags the texts it cut, :meth:`~Predictor._forward`
runs batches of similar length in inference mode and returns softmax probabilities,
:meth:`~Predictor.postprocess` ranks the labels (top-k) — so every reader of a student truncates,
batches and ranks the same way. Loading and saving the model directory is
:mod:`llkd_ray.student.model`'s; the ONNX Runtime predictor behind the same pipeline is the serving
stage's (:mod:`llkd_ray.serve.backends`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llkd_ray.student.model import length_limit, load_tokenizer, resolve_device, resolve_model_path

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


@dataclass
class Encoded:
    """Tokenised texts, unpadded: the model inputs per text and whether each text was cut."""

    features: dict[str, list[list[int]]]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]


@dataclass
class PassScores:
    """What :meth:`Predictor.scored_passes` returns, rows in text order."""

    probabilities: torch.Tensor
    """The plain pass's softmax probabilities (N, C)."""
    tokens: list[int]
    """Real tokens per text (padding excluded): one pass's cost by the FLOPs rule."""
    embeddings: torch.Tensor | None
    """Pooled last hidden states (N, H), when asked for."""
    sampled: torch.Tensor | None
    """Softmax probabilities of each dropout pass (K, N, C), when asked for."""


class Predictor:
    """A sequence classifier and its tokenizer: texts in, label probabilities and rankings out.

    ``batch_size`` caps the texts of one forward pass (None: no cap, for callers that batch
    already, like the serving replica). The model is used as it is (device, dtype); a model in
    training mode is put back in it after each call.
    """

    #: On CPU, texts are sorted by length and split so that padding wastes at most this fraction
    #: of the tokens (CPU cost grows with padded tokens); on GPU a chunk is only capped by size.
    CPU_PADDING_SLACK = 1.25

    #: Which runtime runs the forward pass (``serving.backend``, ``/v1/model``).
    backend = "torch"
    #: ``tokenizer.pad``'s tensor type for this runtime.
    tensor_type = "pt"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        batch_size: int | None = None,
        config: Any = None,
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.config = config = config if config is not None else model.config
        self.labels: list[str] = [config.id2label[i] for i in range(config.num_labels)]
        self.max_length = length_limit(tokenizer, config, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        """What runs: architecture, labels count, length limit, runtime, device and weight dtype."""
        return {
            "architecture": (self.config.architectures or [type(self.model).__name__])[0],
            "model_type": self.config.model_type,
            "num_labels": len(self.labels),
            "max_length": self.max_length,
            "backend": self.backend,
            "device": self.device.type,
            "dtype": self.dtype,
        }

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "auto",
        half_on_gpu: bool = False,
        max_length: int | None = None,
        batch_size: int | None = None,
        **model_options: Any,
    ) -> Predictor:
        """A torch predictor for a model directory (or ``builtin:``/hub reference); no remote code.

        ``half_on_gpu`` runs a GPU model in bfloat16 (float16 where bf16 is unsupported), as
        serving does; evaluation keeps float32. ``max_length`` can only lower the saved limit.
        ``model_options`` go to ``from_pretrained`` (the exporter asks for eager attention).
        """
        from transformers import AutoModelForSequenceClassification

        from llkd_ray.errors import LlkdError, first_line

        reference, target = resolve_model_path(str(model_dir)), resolve_device(device)
        dtype = torch.float32
        if half_on_gpu and target.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        tokenizer = load_tokenizer(reference, model_dir)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                reference, trust_remote_code=False, dtype=dtype, **model_options
            )
        except OSError as error:
            raise LlkdError(f"cannot load the model {model_dir}: {first_line(error)}") from None
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

    def scored(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Probabilities and the real tokens each text's forward read (padding excluded): what
        scoring a pool costs by the FLOPs rule (``llkd_ray.compute``)."""
        encoded = self.preprocess(texts)
        return self._forward(encoded), encoded.lengths

    def scored_passes(
        self, texts: Sequence[str], *, dropout_passes: int = 0, embed: bool = False, seed: int = 0
    ) -> PassScores:
        """:meth:`scored` plus, on request, each text's pooled embedding (the mean of the last hidden
        states over its tokens) and ``dropout_passes`` more forward passes with dropout on (MC
        dropout: the labeling rounds' epistemic uncertainty). The dropout masks are seeded by
        ``seed`` and the chunk's token ids, so the same texts in the same batch get the same passes."""
        encoded = self.preprocess(texts)
        rows, classes = len(encoded.truncated), len(self.labels)
        probabilities = torch.zeros(rows, classes)
        sampled = torch.zeros(dropout_passes, rows, classes) if dropout_passes else None
        embeddings: torch.Tensor | None = None
        device = self.device
        with self._running():
            for chunk in self._chunks(encoded.lengths):
                batch = self.tokenizer.pad(
                    {k: [v[i] for i in chunk] for k, v in encoded.features.items()}, return_tensors="pt"
                )
                inputs = {k: v.to(device) for k, v in batch.items()}
                output = self.model(**inputs, output_hidden_states=embed)
                probabilities[chunk] = torch.softmax(output.logits.float(), dim=-1).cpu()
                if embed:
                    mask = inputs["attention_mask"].unsqueeze(-1).float()
                    pooled = (output.hidden_states[-1].float() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
                    if embeddings is None:
                        embeddings = torch.zeros(rows, pooled.shape[-1])
                    embeddings[chunk] = pooled.cpu()
                if sampled is not None:
                    sampled[:, chunk] = self._dropout_passes(inputs, dropout_passes, seed)
        return PassScores(probabilities, encoded.lengths, embeddings, sampled)

    def _dropout_passes(self, inputs: dict[str, torch.Tensor], passes: int, seed: int) -> torch.Tensor:
        """``passes`` softmax outputs of one padded batch with the model's dropout on, seeded."""
        key = hashlib.blake2b(inputs["input_ids"].cpu().numpy().tobytes(), digest_size=7, key=str(seed).encode())
        devices = [self.device] if self.device.type == "cuda" else []
        self.model.train()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int.from_bytes(key.digest(), "big"))
                return torch.stack(
                    [torch.softmax(self.model(**inputs).logits.float(), dim=-1).cpu() for _ in range(passes)]
                )
        finally:
            self.model.eval()

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
        with self._running():
            for chunk in self._chunks(encoded.lengths):
                batch = self.tokenizer.pad(
                    {k: [v[i] for i in chunk] for k, v in encoded.features.items()}, return_tensors=self.tensor_type
                )
                probabilities[chunk] = torch.softmax(self._logits(batch).float(), dim=-1).cpu()
        return probabilities

    def _running(self) -> contextlib.AbstractContextManager[Any]:
        return inference(self.model)

    def _logits(self, batch: Any) -> torch.Tensor:
        """The runtime's forward pass over one padded batch."""
        device = self.device
        return self.model(**{k: v.to(device) for k, v in batch.items()}).logits

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
