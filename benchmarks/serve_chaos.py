"""Serving under replica kills: answered, failed and retried requests, with the client's retries on and off.

    python benchmarks/serve_chaos.py [--model DIR] [--replicas 2] [--duration 300] [--kill-every 20]
                                     [--concurrency 8] [--seed 0] [--output serve_chaos.json]

A local Ray and Serve on a free loopback port, ``--replicas`` fixed replicas of the student
(default: an untrained MiniLM classifier, as ``serve_load.py`` builds it). Two phases of
``--duration`` seconds each, one with the client retry policy of ``llkd_ray.serve.client``
(:class:`~llkd_ray.serve.client.RetryPolicy`, 8 tries) and one with a single try: a closed loop
of ``--concurrency`` clients sends one-text requests while every ~``--kill-every`` s (seeded) a
random replica process of this run is SIGKILLed (Serve starts a new one). Reported per phase:
requests answered, failed, retried (tries after the first), replicas killed, p50 and p99 latency
of the answered requests (retries included). Signals go only to replica processes of the Ray this
script started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import _free_port, _percentile, _texts, build_minilm_classifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: What Ray titles a Serve replica's process: ``ray::ServeReplica:APP:DEPLOYMENT``.
REPLICA_MARK = "ServeReplica:"


def replica_processes() -> list[int]:
    """Serve replica processes among this process's descendants (the local Ray it started)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if REPLICA_MARK in " ".join(child.cmdline()):
                found.append(child.pid)
    return found


def load_phase(url: str, texts: list[str], args: argparse.Namespace, retries: bool) -> dict[str, Any]:
    """``--duration`` s of a closed loop of ``--concurrency`` clients while replicas are killed."""
    import httpx

    from llkd_ray.serve.client import RetryPolicy

    stop = threading.Event()
    lock = threading.Lock()
    totals = {"answered": 0, "failed": 0, "retried": 0}
    latencies: list[float] = []
    errors: dict[str, int] = {}

    def client(worker: int) -> None:
        retried = 0

        def sleep(seconds: float) -> None:
            nonlocal retried
            retried += 1
            time.sleep(seconds)

        policy = RetryPolicy(attempts=8 if retries else 1, sleep=sleep)
        with httpx.Client(timeout=30.0) as http:
            sent = worker
            while not stop.is_set():
                request = http.build_request("POST", f"{url}/v1/classify", json={"texts": [texts[sent % len(texts)]]})
                sent += args.concurrency
                started, retried = time.perf_counter(), 0
                try:
                    ok = policy.send(http, request).status_code == 200
                    error = None if ok else "status"
                except Exception as failure:  # the policy's last failure, or a status it does not retry
                    ok, error = False, type(failure).__name__
                with lock:
                    totals["retried"] += retried
                    if ok:
                        totals["answered"] += 1
                        latencies.append(time.perf_counter() - started)
                    else:
                        totals["failed"] += 1
                        errors[error] = errors.get(error, 0) + 1

    rng = random.Random(args.seed)
    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.concurrency)]
    for worker in workers:
        worker.start()
    started = time.monotonic()
    kills = 0
    next_kill = started + rng.uniform(0.5, 1.5) * args.kill_every
    while (now := time.monotonic()) - started < args.duration:
        if now >= next_kill and (replicas := replica_processes()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(sorted(replicas)), signal.SIGKILL)
                kills += 1
            next_kill = now + rng.uniform(0.5, 1.5) * args.kill_every
        time.sleep(0.2)
    stop.set()
    for worker in workers:
        worker.join(timeout=60)
    seconds = time.monotonic() - started
    return {
        "retries": "on (8 tries)" if retries else "off (1 try)",
        "seconds": round(seconds, 1),
        "replicas_killed": kills,
        **totals,
        "errors": errors,
        "answered_per_s": round(totals["answered"] / seconds, 2),
        "p50_ms": round(1000 * _percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(1000 * _percentile(latencies, 99), 1) if latencies else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="torch student directory (default: untrained MiniLM classifier)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of each phase (retries on, off)")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between replica kills (~)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from llkd_ray.serve.app import ServeArgs, build_app
    from llkd_ray.serve.client import wait_until_ready

    texts = _texts(872)
    phases = []
    with tempfile.TemporaryDirectory(prefix="llkd-serve-chaos-") as scratch:
        model = args.model or build_minilm_classifier(Path(scratch) / "minilm", ["negative", "positive"])
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serving = {
                "min_replicas": args.replicas,
                "max_replicas": args.replicas,
                "num_cpus": max(0.1, (os.cpu_count() or 1) / (args.replicas + 1)),
                "device": "cpu",
            }
            serve.run(build_app(ServeArgs(model=str(model), serving=serving)), name="chaos", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            wait_until_ready(url, 300)
            for retries in (True, False):
                phases.append(load_phase(url, texts, args, retries))
                print(json.dumps(phases[-1]), flush=True)
                wait_until_ready(url, 300)  # every replica back before the next phase
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\n{'retries':>14} {'killed':>6} {'answered':>8} {'failed':>6} {'retried':>7} {'p50 ms':>7} {'p99 ms':>8}")
    for p in phases:
        print(
            f"{p['retries']:>14} {p['replicas_killed']:>6} {p['answered']:>8} {p['failed']:>6} {p['retried']:>7} "
            f"{p['p50_ms'] or 0:>7.1f} {p['p99_ms'] or 0:>8.1f}"
        )
    summary = {
        "replicas": args.replicas,
        "duration_s": args.duration,
        "kill_every_s": args.kill_every,
        "concurrency": args.concurrency,
        "cpus": os.cpu_count(),
        "phases": phases,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
