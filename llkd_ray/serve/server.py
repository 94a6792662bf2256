"""``llkd serve``: Serve on this machine (or on the cluster in ``RAY_ADDRESS``) until interrupted.

Process plumbing around the application of :mod:`llkd_ray.serve.app`: the port check, the
ingress in use (Serve's Python proxy or Ray's HAProxy, :data:`HAPROXY_ENV`), SIGINT/SIGTERM as a
clean stop, and Serve's shutdown at the end.
"""

import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve

from llkd_ray.config import PipelineConfig, ServingConfig
from llkd_ray.errors import LlkdError
from llkd_ray.serve.app import _application, _updated, check_model_dir, load_serving_config
from llkd_ray.serve.client import wait_until_ready

#: The Serve application name ``llkd serve`` runs under (deleted at the end on a cluster).
APP_NAME = "llkd"


def _local_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
        "HAProxy ingress (more requests/s on small CPU hosts, docs/serving.md)"
    )


def run_server(
    model: str | Path,
    config: PipelineConfig | ServingConfig | str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    host: str | None = None,
    port: int | None = None,
    ready_timeout_s: float = 600.0,
    log_dir: Path | None = None,
) -> int:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM), then shut Serve down; returns 0.

    Starts a local Ray unless ``RAY_ADDRESS`` names a cluster (or Ray is already initialised). On a
    cluster only this application is deleted at the end; locally Serve is shut down. ``log_dir``
    takes Ray's own INFO logs off the console (:mod:`llkd_ray.console`).
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
    init_ray(log_dir=log_dir)
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
