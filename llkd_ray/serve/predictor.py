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

Two runtimes sit behind the same preprocess and postprocess: torch (:class:`Predictor`, a
``transformers`` model directory) and ONNX Runtime (:class:`OnnxPredictor`, a directory written
by ``llkd export``; see :mod:`llkd_ray.serve.export`). :func:`load_predictor` picks one from the
directory, or as asked.
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
#: The graph ``llkd export`` writes, and the weight files a torch model directory holds.
ONNX_FILE = "model.onnx"
#: Written by ``llkd export`` next to the graph: format, quantization, source, accuracy check.
EXPORT_INFO = "llkd_export.json"
TORCH_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
BACKENDS = ("torch", "onnx")


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
    save_tokenizer(tokenizer, directory, limit)
    return limit


def save_tokenizer(tokenizer: Any, directory: str | Path, limit: int) -> None:
    """Save ``tokenizer`` with ``model_max_length`` = ``limit`` (the caller's object is left as it was)."""
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = limit
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.model_max_length = previous


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
        from llkd_ray.models import resolve_model_path

        reference, target = resolve_model_path(str(model_dir)), resolve_device(device)
        dtype = torch.float32
        if half_on_gpu and target.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        tokenizer = _load_tokenizer(reference, model_dir)
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


def _load_tokenizer(reference: str, model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from llkd_ray.errors import LlkdError, first_line

    transformers_logging.disable_progress_bar()
    try:
        return AutoTokenizer.from_pretrained(reference, trust_remote_code=False)
    except OSError as error:
        raise LlkdError(f"cannot load the tokenizer of {model_dir}: {first_line(error)}") from None


class OnnxPredictor(Predictor):
    """The same pipeline on ONNX Runtime's CPU provider: the graph ``llkd export`` wrote, fp32 or int8.

    ``session`` is an ``onnxruntime.InferenceSession``, ``config`` the directory's ``config.json``
    (labels, length limit) and ``export_info`` its ``llkd_export.json``.
    """

    backend = "onnx"
    tensor_type = "np"

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        config: Any,
        *,
        export_info: dict[str, Any] | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(session, tokenizer, max_length=max_length, batch_size=batch_size, config=config)
        self.export_info = export_info or {}
        self._inputs = [i.name for i in session.get_inputs()]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def num_parameters(self) -> int:
        return int(self.export_info.get("num_parameters", 0))

    @property
    def dtype(self) -> str:
        return str(self.export_info.get("weights", "float32"))

    @property
    def quantized(self) -> bool:
        return self.export_info.get("quantize") is not None

    @classmethod
    def load(  # type: ignore[override]
        cls,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
    ) -> OnnxPredictor:
        """A predictor for an exported directory; ``threads`` is ONNX Runtime's intra-op thread
        count (default: its own, every physical core)."""
        from transformers import AutoConfig

        from llkd_ray.artifacts import read_json
        from llkd_ray.errors import LlkdError, first_line

        directory = Path(model_dir).expanduser()
        session = onnx_session(directory / ONNX_FILE, threads=threads)
        try:
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise LlkdError(f"cannot read {directory / 'config.json'}: {first_line(error)}") from None
        return cls(
            session,
            _load_tokenizer(str(directory), model_dir),
            config,
            export_info=read_json(str(directory / EXPORT_INFO)),
            max_length=max_length,
            batch_size=batch_size,
        )

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        """One text per forward pass for a quantized graph: dynamic int8 computes each activation's
        scale over the whole batch (padding included), so a batched answer would depend on the texts
        it happened to share the batch with (SST-2 macro-F1 moved between 0.751 and 0.759 with the
        batch size, docs/serving.md). On CPU one-text passes ran as fast as batched ones (350
        against 265-330 texts/s)."""
        if self.quantized:
            return [[index] for index in range(len(lengths))]
        return super()._chunks(lengths)

    def _running(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _logits(self, batch: Any) -> torch.Tensor:
        import numpy as np

        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in self._inputs}
        return torch.from_numpy(self.model.run(None, feed)[0])


def onnx_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``path``; a missing, unreadable or invalid graph is an
    :class:`~llkd_ray.errors.LlkdError` of one line."""
    from llkd_ray.errors import LlkdError, first_line

    try:
        import onnxruntime
    except ImportError:
        raise LlkdError("the onnx backend needs ONNX Runtime: pip install 'llkd-ray[onnx]'") from None
    path = Path(path)
    if not path.is_file():
        raise LlkdError(f"no ONNX model at {path} (write one with `llkd export --format onnx`)")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its optimizer's notes are not the user's business
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise LlkdError(f"cannot load the ONNX model {path}: {first_line(error)}") from None


def detect_backend(model_dir: str | Path, backend: str = "auto") -> str:
    """``torch`` or ``onnx`` for a model directory: ``backend`` when given (its files must be there),
    else whichever weights the directory holds; both or neither is an error naming the choice."""
    from llkd_ray.errors import LlkdError

    directory = Path(model_dir).expanduser()
    if not directory.is_dir():  # a hub id or builtin: reference is a torch model
        return "torch" if backend == "auto" else backend
    has_onnx = (directory / ONNX_FILE).is_file()
    has_torch = any((directory / name).is_file() for name in TORCH_WEIGHTS)
    if backend == "auto":
        if has_onnx and has_torch:
            raise LlkdError(
                f"{model_dir} holds both torch weights and {ONNX_FILE}: choose one with "
                "serving.backend (llkd serve) or --backend (llkd eval): torch or onnx"
            )
        if not (has_onnx or has_torch):
            raise LlkdError(f"{model_dir} holds no model weights ({', '.join(TORCH_WEIGHTS[::2])} or {ONNX_FILE})")
        return "onnx" if has_onnx else "torch"
    if backend not in BACKENDS:
        raise LlkdError(f"unknown backend {backend!r}: choose auto, {' or '.join(BACKENDS)}")
    if backend == "onnx" and not has_onnx:
        raise LlkdError(f"no ONNX model at {directory / ONNX_FILE} (write one with `llkd export --format onnx`)")
    return backend


def load_predictor(
    model_dir: str | Path,
    *,
    backend: str = "auto",
    device: str | torch.device = "auto",
    half_on_gpu: bool = False,
    threads: int | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
) -> Predictor:
    """The predictor for a model directory on the runtime it was saved for (or ``backend``).

    ``threads`` sets the CPU threads of either runtime (torch's for the whole process); ``device``
    and ``half_on_gpu`` apply to torch (ONNX Runtime runs on the CPU here).
    """
    chosen = detect_backend(model_dir, backend)
    if chosen == "onnx":
        return OnnxPredictor.load(model_dir, threads=threads, max_length=max_length, batch_size=batch_size)
    if threads and resolve_device(device).type == "cpu":
        torch.set_num_threads(threads)
    return Predictor.load(
        model_dir, device=device, half_on_gpu=half_on_gpu, max_length=max_length, batch_size=batch_size
    )
