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

A replica is small parts wired by FastAPI dependencies: :class:`BearerAuth` (the optional token,
through ``HTTPBearer``), :class:`RequestReader` (the body, validated by a pydantic model whose
field constraints are the replica's limits), :class:`ModelHost` (the
:class:`~llkd_ray.predictor.Predictor` on its one model thread), :class:`Usage` (counters) and
:class:`Classifier` (routes and ``@serve.batch``: one text per batch item, so a batch is at most
``serving.max_batch_size`` texts). Bad requests get a 4xx JSON error ``{"error": {"code",
"message"}}`` naming the problem, never a 500.
"""

import asyncio
import email.utils
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
    model_validator,
)
from ray import serve
from ray.serve.metrics import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from llkd_ray.artifacts import training_summary_file
from llkd_ray.config import PipelineConfig, ServingConfig, _apply_override, load_config
from llkd_ray.errors import ConfigError, LlkdError

if TYPE_CHECKING:
    import torch

    from llkd_ray.predictor import Predictor

APP_NAME = "llkd"
DEPLOYMENT_NAME = "Classifier"
#: Test-only: a replica waits until the file this names exists before loading its model, so that
#: "loading" can be observed for as long as a test needs. Read from the replica's own environment
#: (tests set it in the replicas' runtime_env).
LOAD_GATE_ENV = "LLKD_SERVE_TEST_LOAD_GATE"

logger = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------- request models

Text = Annotated[StrictStr, Field(min_length=1)]


class ClassifyRequest(BaseModel):
    """Body of ``POST /v1/classify``: exactly one of ``texts`` and ``text``.

    The limits (texts per request, characters per text) are those of the replica's serving
    config, so each replica validates with :func:`classify_request_model`, a subclass with them
    as field constraints.
    """

    model_config = ConfigDict(extra="forbid")

    texts: Annotated[list[Text], Field(min_length=1)] | None = None
    text: Text | None = None
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


def classify_request_model(max_texts: int, max_chars: int) -> type[ClassifyRequest]:
    """:class:`ClassifyRequest` with a replica's limits as ``Field`` constraints."""
    limited = Annotated[StrictStr, Field(min_length=1, max_length=max_chars)]
    return create_model(
        "LimitedClassifyRequest",
        __base__=ClassifyRequest,
        texts=(Annotated[list[limited], Field(min_length=1, max_length=max_texts)] | None, None),
        text=(limited | None, None),
    )


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


#: Pydantic error types of the request limits (list and string ``max_length``): documented codes.
_LIMIT_ERRORS = ("too_long", "string_too_long")


def _limit_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """The documented 422 for a request over the limits: too many texts first, then a long text."""
    for item in errors:
        if item["type"] == "too_long":
            ctx = item.get("ctx", {})
            given, most = ctx.get("actual_length"), ctx.get("max_length")
            return ApiError(422, "too_many_texts", f"texts: {given} texts given, at most {most} per request")
    item = errors[0]
    most = item.get("ctx", {}).get("max_length")
    message = f"{_location(item['loc'])}: {len(item['input'])} characters, at most {most} allowed"
    return ApiError(422, "text_too_long", message)


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
    """Pydantic's errors as the documented bodies: 400 malformed JSON, 422 with a code per problem."""
    errors = list(error.errors())
    malformed = [item for item in errors if item.get("type") == "json_invalid"]
    if malformed:
        reason = str(malformed[0].get("ctx", {}).get("error", "")) or "cannot parse"
        return _error_response(400, "malformed_json", f"request body is not valid JSON: {reason}")
    invalid = [item for item in errors if item.get("type") not in _LIMIT_ERRORS]
    if not invalid:
        return await _api_error(request, _limit_error(errors))
    details = _describe(invalid)
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


# --------------------------------------------------------------------------- the replica's parts


def token_digest(token: str) -> str:
    """SHA-256 of a bearer token: replicas compare digests, the token itself never leaves its env."""
    return hashlib.sha256(token.encode()).hexdigest()


class BearerAuth:
    """The optional bearer token of a replica, held as its digest and compared in constant time."""

    CHALLENGE = 'Bearer realm="llkd"'

    def __init__(self, digest: str | None) -> None:
        self.digest = digest

    @classmethod
    def for_replica(cls, digest: str | None, token_env: str) -> "BearerAuth":
        """The builder's digest, else the token in this replica's own environment, else auth off."""
        token = os.environ.get(token_env)
        return cls(digest or (token_digest(token) if token else None))

    @property
    def enabled(self) -> bool:
        return self.digest is not None

    def check(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise the documented 401 unless auth is off or the credentials carry the token."""
        if self.digest is None:
            return
        if credentials is None:
            message = "missing bearer token: send 'Authorization: Bearer TOKEN'"
            raise ApiError(401, "unauthorized", message, {"WWW-Authenticate": self.CHALLENGE})
        if not hmac.compare_digest(token_digest(credentials.credentials), self.digest):
            challenge = f'{self.CHALLENGE}, error="invalid_token"'
            raise ApiError(401, "unauthorized", "invalid bearer token", {"WWW-Authenticate": challenge})


class RequestReader:
    """Reads a classify body under one replica's limits: media type, size, then the pydantic model."""

    def __init__(self, serving: ServingConfig) -> None:
        self.model = classify_request_model(serving.max_texts_per_request, serving.max_chars)
        self.max_bytes = serving.max_texts_per_request * serving.max_chars * 4 + 65_536

    async def read(self, request: Request) -> ClassifyRequest:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            message = f"send a JSON body with 'Content-Type: application/json' (got {content_type or 'none'!r})"
            raise ApiError(415, "unsupported_media_type", message)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ApiError(413, "body_too_large", f"request body of {declared} bytes exceeds {self.max_bytes} bytes")
        body = await request.body()
        if len(body) > self.max_bytes:
            raise ApiError(413, "body_too_large", f"request body of {len(body)} bytes exceeds {self.max_bytes} bytes")
        if not body.strip():
            raise ApiError(400, "malformed_json", 'empty request body: send {"texts": [...]} or {"text": "..."}')
        try:
            return self.model.model_validate_json(body)
        except ValidationError as error:
            raise RequestValidationError(error.errors(include_url=False)) from None


def read_training_summary(model_dir: str | Path) -> dict[str, Any] | None:
    """``training_summary.json`` from the model directory itself or its parent, when present."""
    candidate = training_summary_file(model_dir)
    if candidate is None:
        return None
    try:
        return json.loads(candidate.read_text())
    except (OSError, ValueError) as error:
        return {"error": f"unreadable {candidate.name}: {error}"}


def check_model_dir(reference: str | Path, backend: str = "auto") -> str:
    """Return the absolute path of a local sequence-classification model dir, or raise LlkdError.

    The weights of ``backend`` must be there (``auto``: the directory's own, torch or ONNX), and an
    ONNX graph must load, so that a bad file is one line here and not a failing replica later.
    """
    from llkd_ray.predictor import ONNX_FILE, detect_backend, onnx_session

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
    if detect_backend(path, backend) == "onnx":
        onnx_session(path / ONNX_FILE, threads=1)
    return str(path.resolve())


def replica_predictor(model_dir: str, serving: ServingConfig) -> "Predictor":
    """The replica's predictor: ``serving.backend`` and ``serving.device``, reduced precision on
    GPU, the runtime's CPU threads = the replica's CPUs."""
    from llkd_ray.predictor import load_predictor

    return load_predictor(
        model_dir,
        backend=serving.backend,
        device=serving.device,
        half_on_gpu=True,
        threads=max(1, int(serving.num_cpus)),
        max_length=serving.max_length,
    )


def describe_model(predictor: "Predictor", model_dir: str) -> dict[str, Any]:
    """The ``model`` block of every answer: name, architecture, labels count, length limit, runtime,
    device, weight dtype."""
    return {"name": Path(model_dir).name, **predictor.describe()}


class ModelHost:
    """A replica's predictor on its one model thread: the load first, then every batch, in order
    (so forward passes never compete, and a request sent while loading waits for the model)."""

    def __init__(self, model_dir: str, serving: ServingConfig) -> None:
        self.model_dir, self.serving = model_dir, serving
        self.predictor: Predictor | None = None
        self.info: dict[str, Any] = {}
        self.num_parameters = 0
        self.load_error: str | None = None
        self.training_summary: dict[str, Any] | None = None
        self.batches, self.forward_seconds = 0, 0.0
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llkd-model")
        self._thread.submit(self._load, os.environ.get(LOAD_GATE_ENV))

    def _load(self, gate: str | None) -> None:
        started = time.perf_counter()
        try:
            while gate and not os.path.exists(gate):
                time.sleep(0.05)
            self.training_summary = read_training_summary(self.model_dir)
            predictor = replica_predictor(self.model_dir, self.serving)
            self.info = describe_model(predictor, self.model_dir)
            self.num_parameters = predictor.num_parameters
            self.predictor = predictor
            logger.info(
                "llkd: loaded %s (%s labels, %s) in %.1fs",
                self.model_dir,
                len(predictor.labels),
                predictor.device,
                time.perf_counter() - started,
            )
        except Exception as error:
            self.load_error = f"{type(error).__name__}: {error}"
            logger.exception("llkd: loading %s failed", self.model_dir)

    def ready(self) -> "Predictor":
        """The predictor, or the documented 503 while it loads or when loading failed."""
        if self.predictor is None:
            if self.load_error:
                raise ApiError(503, "model_unavailable", f"model failed to load: {self.load_error}")
            raise ApiError(503, "loading", "the model is still loading; retry shortly", {"Retry-After": "1"})
        return self.predictor

    def _forward(self, texts: list[str]) -> tuple["torch.Tensor", list[bool]]:
        predictor = self.ready()  # on the model thread, after the load: loading is over
        started = time.perf_counter()
        result = predictor.probabilities(texts)
        self.batches += 1
        self.forward_seconds += time.perf_counter() - started
        return result

    async def probabilities(self, texts: list[str]) -> tuple["torch.Tensor", list[bool]]:
        """Probabilities and truncation flags of ``texts``, computed on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._forward, texts)


class Usage:
    """What a replica classified: the counters ``/v1/model`` shows and the Prometheus counters."""

    def __init__(self) -> None:
        self.requests = self.texts = self.truncated = 0
        self._texts = Counter("llkd_texts_classified", description="Texts classified by the student.")
        self._truncated = Counter("llkd_texts_truncated", description="Texts cut to the model's max length.")

    def record(self, predictions: list[dict[str, Any]]) -> int:
        """Count one answered request; returns how many of its texts were truncated."""
        cut = sum(1 for p in predictions if p["truncated"])
        self.requests += 1
        self.texts += len(predictions)
        self.truncated += cut
        self._texts.inc(len(predictions))
        if cut:
            self._truncated.inc(cut)
        return cut


# --------------------------------------------------------------------------- dependencies

_bearer = HTTPBearer(auto_error=False, description="The token in the variable named by serving.auth_token_env.")


async def _replica() -> Any:
    """The :class:`Classifier` instance serving this request (Serve's class-based view)."""
    return serve.get_replica_context().servable_object


async def authorized(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    replica: Annotated[Any, Depends(_replica)],
) -> None:
    """The bearer check; it reads headers only, so it runs before anything reads the body."""
    replica.auth.check(credentials)


async def classify_body(
    request: Request, _auth: Annotated[None, Depends(authorized)], replica: Annotated[Any, Depends(_replica)]
) -> ClassifyRequest:
    """The validated classify body, read only once the client is authorized."""
    return await replica.reader.read(request)


# --------------------------------------------------------------------------- the deployment


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class Classifier:
    """One replica: routes and batching over the parts above."""

    def __init__(self, model_dir: str, serving: dict[str, Any], auth_digest: str | None = None) -> None:
        self.serving = ServingConfig.model_validate(serving)
        self.auth = BearerAuth.for_replica(auth_digest, self.serving.auth_token_env)
        self.reader = RequestReader(self.serving)
        self.usage = Usage()
        self._predict_batch.set_max_batch_size(self.serving.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.serving.batch_wait_timeout_s)
        self.host = ModelHost(model_dir, self.serving)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._in_flight = 0  # classify requests inside _predict

    def check_health(self) -> None:
        """Serve replaces a replica whose model failed to load."""
        if self.host.load_error:
            raise RuntimeError(f"model failed to load: {self.host.load_error}")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, texts: list[str]) -> list[tuple["torch.Tensor", bool, int]]:
        probabilities, truncated = await self.host.probabilities(texts)
        return [(row, cut, len(texts)) for row, cut in zip(probabilities, truncated, strict=True)]

    async def _predict(self, texts: list[str]) -> tuple["torch.Tensor", list[bool], list[int]]:
        """Probabilities, truncation flags and the forward pass's size of each text, in order."""
        import torch

        # A request that finds the replica idle runs at once: waiting batch_wait_timeout_s for company
        # that is not coming would only add latency (at concurrency 1, 10 ms to a 4-20 ms forward).
        alone = self._in_flight == 0 and len(texts) <= self.serving.max_batch_size
        self._in_flight += 1
        try:
            if not self.serving.batching or alone:
                probabilities, truncated = await self.host.probabilities(texts)
                return probabilities, truncated, [len(texts)] * len(texts)
            results = await asyncio.gather(*(self._predict_batch(text) for text in texts))
        finally:
            self._in_flight -= 1
        return torch.stack([row for row, _, _ in results]), [cut for _, cut, _ in results], [n for *_, n in results]

    # -- routes

    @api.get("/healthz")
    def healthz(self):
        """200 once the model is loaded; 503 while it loads or when loading failed (no token needed)."""
        if self.host.predictor is not None:
            return JSONResponse({"status": "ok", "model": self.host.info["name"]})
        if self.host.load_error:
            return JSONResponse({"status": "error", "error": self.host.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})

    @api.get("/v1/model")
    def model_info(self, _auth: Annotated[None, Depends(authorized)]):
        """Labels, model metadata, serving settings and the training summary (when present)."""
        predictor, host, usage = self.host.ready(), self.host, self.usage
        stats = {
            "requests": usage.requests,
            "texts": usage.texts,
            "truncated": usage.truncated,
            "batches": host.batches,
            "forward_seconds": host.forward_seconds,
            "mean_batch_size": round(usage.texts / host.batches, 2) if host.batches else None,
        }
        serving = self.serving.model_dump(
            include={"max_batch_size", "batch_wait_timeout_s", "batching", "max_texts_per_request", "max_chars"}
        )
        return {
            **host.info,
            "labels": predictor.labels,
            "num_parameters": host.num_parameters,
            "replica": self.replica,
            "auth": self.auth.enabled,
            "serving": serving,
            "stats": stats,
            "training_summary": host.training_summary,
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
    async def classify(self, body: Annotated[ClassifyRequest, Depends(classify_body)]):
        """Classify ``texts`` (or one ``text``); predictions come back in request order."""
        started = time.perf_counter()
        probabilities, truncated, sizes = await self._predict(body.inputs)  # waits while the model loads
        predictions = self.host.ready().postprocess(probabilities, truncated, top_k=body.top_k)
        logger.info(
            "classify texts=%d truncated=%d batch_sizes=%s latency_ms=%.1f",
            len(predictions),
            self.usage.record(predictions),
            sorted(set(sizes)),
            1000 * (time.perf_counter() - started),
        )
        return {"model": self.host.info, "predictions": predictions}


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
    on_gpu = serving.device == "cuda" or (serving.device == "auto" and cluster_gpus > 0)
    if num_gpus == 0 and on_gpu and serving.backend != "onnx":  # ONNX Runtime runs on the CPUs
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
    serving = load_serving_config(parsed.config, updates=parsed.serving)
    return _application(check_model_dir(parsed.model, serving.backend), serving)


def _application(
    model_dir: str, serving: ServingConfig, replica_env: dict[str, str] | None = None
) -> serve.Application:
    """The bound deployment; ``replica_env`` (tests only, e.g. :data:`LOAD_GATE_ENV`) goes into the
    replicas' ``runtime_env``. ``serving.backend: auto`` is resolved here, from the directory."""
    from llkd_ray.predictor import detect_backend

    serving = _updated(serving, {"backend": detect_backend(model_dir, serving.backend)})
    token = os.environ.get(serving.auth_token_env)
    options = deployment_options(serving, _cluster_gpus())
    if replica_env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(replica_env)}
    digest = token_digest(token) if token else None
    return Classifier.options(**options).bind(model_dir, serving.model_dump(mode="json"), digest)


# --------------------------------------------------------------------------- llkd serve


def _local_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


#: Statuses a client should retry ``/v1/classify`` on (it has no side effects): a replica that died
#: mid-request (500 from the proxy), Serve's request timeout (408) or back-pressure (429/503, with
#: Retry-After), no replica available (503), a gateway in front (502/504).
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def retry_after_s(response: httpx.Response) -> float | None:
    """The server's ``Retry-After`` in seconds (a number or an HTTP date), None when absent."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """The client retry policy of docs/serving.md: connection errors and :data:`RETRY_STATUSES`,
    exponential backoff from ``first_delay_s`` doubling up to ``max_delay_s`` (or the server's
    ``Retry-After``, capped the same), at most ``attempts`` tries; other statuses are final."""

    attempts: int = 8
    first_delay_s: float = 0.2
    max_delay_s: float = 5.0
    statuses: frozenset[int] = RETRY_STATUSES
    sleep: Callable[[float], None] = time.sleep

    def delay_s(self, attempt: int, response: httpx.Response | None = None) -> float:
        """How long to wait after the failed try number ``attempt`` (0-based)."""
        asked = retry_after_s(response) if response is not None else None
        return min(self.first_delay_s * 2**attempt if asked is None else asked, self.max_delay_s)

    def send(self, client: httpx.Client, request: httpx.Request) -> httpx.Response:
        """``request`` until it gets a final answer (returned, whatever its status) or the tries
        run out (LlkdError naming the last failure)."""
        last = ""
        for attempt in range(self.attempts):
            response = None
            try:
                response = client.send(request)
                if response.status_code not in self.statuses:
                    return response
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.TransportError as error:  # refused, reset, timed out, truncated body
                last = f"{type(error).__name__}: {error}"
            if attempt + 1 < self.attempts:
                self.sleep(self.delay_s(attempt, response))
        raise LlkdError(f"{request.method} {request.url} failed after {self.attempts} attempts (last: {last})")


def _client(timeout_s: float) -> httpx.Client:
    """An httpx client whose transport also retries a failed connect once, at once (httpx's own)."""
    return httpx.Client(timeout=timeout_s, transport=httpx.HTTPTransport(retries=1))


def classify(
    url: str,
    texts: Sequence[str],
    *,
    top_k: int | None = None,
    token: str | None = None,
    attempts: int = 8,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Client for ``POST url/v1/classify`` with the retry policy of docs/serving.md (:class:`RetryPolicy`).

    A final 4xx raises :class:`LlkdError` with the server's message.
    """
    payload: dict[str, Any] = {"texts": list(texts)}
    if top_k is not None:
        payload["top_k"] = top_k
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with _client(timeout_s) as client:
        request = client.build_request("POST", f"{url}/v1/classify", json=payload, headers=headers)
        response = RetryPolicy(attempts=attempts).send(client, request)
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    raise LlkdError(f"classify failed with HTTP {response.status_code}: {message}")


def wait_until_ready(url: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """Poll ``GET url/healthz`` until it answers 200; raise LlkdError when loading failed or timed out."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with _client(5.0) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"{url}/healthz")
            except httpx.TransportError as error:
                last = f"{type(error).__name__}: {error}"
            else:
                if response.is_success:
                    return response.json()
                try:
                    body = response.json()
                except ValueError:
                    body = {}
                if isinstance(body, dict) and body.get("status") == "error":
                    raise LlkdError(f"the model failed to load: {body.get('error')}")
                last = f"HTTP {response.status_code} {body or ''}".strip()
            time.sleep(0.5)
    raise LlkdError(f"{url}/healthz not ready after {timeout_s:.0f}s (last: {last})")


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


#: Ray's switch for its HAProxy ingress (ray[serve] ships the binary on Linux); read when Ray starts.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def _ingress() -> str:
    if os.environ.get(HAPROXY_ENV) == "1":
        return f"ingress: HAProxy ({HAPROXY_ENV}=1)"
    return (
        f"ingress: Serve's Python proxy; {HAPROXY_ENV}=1 in the environment before Ray starts selects Ray's "
        "HAProxy ingress (1.5-2x the requests/s here, docs/serving.md)"
    )


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
    model_dir = check_model_dir(model, serving.backend)
    remote = bool(os.environ.get("RAY_ADDRESS"))
    if not remote and not _port_free(serving.host, serving.port):
        raise LlkdError(f"port {serving.port} on {serving.host} is in use: pick another with --port")
    started_ray = not ray.is_initialized()
    init_ray()
    previous = _interrupt_on_signals()
    try:
        serve.start(http_options={"host": serving.host, "port": serving.port})
        serve.run(
            _application(model_dir, serving),  # checked above: build_app would check (and open) it again
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
        if not remote:
            print(f"llkd serve: {_ingress()}", flush=True)
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
