"""What labeling costs: the teacher's compute, counted during a run and forecast before one.

At a user's scale the teacher is the bill: an 8B teacher reading a 136-token prompt costs about
500 times what one training pass of a MiniLM student costs on the same row. So the teacher is
counted by the trainer's own rule (:mod:`llkd_ray.compute`: ``2·N`` FLOPs per real token of a
forward, N the non-embedding parameters), in the same unit as the student:

- **N without weights** — :func:`teacher_parameters` builds the teacher from its ``config.json``
  on the ``meta`` device (shapes only, no memory, no download) and counts it with
  :func:`~llkd_ray.compute.non_embedding_parameters`; for the embedding teacher, its encoder;
- **tokens as read** — each backend reports the real (unpadded, truncated) tokens its forward read
  per row (``TeacherOutput.tokens``), committed with the row (``teacher_tokens``), so the
  manifest's total is a sum over committed rows and a resumed run counts each row once;
- **a forecast** — :func:`label_plan` (``llkd label --plan``) tokenises a sample of the corpus
  exactly as labeling would and extrapolates rows, tokens, FLOPs and GPU-hours, starting no Ray
  and no engine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llkd_ray.compute import format_flops, forward_flops
from llkd_ray.config import DataConfig, PipelineConfig
from llkd_ray.label.teachers.base import TeacherPlan
from llkd_ray.label.teachers.registry import backend_spec

logger = logging.getLogger(__name__)

#: How the teacher's FLOPs are counted (recorded with them).
TEACHER_RULE = "2·N FLOPs per real prompt token the teacher read (llkd_ray/compute.py), N without embeddings"


def _config_dir(model_path: str) -> Path:
    """The directory holding the transformer's ``config.json`` (a sentence-transformers model may
    keep its Transformer module in a sub-directory named by ``modules.json``)."""
    root = Path(model_path)
    if (root / "config.json").is_file() or not (root / "modules.json").is_file():
        return root
    try:
        modules = json.loads((root / "modules.json").read_text())
        first = next(m for m in modules if str(m.get("type", "")).endswith("Transformer"))
        return root / str(first.get("path", ""))
    except (OSError, ValueError, StopIteration):
        return root


def teacher_parameters(plan: TeacherPlan) -> int | None:
    """The teacher's non-embedding parameters, from its config on the ``meta`` device (no weights).

    None, with a warning, when the config cannot be built (an architecture transformers does not
    know without remote code): the FLOPs are then "not recorded", never guessed.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from llkd_ray.compute import non_embedding_parameters

    builder = AutoModelForCausalLM if backend_spec(plan.backend).llm else AutoModel
    try:
        config = AutoConfig.from_pretrained(_config_dir(plan.model_path))
        with torch.device("meta"):
            model = builder.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        logger.warning("cannot count the parameters of teacher %s: %s", plan.model_path, error)
        return None
    return non_embedding_parameters(model)


def teacher_compute(parameters: int | None, tokens: dict[str, int]) -> dict[str, Any]:
    """The manifest's ``teacher_compute``: N, the real tokens read, FLOPs by the trainer's rule.

    ``tokens`` is :func:`~llkd_ray.label.scan.teacher_token_totals`; rows committed by a version that
    did not count tokens are listed in ``rows_not_counted`` and make ``tokens`` (and the FLOPs) a
    lower bound, which ``complete`` says.
    """
    counted = tokens.get("tokens", 0)
    return {
        "parameters": parameters,
        "tokens": counted,
        "flops": forward_flops(parameters, counted) if parameters is not None else None,
        "rows": tokens.get("rows", 0),
        "rows_not_counted": tokens.get("rows_not_counted", 0),
        "complete": parameters is not None and not tokens.get("rows_not_counted", 0),
        "rule": TEACHER_RULE,
    }


# --------------------------------------------------------------------------- the plan before the bill

#: Below this many bytes of uncompressed input the plan counts the rows; above, it estimates them.
COUNT_BYTES = 256 << 20
#: Defaults of ``--plan-peak-tflops`` (H100/H200 bf16 dense) and ``--plan-mfu``.
PEAK_TFLOPS = 989.0
MFU = 0.3


@dataclass
class CorpusSample:
    """The first rows of a corpus (raw text values) and how many rows it has in all."""

    values: list[Any]
    rows: int
    counted: bool
    """``rows`` was counted (True) or estimated from the sample's bytes per row (False)."""


def sample_corpus(data: DataConfig, rows: int) -> CorpusSample:
    """The text values of the first ``rows`` rows of ``data.input``, read with pyarrow (no Ray),
    and the corpus's row count: read from Parquet footers, counted in files under
    :data:`COUNT_BYTES`, estimated from the sample's bytes per row above."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from llkd_ray.corpus import data_files, detect_format, resolve_paths

    paths = resolve_paths(data.input)
    fmt = data.format if data.format != "auto" else detect_format(paths)
    files = data_files(paths)
    total_bytes = sum(fs.get_file_info(path).size or 0 for fs, path in files)
    compressed = any(path.endswith((".gz", ".bz2", ".zst", ".lz4")) for _, path in files)
    count = fmt == "parquet" or compressed or total_bytes <= COUNT_BYTES
    values: list[Any] = []
    seen = read_bytes = 0
    for fs, path in files:
        if fmt == "parquet":
            parquet = pq.ParquetFile(path, filesystem=fs)
            seen += parquet.metadata.num_rows
            if len(values) < rows:
                for batch in parquet.iter_batches(batch_size=rows, columns=[data.text_column]):
                    values += batch.column(0).to_pylist()[: rows - len(values)]
                    if len(values) >= rows:
                        break
            continue
        with fs.open_input_stream(path, compression="detect") as stream:
            if fmt == "csv":
                reader = pacsv.open_csv(stream)
                for batch in reader:
                    if len(values) < rows:
                        column = batch.column(data.text_column) if data.text_column in batch.schema.names else None
                        values += (column.to_pylist() if column is not None else [None] * batch.num_rows)[
                            : rows - len(values)
                        ]
                    seen += batch.num_rows
                    if len(values) >= rows and not count:
                        break
                continue
            for line in _lines(stream):
                if fmt == "jsonl" and not line.strip():
                    continue
                if len(values) < rows:
                    values.append(_text_value(line, fmt, data.text_column))
                    read_bytes += len(line) + 1
                seen += 1
                if len(values) >= rows and not count:
                    break
    if count or not values:
        return CorpusSample(values, seen, True)
    return CorpusSample(values, max(len(values), round(total_bytes * len(values) / max(read_bytes, 1))), False)


def _lines(stream) -> Any:
    """The lines of a binary stream, decoded, without their line ends."""
    import io

    for line in io.TextIOWrapper(stream, encoding="utf-8", errors="replace"):
        yield line.rstrip("\r\n")


def _text_value(line: str, fmt: str, text_column: str) -> Any:
    if fmt == "text":
        return line
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get(text_column) if isinstance(row, dict) else None


def sample_tokens(plan: TeacherPlan, texts: list[str]) -> list[int]:
    """Real tokens the teacher would read for each text, tokenised exactly as labeling does: the
    prompt template and truncation of the LLM backends, the encoder's truncation for embedding."""
    from llkd_ray.label.teachers.prompts import ANSWER_TOKENS, PromptEncoder, forward_tokens, load_tokenizer

    if not backend_spec(plan.backend).llm:
        return _encoder_tokens(plan.model_path, texts)
    continuations = [plan.identity.verbalizers[name] for name in plan.label_names]
    scoring = plan.teacher.scoring if plan.backend == "hf" else "first_token"
    reserve = max(map(len, continuations)) if scoring == "sequence" else ANSWER_TOKENS
    encoder = PromptEncoder(
        load_tokenizer(plan.model_path), plan.task, plan.teacher.prompt_template, plan.max_len, reserve
    )
    prompts, _ = encoder.encode(texts)
    return forward_tokens([len(p) for p in prompts], continuations, scoring).tolist()


def _encoder_tokens(model_path: str, texts: list[str]) -> list[int]:
    """What the embedding teacher's encoder reads: the text with its special tokens, cut at the
    model's ``max_seq_length`` (lower-cased first when the model says so)."""
    from transformers import AutoTokenizer

    from llkd_ray.label.teachers.embedding import plain_sentence_encoder_spec

    spec = plain_sentence_encoder_spec(model_path) or {}
    root = _config_dir(model_path)
    tokenizer = AutoTokenizer.from_pretrained(root)
    limit = spec.get("max_seq_length")
    if limit is None:
        settings = Path(model_path) / "sentence_bert_config.json"
        limit = json.loads(settings.read_text()).get("max_seq_length") if settings.is_file() else None
    limit = int(limit or tokenizer.model_max_length)
    if spec.get("lower_case"):
        texts = [t.lower() for t in texts]
    return [min(len(ids), limit) for ids in tokenizer(texts)["input_ids"]] if texts else []


@dataclass
class LabelPlan:
    """What labeling a corpus will cost, forecast from a sample (``llkd label --plan``)."""

    input: str
    backend: str
    model: str
    rows: int
    rows_counted: bool
    sampled: int
    sample_valid: int
    mean_tokens: float
    tokens: float
    exact: bool
    """The sample was the whole input: rows, tokens and FLOPs are counts, not estimates."""
    parameters: int | None
    flops: float | None
    peak_tflops: float
    mfu: float

    @property
    def valid_rows(self) -> float:
        return self.rows * self.sample_valid / self.sampled if self.sampled else 0.0

    @property
    def gpu_hours(self) -> float | None:
        if self.flops is None:
            return None
        return self.flops / (self.peak_tflops * 1e12 * self.mfu) / 3600

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"valid_rows": self.valid_rows, "gpu_hours": self.gpu_hours, "rule": TEACHER_RULE}

    def describe(self) -> str:
        how = "counted" if self.rows_counted else "estimated from the sample's bytes per row"
        valid = self.sample_valid / self.sampled if self.sampled else 0.0
        tokens_how = "counted: the sample is the whole input" if self.exact else "estimated: sample mean x rows"
        lines = [
            f"label plan for {self.input} (no engine started; teacher {self.backend} {self.model})",
            f"  rows: {self.rows:,} ({how}); sampled the first {self.sampled:,}, {valid:.1%} of them labelable "
            f"-> ~{self.valid_rows:,.0f} rows for the teacher",
            f"  tokens: {self.mean_tokens:.1f} per row (sample), {self.tokens:,.0f} in all ({tokens_how})",
        ]
        if self.parameters is None or self.flops is None:
            lines.append("  teacher FLOPs: not known (the teacher's parameters could not be counted from its config)")
            return "\n".join(lines)
        hours = self.gpu_hours or 0.0
        lines += [
            f"  teacher: N = {self.parameters:,} non-embedding parameters (from its config, no weights loaded)",
            f"  teacher FLOPs: 2·N x tokens = {format_flops(self.flops)}",
            f"  GPU time: {hours:.3g} GPU-hours at {self.mfu:.0%} utilisation (MFU) of {self.peak_tflops:g} TFLOP/s "
            "peak (--plan-mfu, --plan-peak-tflops; default: H100/H200 bf16 dense at 30%)",
        ]
        return "\n".join(lines)


def label_plan(
    config: PipelineConfig, *, sample_rows: int = 1000, peak_tflops: float = PEAK_TFLOPS, mfu: float = MFU
) -> LabelPlan:
    """Forecast rows, tokens, FLOPs and GPU-hours of labeling ``config.data.input`` (at most
    ``data.limit`` rows) from its first ``sample_rows`` rows, without Ray or an engine."""
    from llkd_ray.corpus import check_input, reject_reason
    from llkd_ray.label.teachers.check import check_teacher

    check_input(config.data)
    plan = check_teacher(config.task, config.teacher)
    limit = config.data.limit
    sample = sample_corpus(config.data, min(sample_rows, limit) if limit else sample_rows)
    rows = min(sample.rows, limit) if limit else sample.rows
    texts = [v for v in sample.values if reject_reason(v, config.data.max_chars) is None]
    tokens = sample_tokens(plan, texts)
    mean = sum(tokens) / len(tokens) if tokens else 0.0
    exact = sample.counted and len(sample.values) >= rows
    valid_rows = rows * len(texts) / len(sample.values) if sample.values else 0.0
    total = float(sum(tokens)) if exact else mean * valid_rows
    parameters = teacher_parameters(plan)
    return LabelPlan(
        input=config.data.input,
        backend=plan.backend,
        model=getattr(config.teacher, plan.backend).model,
        rows=rows,
        rows_counted=sample.counted,
        sampled=len(sample.values),
        sample_valid=len(texts),
        mean_tokens=mean,
        tokens=total,
        exact=exact,
        parameters=parameters,
        flops=forward_flops(parameters, total) if parameters is not None else None,
        peak_tflops=peak_tflops,
        mfu=mfu,
    )
