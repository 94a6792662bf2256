"""Load benchmark of the Serve student API: torch fp32, ONNX fp32 and ONNX int8 replicas in one run.

The student (``--model``, a torch directory; default an untrained MiniLM classifier) is exported
by ``llkd export`` to ONNX fp32 and int8 (checked against torch on ``--gold`` when given). Then:

1. **Bare runtime** — each variant's predictor (tokenise + forward + softmax, the path a replica
   runs, no HTTP) on ``--replica-cpus`` threads: texts/s per core at batch 1 and 32.
2. **Through Serve** — one replica of each variant on a local Ray and Serve bound to a free
   loopback port; a closed loop of C concurrent clients (C = 1, 8, 32) each sending one-text
   requests until the level's request budget or time cap is spent: req/s, p50/p99 latency, the
   batches the replica formed and its forward time.

Reported ratios (targets of docs/serving.md): ONNX int8 / torch fp32 texts/s per core at batch 1
and 32 (>= 2), int8 / torch req/s at concurrency 32 (>= 1.8), and Serve's overhead per request at
concurrency 1 against the bare forward of one text (<= 20 %). Stops by itself.

    python benchmarks/serve_load.py                                   # untrained MiniLM classifier
    python benchmarks/serve_load.py --model RUN/train/student --gold builtin:sst2/test --output serve_load.json
    python benchmarks/serve_load.py --batching-off                    # also torch with batching off
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

VARIANTS = ("torch fp32", "onnx fp32", "onnx int8")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _texts(n: int) -> list[str]:
    lines = (resources.files("llkd_ray") / "builtin" / "sst2" / "test.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def build_minilm_classifier(directory: Path, labels: list[str]) -> Path:
    """An untrained MiniLM sequence classifier (fresh head) saved with its labels, at length 64."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llkd_ray.student.model import resolve_model_path, save_classifier

    source = resolve_model_path("builtin:minilm")
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    save_classifier(model, AutoTokenizer.from_pretrained(source), directory, 64)
    return directory


def export_variants(model_dir: Path, scratch: Path, gold: str | None) -> dict[str, Path]:
    """The student and its two exports, with the exporter's accuracy check printed."""
    from llkd_ray.serve.export import export_onnx, read_gold_set

    gold_set = read_gold_set(model_dir, gold) if gold else None  # Ray is up (main)
    variants = {"torch fp32": model_dir}
    for quantize in (None, "int8"):
        result = export_onnx(model_dir, scratch / f"onnx-{quantize or 'fp32'}", quantize=quantize, gold=gold_set)
        print(result.summary(), flush=True)
        variants[result.kind] = Path(result.output)
    return variants


def bare_runtime(
    model_dir: Path, texts: list[str], batch_sizes: list[int], threads: int, max_seconds: float
) -> dict[int, dict[str, float]]:
    """One variant's predictor alone (tokenise + forward, as the replica runs it) per batch size."""
    from llkd_ray.serve.backends import load_predictor

    predictor = load_predictor(model_dir, device="cpu", threads=threads)
    predictor.probabilities(texts[:32])  # warm-up
    results = {}
    for size in sorted(set(batch_sizes)):
        durations = []
        deadline = time.perf_counter() + max_seconds
        offset = 0
        while time.perf_counter() < deadline and len(durations) < 400:
            batch = [texts[(offset + i) % len(texts)] for i in range(size)]
            offset += size
            started = time.perf_counter()
            predictor.probabilities(batch)
            durations.append(time.perf_counter() - started)
        per_batch = statistics.median(durations)
        results[size] = {"batch_ms": round(1000 * per_batch, 2), "texts_per_s": round(size / per_batch, 2)}
    return results


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def _load(
    url: str, texts: list[str], concurrency: int, max_requests: int, max_seconds: float, healthz: bool = False
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients, one request in flight each, until the budget is spent
    (``healthz``: ``GET /healthz`` instead, the same HTTP path and replica without the model)."""
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
            if healthz:
                request = session.get(f"{url}/healthz")
            else:
                request = session.post(f"{url}/v1/classify", json={"texts": [text]})
            async with request as response:
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


def serve_levels(
    variant: str, model_dir: Path, texts: list[str], args: argparse.Namespace, batching: bool = True
) -> list[dict[str, Any]]:
    """One replica of ``variant`` through Serve at each concurrency level."""
    from ray import serve

    from llkd_ray.serve.app import ServeArgs, build_app
    from llkd_ray.serve.client import wait_until_ready

    serving = {
        "batching": batching,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "num_cpus": args.replica_cpus,
        "max_ongoing_requests": max(args.concurrency) * 2,
        "device": "cpu",
    }
    serve.run(build_app(ServeArgs(model=str(model_dir), serving=serving)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    wait_until_ready(url, 300)
    asyncio.run(_load(url, texts, 4, 40, 30))  # warm-up
    floor = asyncio.run(_load(url, texts, 1, args.requests, args.seconds / 2, healthz=True))
    print(json.dumps({"variant": variant, "healthz": floor}), flush=True)
    levels = []
    for concurrency in args.concurrency:
        before = _stats(url)
        result = asyncio.run(_load(url, texts, concurrency, args.requests, args.seconds))
        after = _stats(url)
        batches = after["batches"] - before["batches"]
        result = {"variant": variant, "batching": batching, **result, "healthz_p50_ms": floor["p50_ms"]}
        result["mean_batch_size"] = round((after["texts"] - before["texts"]) / batches, 2) if batches else None
        result["forward_s"] = round(after["forward_seconds"] - before["forward_seconds"], 3)
        result["forward_ms_per_batch"] = round(1000 * result["forward_s"] / batches, 2) if batches else None
        result["forward_share"] = round(result["forward_s"] / result["seconds"], 3)
        levels.append(result)
        print(json.dumps(result), flush=True)
    serve.delete("bench")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="torch student directory (default: untrained MiniLM classifier)")
    parser.add_argument("--gold", default=None, help="gold set for the export's accuracy check, e.g. builtin:sst2/test")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="request budget per level")
    parser.add_argument("--seconds", type=float, default=25.0, help="time cap per level")
    parser.add_argument("--bare-seconds", type=float, default=10.0, help="time cap per bare batch size")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--replica-cpus", type=int, default=1, help="CPUs (runtime threads) of each replica")
    parser.add_argument("--batching-off", action="store_true", help="also serve torch fp32 with batching off")
    parser.add_argument(
        "--ingress",
        choices=("proxy", "haproxy"),
        default="proxy",
        help="Serve's Python proxy (Ray's default) or Ray's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1)",
    )
    parser.add_argument("--output", default=None, help="write all figures as JSON here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from llkd_ray.serve.server import HAPROXY_ENV

    os.environ[HAPROXY_ENV] = "1" if args.ingress == "haproxy" else "0"  # before Ray starts: its processes read it
    texts = _texts(872)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="llkd-serve-bench-") as scratch:
        model_dir = (
            Path(args.model)
            if args.model
            else build_minilm_classifier(Path(scratch) / "minilm-classifier", ["negative", "positive"])
        )
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            variants = export_variants(model_dir, Path(scratch), args.gold)
            bare = {}
            for variant, directory in variants.items():
                bare[variant] = bare_runtime(directory, texts, [1, 32], args.replica_cpus, args.bare_seconds)
                print(json.dumps({"bare": variant, **{str(k): v for k, v in bare[variant].items()}}), flush=True)
            args.port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            levels = []
            for variant, directory in variants.items():
                levels += serve_levels(variant, directory, texts, args)
            if args.batching_off:
                levels += serve_levels("torch fp32", variants["torch fp32"], texts, args, batching=False)
        finally:
            serve.shutdown()
            ray.shutdown()
    load_after = os.getloadavg()

    per_core = args.replica_cpus
    print(f"\ningress: {args.ingress}; bare runtime on {per_core} thread(s), texts/s per core (tokenise + forward)")
    print(f"{'variant':>12} {'batch 1':>9} {'batch 32':>9} {'x torch @1':>10} {'x torch @32':>11} {'1-text ms':>9}")
    base = bare["torch fp32"]
    for variant, sizes in bare.items():
        print(
            f"{variant:>12} {sizes[1]['texts_per_s'] / per_core:>9.1f} {sizes[32]['texts_per_s'] / per_core:>9.1f} "
            f"{sizes[1]['texts_per_s'] / base[1]['texts_per_s']:>10.2f} "
            f"{sizes[32]['texts_per_s'] / base[32]['texts_per_s']:>11.2f} {sizes[1]['batch_ms']:>9.1f}"
        )
    print(
        f"\n{'variant':>12} {'batching':>8} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} "
        f"{'fwd ms/batch':>12} {'fwd share':>9}"
    )
    for level in levels:
        print(
            f"{level['variant']:>12} {'on' if level['batching'] else 'off':>8} {level['concurrency']:>4} "
            f"{level['requests_per_s']:>8.1f} {level['p50_ms']:>8.1f} {level['p99_ms']:>8.1f} "
            f"{level['mean_batch_size'] or 0:>6.1f} {level['forward_ms_per_batch'] or 0:>12.1f} "
            f"{level['forward_share']:>9.2f}"
        )

    def level(variant: str, concurrency: int, batching: bool = True) -> dict[str, Any] | None:
        return next(
            (
                x
                for x in levels
                if x["variant"] == variant and x["concurrency"] == concurrency and x["batching"] == batching
            ),
            None,
        )

    top = max(args.concurrency)
    ratios: dict[str, Any] = {
        "int8_over_torch_bare_batch_1": bare["onnx int8"][1]["texts_per_s"] / base[1]["texts_per_s"],
        "int8_over_torch_bare_batch_32": bare["onnx int8"][32]["texts_per_s"] / base[32]["texts_per_s"],
        "onnx_fp32_over_torch_bare_batch_32": bare["onnx fp32"][32]["texts_per_s"] / base[32]["texts_per_s"],
    }
    torch_top, int8_top = level("torch fp32", top), level("onnx int8", top)
    if torch_top and int8_top:
        ratios[f"int8_over_torch_serve_c{top}"] = int8_top["requests_per_s"] / torch_top["requests_per_s"]
    print()
    for name, target in (("int8_over_torch_bare_batch_1", 2.0), ("int8_over_torch_bare_batch_32", 2.0)):
        print(f"{name}: {ratios[name]:.2f}x (target >= {target:g}: {'met' if ratios[name] >= target else 'not met'})")
    if f"int8_over_torch_serve_c{top}" in ratios:
        ratio = ratios[f"int8_over_torch_serve_c{top}"]
        print(
            f"onnx int8 / torch fp32 req/s at concurrency {top}: {ratio:.2f}x (target >= 1.8: "
            f"{'met' if ratio >= 1.8 else 'not met'})"
        )
    overheads = {}
    for variant in variants:
        single = level(variant, 1)
        if single and single["forward_ms_per_batch"]:
            bare_ms, replica_ms = bare[variant][1]["batch_ms"], single["forward_ms_per_batch"]
            own = (single["p50_ms"] - replica_ms) / bare_ms  # Serve's path: p50 less the replica's forward
            total = (single["p50_ms"] - bare_ms) / bare_ms  # also the forward's slow-down next to the HTTP path
            overheads[variant] = {"serve_path": round(own, 3), "p50_over_bare": round(total, 3)}
            print(
                f"Serve overhead at concurrency 1, {variant}: p50 {single['p50_ms']:.1f} ms per request, of which "
                f"the replica's forward pass {replica_ms:.1f} ms: Serve's path {single['p50_ms'] - replica_ms:.1f} ms "
                f"= {own:.0%} of the bare forward of one text ({bare_ms:.1f} ms; target <= 20 %); p50 / bare "
                f"+{total:.0%}; GET /healthz (same client, ingress and replica, no model) "
                f"{single['healthz_p50_ms']:.1f} ms"
            )
    if args.batching_off:
        on, off = level("torch fp32", top), level("torch fp32", top, batching=False)
        if on and off:
            ratios[f"torch_batching_on_over_off_c{top}"] = on["requests_per_s"] / off["requests_per_s"]
            print(f"torch batching on / off at concurrency {top}: {ratios[f'torch_batching_on_over_off_c{top}']:.2f}x")
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    summary = {
        "machine": {
            "cpus": os.cpu_count(),
            "replica_cpus": args.replica_cpus,
            "ingress": args.ingress,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "bare_runtime": {variant: {str(k): v for k, v in sizes.items()} for variant, sizes in bare.items()},
        "levels": levels,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "serve_overhead_at_concurrency_1": overheads,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
