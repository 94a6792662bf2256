"""The HTTP contract of a replica: request models, the documented error bodies, bearer auth.

FastAPI and pydantic only (no Ray): what a request may hold and what a client is told when it is
wrong — ``{"error": {"code", "message"}}`` with a 4xx naming the problem, never a 500. The routes
themselves live on the deployment (:class:`llkd_ray.serve.app.Classifier`), which mounts :data:`api`
as its ingress; docs/serving.md documents every status and code raised here.
"""

import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from llkd_ray.config import ServingConfig

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


# --------------------------------------------------------------------------- auth and the request body


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
