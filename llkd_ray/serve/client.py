"""The client side of the HTTP API: ``classify`` with the retry policy of docs/serving.md, readiness.

Plain ``httpx``, no Ray and no FastAPI: what ``llkd serve`` waits with, what the tests and the load
benchmark call, and the reference for any other client (which statuses to retry, how long to wait).
"""

import email.utils
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from llkd_ray.errors import LlkdError

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
