"""The Ray Serve deployment of a student classifier and the application builder ``serve`` runs.

Three ways in, one deployment:

* ``llkd serve --model DIR`` (:func:`llkd_ray.serve.server.run_server`) starts Serve on this
  machine (or joins the cluster in ``RAY_ADDRESS``), waits until the model is loaded and blocks
  until interrupted;
* ``serve run llkd_ray.serve.app:build_app model=DIR [config=C]`` builds the same application;
* ``serve deploy deploy/serve_config.yaml`` deploys it on a cluster (``import_path`` is
  ``llkd_ray.serve.app:build_app``).

The HTTP API (FastAPI ingress, see docs/serving.md):

* ``POST /v1/classify`` ``{"texts": [...]}`` or ``{"text": "..."}``, optional ``top_k`` →
  ``{"model": {...}, "predictions": [{"label", "score", "scores", "truncated"}]}``;
* ``GET /healthz`` 200 once the model is loaded, 503 before (never needs a token);
* ``GET /v1/model`` labels, model metadata, the training summary when there is one.

A replica is small parts wired by FastAPI dependencies: :class:`~llkd_ray.serve.api.BearerAuth`
(the optional token, through ``HTTPBearer``), :class:`~llkd_ray.serve.api.RequestReader` (the
body, validated by a pydantic model whose field constraints are the replica's limits; the request
models and error bodies are :mod:`llkd_ray.serve.api`), :class:`ModelHost` (the
:class:`~llkd_ray.student.predictor.Predictor` on its one model thread), :class:`Usage` (counters)
and :class:`Classifier` (routes and ``@serve.batch``: one text per batch item, so a batch is at
most ``serving.max_batch_size`` texts).
"""

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.metrics import Counter

from llkd_ray.artifacts import training_summary_file
from llkd_ray.config import ServingConfig, _apply_override, load_config
from llkd_ray.errors import ConfigError, LlkdError
from llkd_ray.serve.api import (
    ApiError,
    BearerAuth,
    ClassifyRequest,
    RequestReader,
    _location,
    api,
    token_digest,
)

if TYPE_CHECKING:
    import torch

    from llkd_ray.student.predictor import Predictor

DEPLOYMENT_NAME = "Classifier"
#: Test-only: a replica waits until the file this names exists before loading its model, so that
#: "loading" can be observed for as long as a test needs. Read from the replica's own environment
#: (tests set it in the replicas' runtime_env).
LOAD_GATE_ENV = "LLKD_SERVE_TEST_LOAD_GATE"

logger = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------- the replica's parts


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
    from llkd_ray.serve.backends import ONNX_FILE, detect_backend, onnx_session

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
    from llkd_ray.serve.backends import load_predictor

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
        # that is not coming would only add latency, of the order of a small model's forward pass.
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
    """Arguments of :func:`build_app` (``serve run llkd_ray.serve.app:build_app model=DIR``)."""

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
    """Serve application builder: ``serve run llkd_ray.serve.app:build_app model=DIR [config=C]``."""
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
    from llkd_ray.serve.backends import detect_backend

    serving = _updated(serving, {"backend": detect_backend(model_dir, serving.backend)})
    token = os.environ.get(serving.auth_token_env)
    options = deployment_options(serving, _cluster_gpus())
    if replica_env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(replica_env)}
    digest = token_digest(token) if token else None
    return Classifier.options(**options).bind(model_dir, serving.model_dump(mode="json"), digest)
