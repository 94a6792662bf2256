"""Load benchmark of the Serve student API: batching on vs off, and Serve vs the bare forward pass.

Bounded load on 127.0.0.1 only: a local Ray and Serve on a free loopback port, a closed loop of C
concurrent clients (C = 1, 8, 32 by default) each sending one-text requests until the level's
request budget or time cap is spent, first with dynamic batching on, then off. Then the same
texts go through the bare model (tokenise + forward, no HTTP, no Serve) in the batch sizes the
replica actually formed, to show what Serve adds. Stops by itself.

    python benchmarks/serve_load.py                       # untrained MiniLM classifier (builtin:minilm)
    python benchmarks/serve_load.py --model RUN/train/student --output serve_load.json

Reports requests/s, p50/p99 latency per level, mean batch size and the replica's forward time,
and the batching on/off ratio at the highest concurrency (target: >= 3x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _texts(n: int) -> list[str]:
    lines = (resources.files("llkd_ray") / "builtin" / "sst2" / "test.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def build_minilm_classifier(directory: Path, labels: list[str]) -> Path:
    """An untrained MiniLM sequence classifier (fresh head) saved with its labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llkd_ray.models import resolve_model_path

    source = resolve_model_path("builtin:minilm")
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    model.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(directory)
    return directory


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def _load(url: str, texts: list[str], concurrency: int, max_requests: int, max_seconds: float) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients, one request in flight each, until the budget is spent."""
    import aiohttp

    latencies: list[float] = []
    failures = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal issued, failures
        while issued < max_requests and time.perf_counter() < deadline:
            text = texts[issued % len(texts)]
            issued += 1
            started = time.perf_counter()
            async with session.post(f"{url}/v1/classify", json={"texts": [text]}) as response:
                await response.read()
                if response.status != 200:
                    failures += 1
                    continue
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failures": failures,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * _percentile(latencies, 50), 2),
        "p99_ms": round(1000 * _percentile(latencies, 99), 2),
    }


def _stats(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/model", timeout=30) as response:
        return json.loads(response.read())["stats"]


def serve_levels(model_dir: Path, texts: list[str], args: argparse.Namespace, batching: bool) -> list[dict[str, Any]]:
    from ray import serve

    from llkd_ray.serve import ServeArgs, build_app, wait_until_ready

    serving = {
        "batching": batching,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "num_cpus": args.replica_cpus,
        "max_ongoing_requests": max(args.concurrency) * 2,
    }
    serve.run(build_app(ServeArgs(model=str(model_dir), serving=serving)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    wait_until_ready(url, 300)
    asyncio.run(_load(url, texts, 4, 40, 30))  # warm-up
    levels = []
    for concurrency in args.concurrency:
        before = _stats(url)
        result = asyncio.run(_load(url, texts, concurrency, args.requests, args.seconds))
        after = _stats(url)
        batches = after["batches"] - before["batches"]
        result["batching"] = batching
        result["mean_batch_size"] = round((after["texts"] - before["texts"]) / batches, 2) if batches else None
        result["forward_s"] = round(after["forward_seconds"] - before["forward_seconds"], 3)
        result["forward_ms_per_batch"] = round(1000 * result["forward_s"] / batches, 2) if batches else None
        result["forward_share"] = round(result["forward_s"] / result["seconds"], 3)
        levels.append(result)
        print(json.dumps(result), flush=True)
    serve.delete("bench")
    return levels


def bare_forward(
    model_dir: Path, texts: list[str], batch_sizes: list[int], cpus: float, max_seconds: float
) -> dict[int, dict[str, float]]:
    """The model alone (tokenise + forward), on the replica's thread count, per batch size."""
    from llkd_ray.config import ServingConfig
    from llkd_ray.serve import load_predictor

    model = load_predictor(str(model_dir), ServingConfig(num_cpus=cpus, device="cpu"))
    model.probabilities(texts[:8])  # warm-up
    results = {}
    for size in sorted(set(batch_sizes)):
        durations = []
        deadline = time.perf_counter() + max_seconds
        offset = 0
        while time.perf_counter() < deadline and len(durations) < 400:
            batch = [texts[(offset + i) % len(texts)] for i in range(size)]
            offset += size
            started = time.perf_counter()
            model.probabilities(batch)
            durations.append(time.perf_counter() - started)
        per_batch = statistics.median(durations)
        results[size] = {"batch_ms": round(1000 * per_batch, 2), "texts_per_s": round(size / per_batch, 2)}
        print(json.dumps({"bare_batch_size": size, **results[size]}), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: untrained MiniLM classifier)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="request budget per level")
    parser.add_argument("--seconds", type=float, default=25.0, help="time cap per level")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (torch threads) of the one replica")
    parser.add_argument("--output", default=None, help="write all figures as JSON here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    texts = _texts(872)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="llkd-serve-bench-") as scratch:
        model_dir = (
            Path(args.model)
            if args.model
            else build_minilm_classifier(Path(scratch) / "minilm-classifier", ["negative", "positive"])
        )
        args.port = _free_port()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            levels = serve_levels(model_dir, texts, args, batching=True)
            levels += serve_levels(model_dir, texts, args, batching=False)
        finally:
            serve.shutdown()
            ray.shutdown()
        sizes = sorted({max(1, round(level["mean_batch_size"] or 1)) for level in levels})
        bare = bare_forward(model_dir, texts, sizes, args.replica_cpus, args.seconds / 2)

    load_after = os.getloadavg()
    print(
        f"\n{'batching':>8} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} "
        f"{'fwd ms/batch':>12} {'fwd share':>9} {'bare texts/s':>12} {'Serve/bare':>10}"
    )
    for level in levels:
        size = max(1, round(level["mean_batch_size"] or 1))
        level["bare_texts_per_s"] = bare[size]["texts_per_s"]
        level["serve_over_bare"] = round(level["requests_per_s"] / bare[size]["texts_per_s"], 3)
        print(
            f"{'on' if level['batching'] else 'off':>8} {level['concurrency']:>4} {level['requests_per_s']:>8.1f} "
            f"{level['p50_ms']:>8.1f} {level['p99_ms']:>8.1f} {level['mean_batch_size'] or 0:>6.1f} "
            f"{level['forward_ms_per_batch'] or 0:>12.1f} {level['forward_share']:>9.2f} "
            f"{level['bare_texts_per_s']:>12.1f} {level['serve_over_bare']:>10.2f}"
        )
    top = max(args.concurrency)
    on = next(level for level in levels if level["batching"] and level["concurrency"] == top)
    off = next(level for level in levels if not level["batching"] and level["concurrency"] == top)
    ratio = on["requests_per_s"] / off["requests_per_s"]
    single = next((level for level in levels if level["batching"] and level["concurrency"] == 1), None)
    print(
        f"\nbatching on / off at concurrency {top}: {ratio:.2f}x requests/s (target >= 3x: "
        f"{'met' if ratio >= 3 else 'not met'})"
    )
    if single and single["forward_ms_per_batch"]:
        print(
            f"Serve overhead at concurrency 1: p50 {single['p50_ms']:.1f} ms per request, of which the forward "
            f"pass in the replica took {single['forward_ms_per_batch']:.1f} ms (HTTP + proxy + routing + "
            f"validation: {single['p50_ms'] - single['forward_ms_per_batch']:.1f} ms); bare forward of one text "
            f"run separately: {bare.get(1, {}).get('batch_ms', float('nan')):.1f} ms"
        )
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    summary = {
        "machine": {
            "cpus": os.cpu_count(),
            "replica_cpus": args.replica_cpus,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "levels": levels,
        "bare_forward": {str(k): v for k, v in bare.items()},
        "batching_ratio_at_top_concurrency": round(ratio, 3),
    }
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
