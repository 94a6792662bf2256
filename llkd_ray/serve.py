"""Online serving of a student classifier on Ray Serve: batched, autoscaled, validated HTTP API.

Three ways in, one deployment:

* ``llkd serve --model DIR`` (:func:`run_server`) starts Serve on this machine (or joins the
  cluster in ``RAY_ADDRESS``), waits until the model is loaded and blocks until interrupted;
* ``serve run llkd_ray.serve:build_app model=DIR [config=C]`` builds the same application;
* ``serve deploy deploy/serve_config.yaml`` deploys it on a cluster (``import_path`` is
  ``llkd_ray.serve:build_app``).

The HTTP API (FastAPI ingress, see docs/serving.md):

* ``POST /v1/classify`` ``{"texts": [...]}`` or ``{"text": "..."}``, optional ``top_k`` →
  ``{"model": {...}, "predictions": [{"label", "score", "scores", "truncated"}]}``;
* ``GET /healthz`` 200 once the model is loaded, 503 before (never needs a token);
* ``GET /v1/model`` labels, model metadata, the training summary when there is one.

Texts from concurrent requests are batched with ``@serve.batch`` (one text per batch item, so a
batch is at most ``serving.max_batch_size`` texts); tokenisation and the forward pass run on one
model thread per replica under ``torch.inference_mode``. Bad requests get a 4xx JSON error
``{"error": {"code", "message"}}`` naming the problem, never a 500.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator
from ray import serve
from ray.serve.metrics import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from llkd_ray.config import PipelineConfig, ServingConfig, _apply_override, load_config
from llkd_ray.errors import ConfigError, LlkdError

APP_NAME = "llkd"
DEPLOYMENT_NAME = "Classifier"
TRAINING_SUMMARY = "training_summary.json"

logger = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------- request models


class ClassifyRequest(BaseModel):
    """Body of ``POST /v1/classify``: exactly one of ``texts`` and ``text``."""

    model_config = ConfigDict(extra="forbid")

    texts: Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)] | None = None
    text: Annotated[StrictStr, Field(min_length=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
    """Keep only the k most probable labels in ``scores`` (default: every label)."""

    @model_validator(mode="after")
    def _one_input(self) -> "ClassifyRequest":
        if (self.texts is None) == (self.text is None):
            raise ValueError("give exactly one of 'texts' (a list of strings) or 'text' (a string)")
        return self

    @property
    def inputs(self) -> list[str]:
        return self.texts if self.texts is not None else [self.text]  # type: ignore[list-item]


class ApiError(Exception):
    """A client error, answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


def _location(loc: Sequence[Any], whole: str = "body") -> str:
    """``("body", "texts", 0)`` -> ``texts[0]``; an empty location names ``whole``."""
    text = ""
    for part in loc:
        if part == "body" and not text:
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or whole


def _describe(errors: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    details = []
    for item in errors:
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            message = "unknown field (allowed: texts, text, top_k)"
        details.append({"field": _location(item.get("loc", ())), "message": message})
    return details


api = FastAPI(
    title="llkd student classifier",
    description="Text classification by a student distilled with LLKD, served on Ray Serve.",
    version="1",
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return _error_response(error.status, error.code, error.message, error.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = list(error.errors())
    malformed = [item for item in errors if item.get("type") == "json_invalid"]
    if malformed:
        reason = str(malformed[0].get("ctx", {}).get("error", "")) or "cannot parse"
        return _error_response(400, "malformed_json", f"request body is not valid JSON: {reason}")
    details = _describe(errors)
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return _error_response(422, "invalid_request", message, details=details)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return _error_response(error.status_code, code, str(error.detail), getattr(error, "headers", None))


@api.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error_response(500, "internal_error", "internal server error (see the replica log)")


# --------------------------------------------------------------------------- the model


def token_digest(token: str) -> str:
    """SHA-256 of a bearer token: replicas compare digests, the token itself never leaves its env."""
    return hashlib.sha256(token.encode()).hexdigest()


def read_training_summary(model_dir: str | Path) -> dict[str, Any] | None:
    """``training_summary.json`` from the model directory itself or its parent, when present."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / TRAINING_SUMMARY, model_dir.parent / TRAINING_SUMMARY):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, ValueError) as error:
                return {"error": f"unreadable {candidate.name}: {error}"}
    return None


def check_model_dir(reference: str | Path) -> str:
    """Return the absolute path of a local sequence-classification model dir, or raise LlkdError."""
    path = Path(reference).expanduser()
    if not path.is_dir():
        raise LlkdError(f"model directory not found: {reference}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LlkdError(f"model directory {reference} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise LlkdError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config.get("id2label"), dict) or len(config["id2label"]) < 2:
        raise LlkdError(
            f"model directory {reference} has no id2label with at least 2 labels in config.json: "
            "serve a sequence-classification model saved with its labels"
        )
    return str(path.resolve())


class StudentModel:
    """Tokenizer and classifier of one model directory; ``predict`` is batched and thread-confined."""

    #: On CPU, texts of one batch are sorted by length and split so that padding wastes at most
    #: this fraction of the tokens (CPU cost grows with padded tokens); on GPU one forward pass.
    CPU_PADDING_SLACK = 1.25

    def __init__(self, model_dir: str, serving: ServingConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        want_cuda = serving.device == "cuda" or (serving.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise RuntimeError("serving.device is 'cuda' but this replica sees no GPU")
        self.device = torch.device("cuda" if want_cuda else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(serving.num_cpus)))
        dtype = torch.float32
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=False, dtype=dtype)
            .to(self.device)
            .eval()
        )
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        # The tokenizer's and the position embeddings' limits (HF writes a huge number for "none").
        limits = [
            n
            for n in (
                getattr(self.tokenizer, "model_max_length", None),
                getattr(config, "max_position_embeddings", None),
                serving.max_length,
            )
            if n and n < 1_000_000
        ]
        self.max_length = min(limits, default=512)
        self.info = {
            "name": Path(model_dir).name,
            "architecture": (config.architectures or [type(self.model).__name__])[0],
            "model_type": config.model_type,
            "num_labels": len(self.labels),
            "max_length": self.max_length,
            "device": self.device.type,
            "dtype": str(dtype).removeprefix("torch."),
        }
        self.num_parameters = sum(p.numel() for p in self.model.parameters())

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        if self.device.type != "cpu":
            return [order]
        chunks: list[list[int]] = []
        current: list[int] = []
        tokens = 0
        for index in order:  # ascending length: the newest text is the longest of its chunk
            length = lengths[index]
            if current and (len(current) + 1) * length > self.CPU_PADDING_SLACK * (tokens + length):
                chunks.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += length
        return [*chunks, current] if current else chunks

    def predict(self, texts: list[str]) -> list[tuple[list[float], bool]]:
        """Class probabilities (in label order) and a truncation flag for each text."""
        import torch

        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        if encoded.encodings is not None:
            truncated = [bool(e.overflowing) for e in encoded.encodings]
        else:  # a slow tokenizer: count the tokens without truncation
            full = self.tokenizer(texts, truncation=False)["input_ids"]
            truncated = [len(ids) > self.max_length for ids in full]
        features = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        lengths = [len(ids) for ids in features["input_ids"]]
        probabilities: list[list[float]] = [[] for _ in texts]
        with torch.inference_mode():
            for chunk in self._chunks(lengths):
                batch = self.tokenizer.pad({k: [v[i] for i in chunk] for k, v in features.items()}, return_tensors="pt")
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
                for index, row in zip(chunk, torch.softmax(logits.float(), dim=-1).cpu().tolist(), strict=True):
                    probabilities[index] = row
        return list(zip(probabilities, truncated, strict=True))


# --------------------------------------------------------------------------- the deployment


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class Classifier:
    """One replica: loads the model on its model thread, answers while Serve batches its texts."""

    def __init__(
        self, model_dir: str, serving: dict[str, Any], auth_digest: str | None = None, load_delay_s: float = 0.0
    ):
        self.serving = ServingConfig.model_validate(serving)
        self.model_dir = model_dir
        token = os.environ.get(self.serving.auth_token_env)
        self._auth_digest = auth_digest or (token_digest(token) if token else None)
        self._predict_batch.set_max_batch_size(self.serving.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.serving.batch_wait_timeout_s)
        self.model: StudentModel | None = None
        self.load_error: str | None = None
        self.training_summary: dict[str, Any] | None = None
        self.stats = {"requests": 0, "texts": 0, "truncated": 0, "batches": 0, "forward_seconds": 0.0}
        self._texts_counter = Counter("llkd_texts_classified", description="Texts classified by the student.")
        self._truncated_counter = Counter("llkd_texts_truncated", description="Texts cut to the model's max length.")
        # Every model call runs on this one thread, in order: the load first, then the batches.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llkd-model")
        self._model_thread.submit(self._load, load_delay_s)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def _load(self, delay_s: float) -> None:
        started = time.perf_counter()
        try:
            if delay_s:
                time.sleep(delay_s)  # test-only: makes "loading" observable
            self.training_summary = read_training_summary(self.model_dir)
            self.model = StudentModel(self.model_dir, self.serving)
            logger.info(
                "llkd: loaded %s (%s labels, %s) in %.1fs",
                self.model_dir,
                len(self.model.labels),
                self.model.device,
                time.perf_counter() - started,
            )
        except Exception as error:
            self.load_error = f"{type(error).__name__}: {error}"
            logger.exception("llkd: loading %s failed", self.model_dir)

    def check_health(self) -> None:
        """Serve replaces a replica whose model failed to load."""
        if self.load_error:
            raise RuntimeError(f"model failed to load: {self.load_error}")

    # -- model calls (on the model thread)

    def _forward(self, texts: list[str]) -> list[tuple[list[float], bool]]:
        if self.model is None:
            raise ApiError(503, "model_unavailable", f"model failed to load: {self.load_error}")
        started = time.perf_counter()
        results = self.model.predict(texts)
        self.stats["batches"] += 1
        self.stats["forward_seconds"] += time.perf_counter() - started
        return results

    async def _on_model_thread(self, texts: list[str]) -> list[tuple[list[float], bool]]:
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self._forward, texts)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, texts: list[str]) -> list[tuple[list[float], bool, int]]:
        results = await self._on_model_thread(texts)
        return [(probabilities, truncated, len(texts)) for probabilities, truncated in results]

    async def _predict(self, texts: list[str]) -> list[tuple[list[float], bool, int]]:
        if self.serving.batching:
            return list(await asyncio.gather(*(self._predict_batch(text) for text in texts)))
        return [(p, t, len(texts)) for p, t in await self._on_model_thread(texts)]

    # -- request checks

    def _authorize(self, request: Request) -> None:
        if self._auth_digest is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(
                401,
                "unauthorized",
                "missing bearer token: send 'Authorization: Bearer TOKEN'",
                {"WWW-Authenticate": 'Bearer realm="llkd"'},
            )
        if not hmac.compare_digest(token_digest(presented.strip()), self._auth_digest):
            raise ApiError(
                401,
                "unauthorized",
                "invalid bearer token",
                {"WWW-Authenticate": 'Bearer realm="llkd", error="invalid_token"'},
            )

    def _ready_model(self) -> StudentModel:
        if self.model is None:
            if self.load_error:
                raise ApiError(503, "model_unavailable", f"model failed to load: {self.load_error}")
            raise ApiError(503, "loading", "the model is still loading; retry shortly", {"Retry-After": "1"})
        return self.model

    async def _read_request(self, request: Request) -> ClassifyRequest:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send a JSON body with 'Content-Type: application/json' (got {content_type or 'none'!r})",
            )
        limit = self.serving.max_texts_per_request * self.serving.max_chars * 4 + 65_536
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body_too_large", f"request body of {declared} bytes exceeds {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"request body of {len(body)} bytes exceeds {limit} bytes")
        if not body.strip():
            raise ApiError(400, "malformed_json", 'empty request body: send {"texts": [...]} or {"text": "..."}')
        try:
            parsed = ClassifyRequest.model_validate_json(body)
        except ValidationError as error:
            raise RequestValidationError(error.errors(include_url=False)) from None
        texts = parsed.inputs
        if len(texts) > self.serving.max_texts_per_request:
            raise ApiError(
                422,
                "too_many_texts",
                f"texts: {len(texts)} texts given, at most {self.serving.max_texts_per_request} per request",
            )
        for index, text in enumerate(texts):
            if len(text) > self.serving.max_chars:
                field = f"texts[{index}]" if parsed.texts is not None else "text"
                raise ApiError(
                    422, "text_too_long", f"{field}: {len(text)} characters, at most {self.serving.max_chars} allowed"
                )
        return parsed

    # -- routes

    @api.get("/healthz")
    def healthz(self):
        """200 once the model is loaded; 503 while it loads or when loading failed (no token needed)."""
        if self.model is not None:
            return JSONResponse({"status": "ok", "model": self.model.info["name"]})
        if self.load_error:
            return JSONResponse({"status": "error", "error": self.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})

    @api.get("/v1/model")
    def model_info(self, request: Request):
        """Labels, model metadata, serving settings and the training summary (when present)."""
        self._authorize(request)
        model = self._ready_model()
        stats = dict(self.stats)
        stats["mean_batch_size"] = round(stats["texts"] / stats["batches"], 2) if stats["batches"] else None
        serving = self.serving.model_dump(
            include={"max_batch_size", "batch_wait_timeout_s", "batching", "max_texts_per_request", "max_chars"}
        )
        return {
            **model.info,
            "labels": model.labels,
            "num_parameters": model.num_parameters,
            "replica": self.replica,
            "auth": self._auth_digest is not None,
            "serving": serving,
            "stats": stats,
            "training_summary": self.training_summary,
        }

    @api.post(
        "/v1/classify",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}},
            }
        },
    )
    async def classify(self, request: Request):
        """Classify ``texts`` (or one ``text``); predictions come back in request order."""
        started = time.perf_counter()
        self._authorize(request)
        parsed = await self._read_request(request)
        texts = parsed.inputs
        results = await self._predict(texts)  # waits for the model when it is still loading
        model = self._ready_model()
        top_k = min(parsed.top_k or len(model.labels), len(model.labels))
        predictions = []
        for probabilities, truncated, _ in results:
            ranked = sorted(zip(model.labels, probabilities, strict=True), key=lambda pair: -pair[1])
            predictions.append(
                {
                    "label": ranked[0][0],
                    "score": ranked[0][1],
                    "scores": dict(ranked[:top_k]),
                    "truncated": truncated,
                }
            )
        n_truncated = sum(1 for p in predictions if p["truncated"])
        self.stats["requests"] += 1
        self.stats["texts"] += len(texts)
        self.stats["truncated"] += n_truncated
        self._texts_counter.inc(len(texts))
        if n_truncated:
            self._truncated_counter.inc(n_truncated)
        logger.info(
            "classify texts=%d truncated=%d batch_sizes=%s latency_ms=%.1f",
            len(texts),
            n_truncated,
            sorted({size for _, _, size in results}),
            1000 * (time.perf_counter() - started),
        )
        return {"model": model.info, "predictions": predictions}


# --------------------------------------------------------------------------- building the app


class ServeArgs(BaseModel):
    """Arguments of :func:`build_app` (``serve run llkd_ray.serve:build_app model=DIR``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    """Local sequence-classification model directory (on every node of a cluster)."""
    config: str | None = None
    """Pipeline config YAML whose ``serving`` section applies."""
    serving: dict[str, Any] = Field(default_factory=dict)
    """``serving`` keys set on top of the config (or of the defaults)."""
    load_delay_s: Annotated[float, Field(ge=0)] = 0.0
    """Test-only: sleep this long before loading the model, to observe ``/healthz`` while loading."""


def _format_errors(error: ValidationError, section: str) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(filter(None, (section, _location(item["loc"], whole=""))))
        parts.append(f"{field or 'args'}: {str(item['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def load_serving_config(
    config: str | Path | None = None, overrides: Sequence[str] = (), updates: dict[str, Any] | None = None
) -> ServingConfig:
    """The ``serving`` section of a pipeline config (or the defaults), with overrides applied.

    ``overrides`` are ``serving.KEY=VALUE`` (``KEY=VALUE`` is read as ``serving.KEY`` when no
    config file is given); ``updates`` are serving keys set last.
    """
    if config is not None:
        serving = load_config(config, list(overrides)).serving
    else:
        raw: dict[str, Any] = {}
        for override in overrides:
            key = override.partition("=")[0]
            if "." in key and not key.startswith("serving."):
                raise ConfigError(f"override {override!r}: without --config only serving.* keys can be set")
            _apply_override(raw, override.removeprefix("serving."))
        try:
            serving = ServingConfig.model_validate(raw)
        except ValidationError as error:
            raise ConfigError(f"invalid serving settings: {_format_errors(error, 'serving')}") from None
    return _updated(serving, updates or {})


def _updated(serving: ServingConfig, updates: dict[str, Any]) -> ServingConfig:
    if not updates:
        return serving
    try:
        return ServingConfig.model_validate({**serving.model_dump(), **updates})
    except ValidationError as error:
        raise ConfigError(f"invalid serving settings: {_format_errors(error, 'serving')}") from None


def deployment_options(serving: ServingConfig, cluster_gpus: float = 0.0) -> dict[str, Any]:
    """Serve deployment options (replicas, autoscaling, resources) from ``serving``."""
    num_gpus = serving.num_gpus
    if num_gpus == 0 and (serving.device == "cuda" or (serving.device == "auto" and cluster_gpus > 0)):
        num_gpus = 1
    return {
        "autoscaling_config": {
            "min_replicas": serving.min_replicas,
            "initial_replicas": max(serving.min_replicas, 1),
            "max_replicas": serving.max_replicas,
            "target_ongoing_requests": serving.target_ongoing_requests,
        },
        "max_ongoing_requests": serving.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": serving.num_cpus, "num_gpus": num_gpus},
    }


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def build_app(args: dict[str, Any] | ServeArgs) -> serve.Application:
    """Serve application builder: ``serve run llkd_ray.serve:build_app model=DIR [config=C]``."""
    try:
        parsed = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    except ValidationError as error:
        raise ConfigError(f"invalid application args: {_format_errors(error, '')}") from None
    model_dir = check_model_dir(parsed.model)
    serving = load_serving_config(parsed.config, updates=parsed.serving)
    token = os.environ.get(serving.auth_token_env)
    deployment = Classifier.options(**deployment_options(serving, _cluster_gpus()))
    return deployment.bind(
        model_dir, serving.model_dump(mode="json"), token_digest(token) if token else None, parsed.load_delay_s
    )


# --------------------------------------------------------------------------- llkd serve


def _local_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def wait_until_ready(url: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """Poll ``GET url/healthz`` until it answers 200; raise LlkdError when loading failed or timed out."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            try:
                body = json.loads(error.read())
            except ValueError:
                body = {}
            if body.get("status") == "error":
                raise LlkdError(f"the model failed to load: {body.get('error')}") from None
            last = f"HTTP {error.code} {body or ''}".strip()
        except (OSError, ValueError) as error:
            last = str(error)
        time.sleep(0.5)
    raise LlkdError(f"{url}/healthz not ready after {timeout_s:.0f}s (last: {last})")


#: Statuses a client should retry ``/v1/classify`` on (it has no side effects): a replica that died
#: mid-request (500 from the proxy), Serve's request timeout (408) or back-pressure (429/503, with
#: Retry-After), no replica available (503), a gateway in front (502/504).
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def classify(
    url: str,
    texts: Sequence[str],
    *,
    top_k: int | None = None,
    token: str | None = None,
    attempts: int = 8,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Client for ``POST url/v1/classify`` with the retry policy of docs/serving.md.

    Retries connection errors and :data:`RETRY_STATUSES` with exponential backoff (0.2 s doubling,
    at most 5 s, or the server's ``Retry-After``) up to ``attempts`` times; a 4xx is final and
    raises :class:`LlkdError` with the server's message.
    """
    payload: dict[str, Any] = {"texts": list(texts)}
    if top_k is not None:
        payload["top_k"] = top_k
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(payload).encode()
    last = ""
    for attempt in range(attempts):
        delay = min(0.2 * 2**attempt, 5.0)
        request = urllib.request.Request(f"{url}/v1/classify", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            if error.code not in RETRY_STATUSES:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    text = json.loads(text)["error"]["message"]
                raise LlkdError(f"classify failed with HTTP {error.code}: {text}") from None
            last = f"HTTP {error.code}: {text[:200]}"
            retry_after = error.headers.get("Retry-After", "")
            if retry_after.isdigit():
                delay = min(float(retry_after), 5.0)
        except (OSError, ValueError) as error:  # refused, reset, timed out, truncated body
            last = f"{type(error).__name__}: {error}"
        if attempt + 1 < attempts:
            time.sleep(delay)
    raise LlkdError(f"classify failed after {attempts} attempts (last: {last})")


def _interrupt_on_signals() -> dict[int, Any]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (even where a shell started us with SIGINT ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def run_server(
    model: str | Path,
    config: PipelineConfig | ServingConfig | str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    host: str | None = None,
    port: int | None = None,
    ready_timeout_s: float = 600.0,
) -> int:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM), then shut Serve down; returns 0.

    Starts a local Ray unless ``RAY_ADDRESS`` names a cluster (or Ray is already initialised). On a
    cluster only this application is deleted at the end; locally Serve is shut down.
    """
    import ray

    from llkd_ray.runtime import init_ray

    if isinstance(config, PipelineConfig):
        config = config.serving
    serving = config if isinstance(config, ServingConfig) else load_serving_config(config, overrides)
    serving = _updated(serving, {key: value for key, value in (("host", host), ("port", port)) if value is not None})
    model_dir = check_model_dir(model)
    remote = bool(os.environ.get("RAY_ADDRESS"))
    if not remote and not _port_free(serving.host, serving.port):
        raise LlkdError(f"port {serving.port} on {serving.host} is in use: pick another with --port")
    started_ray = not ray.is_initialized()
    init_ray()
    previous = _interrupt_on_signals()
    try:
        serve.start(http_options={"host": serving.host, "port": serving.port})
        serve.run(
            build_app(ServeArgs(model=model_dir, serving=serving.model_dump(mode="json"))),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
        url = _local_url(serving.host, serving.port)
        wait_until_ready(url, ready_timeout_s)
        auth = "on" if os.environ.get(serving.auth_token_env) else f"off (set {serving.auth_token_env} to enable)"
        print(
            f"llkd serve: {model_dir} at http://{serving.host}:{serving.port} "
            f"(POST /v1/classify, GET /v1/model, GET /healthz; bearer auth {auth}); Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        print("llkd serve: shutting down", flush=True)
        if remote:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        if started_ray:
            ray.shutdown()
    return 0
