"""The runtimes a student is served on: torch (:class:`~llkd_ray.student.predictor.Predictor`) or
ONNX Runtime (:class:`OnnxPredictor`, a directory written by ``llkd export``), behind the same
preprocess and postprocess. :func:`load_predictor` picks one from the directory, or as asked.

The serving stage's own module: training and the labeling rounds use the torch predictor only;
``llkd serve``, ``llkd eval --backend`` and ``llkd export`` choose among the runtimes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from llkd_ray.errors import LlkdError, first_line
from llkd_ray.student.model import load_tokenizer, resolve_device
from llkd_ray.student.predictor import Predictor

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

        directory = Path(model_dir).expanduser()
        session = onnx_session(directory / ONNX_FILE, threads=threads)
        try:
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise LlkdError(f"cannot read {directory / 'config.json'}: {first_line(error)}") from None
        return cls(
            session,
            load_tokenizer(str(directory), model_dir),
            config,
            export_info=read_json(str(directory / EXPORT_INFO)),
            max_length=max_length,
            batch_size=batch_size,
        )

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        """One text per forward pass for a quantized graph: dynamic int8 computes each activation's
        scale over the whole batch (padding included), so a batched answer would depend on the texts
        it happened to share the batch with (macro-F1 moved with the batch size). On CPU one-text
        passes cost no throughput (docs/serving.md, the ONNX export)."""
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
