"""``llkd export``: the student as an ONNX graph (fp32 or int8) that ONNX Runtime serves on CPUs.

A distilled student is worth its QPS, and most replicas run on CPUs, where the MiniLM student's
forward pass bounds a replica (batching helps little). The runtime moves that bound: dynamic int8
quantization of the linear layers runs several times the fp32 texts/s (docs/serving.md).

Decisions:

- **torch.onnx's TorchScript exporter** (``dynamo=False``) with eager attention, opset 17: a single
  self-contained file in about 3 s for MiniLM, which ONNX Runtime's quantizer handles. The dynamo
  exporter took 16 s, wrote external weights and ran slower here; ``optimum-onnx`` pins
  ``transformers<4.58`` (we run 5.x). Batch and sequence axes are dynamic.
- **Dynamic int8** (``onnxruntime.quantization.quantize_dynamic``, per-channel int8 weights,
  activations quantized at run time): no calibration set needed, so any student exports. Its
  activation scales span a whole forward pass, so the predictor runs an int8 graph one text at a
  time (:class:`~llkd_ray.serve.backends.OnnxPredictor`): an answer never depends on its batch.
- **Checked, not assumed.** The fp32 graph must give torch's probabilities to
  :data:`FP32_TOLERANCE` on a few probe texts (one of them longer than the length limit), or the
  export fails. With a gold set both models are evaluated and the export fails when the exported
  macro-F1 falls more than ``max_f1_drop`` points below torch's. A failed export writes nothing.
- **The directory serves as it is**: ``model.onnx``, the tokenizer (at the training length),
  ``config.json`` (``id2label``, ``llkd_max_length``), ``llkd_export.json`` (what was exported,
  how, and the check) and the training summary when there is one — ``llkd serve`` and
  ``llkd eval`` pick the ONNX backend from it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llkd_ray.errors import LlkdError, first_line

if TYPE_CHECKING:  # torch loads with the first export, not with `llkd --help`
    import torch

    from llkd_ray.student.predictor import Predictor

FORMATS = ("onnx",)
QUANTIZATIONS = ("int8",)
#: Largest difference in any class probability between the fp32 graph and torch.
FP32_TOLERANCE = 1e-4
#: Default for ``--max-f1-drop``: macro-F1 points (0.5 = 0.005) the export may lose on the gold set.
DEFAULT_MAX_F1_DROP = 0.5
OPSET = 17
#: Texts of very different lengths for the fp32 check; the last is cut at any training length.
PROBE_TEXTS = (
    "ok",
    "a quietly moving film with a wonderful cast",
    "The committee met on Tuesday to discuss the budget, and after a long debate it approved the plan.",
    " ".join(["an unusually long review that keeps going"] * 80),
)


class ExportError(LlkdError):
    """The export could not be made or failed its accuracy check; nothing was written."""


@dataclass
class GoldCheck:
    """Torch and exported macro-F1 on a gold set, and how often their labels agree."""

    data: str
    n: int
    torch_macro_f1: float
    exported_macro_f1: float
    agreement: float
    max_f1_drop: float

    @property
    def drop_points(self) -> float:
        return (self.torch_macro_f1 - self.exported_macro_f1) * 100

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "drop_points": self.drop_points}


@dataclass
class ExportResult:
    """What ``llkd export`` wrote and what it checked."""

    source: str
    output: str
    quantize: str | None
    size_bytes: int
    fp32_max_difference: float
    probe_agreement: float
    seconds: float
    gold: GoldCheck | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return f"onnx {self.quantize or 'fp32'}"

    def summary(self) -> str:
        lines = [
            f"exported {self.source} -> {self.output} ({self.kind}, {self.size_bytes / 1e6:.1f} MB, "
            f"{self.seconds:.0f} s); the fp32 graph matches torch to {self.fp32_max_difference:.1e} "
            f"on {len(PROBE_TEXTS)} probe texts"
        ]
        if self.quantize:
            lines[0] += f", the {self.quantize} graph agrees on {self.probe_agreement:.0%} of them"
        if self.gold:
            g = self.gold
            lines.append(
                f"gold {g.data} ({g.n} texts): macro-F1 torch {g.torch_macro_f1:.4f}, {self.kind} "
                f"{g.exported_macro_f1:.4f} ({-g.drop_points:+.2f} points, limit -{g.max_f1_drop:g}), "
                f"labels agree on {g.agreement:.1%}"
            )
        else:
            lines.append("no gold set given (--gold REF): accuracy on real data was not checked")
        return "\n".join(lines)


def read_gold_set(
    model_dir: str | Path, reference: str, *, text_column: str = "text", label_column: str = "label"
) -> tuple[str, list[str], list[str]]:
    """``(reference, texts, labels)`` of a gold set for :func:`export_onnx`, its labels checked
    against the model's ``id2label`` (read from ``config.json``; the model is not loaded). Needs Ray."""
    from transformers import AutoConfig

    from llkd_ray.corpus import read_gold

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    table = read_gold(reference, labels, text_column=text_column, label_column=label_column)
    return reference, list(table["text"]), list(table["label"])


def export_onnx(
    model_dir: str | Path,
    output: str | Path,
    *,
    quantize: str | None = None,
    gold: tuple[str, Sequence[str], Sequence[str]] | None = None,
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    overwrite: bool = False,
) -> ExportResult:
    """Export the torch classifier in ``model_dir`` to ``output`` (see the module docstring).

    ``gold`` is ``(name, texts, labels)``; ``max_f1_drop`` is in macro-F1 points. ``output`` must
    not exist (or be empty) unless ``overwrite``; it is replaced only once every check passed.
    """
    from llkd_ray.serve.backends import ONNX_FILE, OnnxPredictor
    from llkd_ray.student.predictor import Predictor

    started = time.perf_counter()
    source, target = Path(model_dir).expanduser().resolve(), Path(output).expanduser().resolve()
    _check_paths(source, target, quantize, overwrite)
    torch_predictor = Predictor.load(source, device="cpu", attn_implementation="eager")
    with _staging(target) as staging:
        fp32 = staging / ("model.fp32.onnx" if quantize else ONNX_FILE)
        _export_graph(torch_predictor, fp32)
        reference = torch_predictor.probabilities(PROBE_TEXTS)[0]
        difference = float((_session_probabilities(fp32, torch_predictor, PROBE_TEXTS) - reference).abs().max())
        if not difference <= FP32_TOLERANCE:
            raise ExportError(
                f"the exported fp32 graph differs from torch by {difference:.2e} in a probability "
                f"(tolerance {FP32_TOLERANCE:g}): this architecture does not export faithfully"
            )
        if quantize:
            _quantize_int8(fp32, staging / ONNX_FILE)
            fp32.unlink()
        info = _write_metadata(torch_predictor, source, staging, quantize)
        exported = OnnxPredictor.load(staging)
        probes = exported.probabilities(PROBE_TEXTS)[0]
        probe_agreement = float((probes.argmax(-1) == reference.argmax(-1)).float().mean())
        check = _gold_check(torch_predictor, exported, gold, max_f1_drop) if gold else None
        if check:
            info["gold_check"] = check.to_dict()
            _write_info(staging, info)
            if check.drop_points > max_f1_drop:
                raise ExportError(
                    f"the {quantize or 'fp32'} ONNX model scores macro-F1 {check.exported_macro_f1:.4f} on "
                    f"{check.data} against torch's {check.torch_macro_f1:.4f}: {check.drop_points:.2f} points "
                    f"lost, more than --max-f1-drop {max_f1_drop:g}; nothing was written to {target}"
                )
        size = (staging / ONNX_FILE).stat().st_size
    return ExportResult(
        source=str(source),
        output=str(target),
        quantize=quantize,
        size_bytes=size,
        fp32_max_difference=difference,
        probe_agreement=probe_agreement,
        seconds=time.perf_counter() - started,
        gold=check,
        info=info,
    )


def _check_paths(source: Path, target: Path, quantize: str | None, overwrite: bool) -> None:
    from llkd_ray.serve.backends import detect_backend

    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"unknown quantization {quantize!r}: choose {', '.join(QUANTIZATIONS)} or none")
    if detect_backend(source) != "torch":
        raise ExportError(f"{source} is not a torch model directory (it is already exported?)")
    if target == source or source in target.parents:
        raise ExportError(f"--output {target} must be outside the model directory {source}")
    if target.exists() and not target.is_dir():
        raise ExportError(f"--output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"--output {target} is not empty: pass --overwrite to replace it")


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A sibling directory that becomes ``target`` when the block ends without error (else removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def _input_names(predictor: Predictor) -> list[str]:
    return list(predictor.preprocess(PROBE_TEXTS[:1]).features)


def _export_graph(predictor: Predictor, path: Path) -> None:
    """Trace the classifier's forward pass (inputs → logits) into an ONNX graph at ``path``."""
    import torch

    names = _input_names(predictor)
    batch = predictor.tokenizer.pad(predictor.preprocess(PROBE_TEXTS[1:3]).features, return_tensors="pt")

    class Logits(torch.nn.Module):  # the model's output object → the one tensor the graph returns
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).logits

    dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow it froze
        try:
            torch.onnx.export(
                Logits(predictor.model.eval()),
                tuple(batch[name] for name in names),
                str(path),
                input_names=names,
                output_names=["logits"],
                dynamic_axes={**dynamic, "logits": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as error:
            raise ExportError(
                f"torch.onnx could not export {type(predictor.model).__name__}: {first_line(error)}"
            ) from None


def _session_probabilities(path: Path, predictor: Predictor, texts: Sequence[str]) -> torch.Tensor:
    """The graph at ``path`` through ``predictor``'s own preprocessing and batching."""
    from llkd_ray.serve.backends import OnnxPredictor, onnx_session

    exported = OnnxPredictor(onnx_session(path), predictor.tokenizer, predictor.config, max_length=predictor.max_length)
    return exported.probabilities(texts)[0]


def _quantize_int8(source: Path, target: Path) -> None:
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ExportError("--quantize int8 needs onnx and ONNX Runtime: pip install 'llkd-ray[onnx]'") from None
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its advice to pre-process the graph, printed on every call
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        quiet.setLevel(level)


def _write_metadata(predictor: Predictor, source: Path, staging: Path, quantize: str | None) -> dict[str, Any]:
    """``config.json``, the tokenizer, the training summary and ``llkd_export.json`` next to the graph."""
    import onnxruntime
    import torch

    from llkd_ray.artifacts import TRAINING_SUMMARY, training_summary_file
    from llkd_ray.student.model import MAX_LENGTH_FIELD, save_tokenizer

    config = predictor.config
    setattr(config, MAX_LENGTH_FIELD, predictor.max_length)
    config.save_pretrained(staging)
    save_tokenizer(predictor.tokenizer, staging, predictor.max_length)
    summary = training_summary_file(source)
    if summary is not None:
        shutil.copyfile(summary, staging / TRAINING_SUMMARY)
    info = {
        "format": "onnx",
        "quantize": quantize,
        "weights": quantize or "float32",
        "source": str(source),
        "num_parameters": predictor.num_parameters,
        "max_length": predictor.max_length,
        "opset": OPSET,
        "inputs": _input_names(predictor),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    _write_info(staging, info)
    return info


def _write_info(staging: Path, info: dict[str, Any]) -> None:
    from llkd_ray.artifacts import write_json
    from llkd_ray.serve.backends import EXPORT_INFO

    write_json(str(staging / EXPORT_INFO), info)


def _gold_check(
    torch_predictor: Predictor,
    exported: Predictor,
    gold: tuple[str, Sequence[str], Sequence[str]],
    max_f1_drop: float,
) -> GoldCheck:
    from llkd_ray.metrics import classification_metrics

    name, texts, truth = gold
    names = torch_predictor.labels
    reference = torch_predictor.predict_indices(texts)
    candidate = exported.predict_indices(texts)

    def macro_f1(indices: list[int]) -> float:
        return classification_metrics(truth, [names[i] for i in indices], names)["macro_f1"]

    agreement = sum(a == b for a, b in zip(reference, candidate, strict=True)) / len(texts)
    return GoldCheck(name, len(texts), macro_f1(reference), macro_f1(candidate), agreement, max_f1_drop)
