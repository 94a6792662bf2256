"""Labeling throughput: the Ray Data stage against a plain loop, 2 actors against 1, memory, vLLM vs hf.

    python benchmarks/label_throughput.py [--rows 5000] [--memory-rows 2000] [--llm-rows 2000]
                                          [--skip-vllm] [--output results.json]

Everything runs in one process, on its own local Ray (``--cpus``, default 2), and prints the ratios
measured in this run:

1. **Pipeline efficiency** — the embedding teacher through ``label_corpus`` with one actor vs the
   same teacher (same model, same batches, one CPU thread as the actor gets) in a plain Python loop.
2. **Scale-out** — the same stage with 2 actors vs 1.
3. **Memory** — peak resident memory (the driver and every Ray process it started, summed) while
   labeling 10x the rows vs 1x, each on a fresh Ray; and the driver's own peak.
4. **vLLM vs hf** — both LLM backends on the same tiny random Llama (the test model).

Rates are given two ways: end to end (rows over the whole call, start-up included) and steady
state (rows committed after the first part over the time between the first and the last commit,
read from the parts' modification times; for the loop, the batches after the first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- helpers


def start_ray(cpus: int) -> None:
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False


def stop_ray() -> None:
    import ray

    ray.shutdown()


def sst2_rows() -> list[dict[str, str]]:
    from llkd_ray.corpus import builtin_path

    return [json.loads(line) for line in builtin_path("builtin:sst2/train").read_text().splitlines()]


def write_corpus(path: Path, rows: int) -> Path:
    """``rows`` SST-2 phrases (cycling through the built-in pool), one JSON object a line."""
    pool = sst2_rows()
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": pool[i % len(pool)]["text"]}) + "\n")
    return path


def steady_rate(directory: Path) -> float | None:
    """Rows committed after the first part / time from the first commit to the last."""
    import pyarrow.parquet as pq

    stamps = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in directory.glob("part-*.parquet"))
    if len(stamps) < 3:
        return None
    span = stamps[-1][0] - stamps[0][0]
    return sum(n for _, n in stamps[1:]) / span if span > 0 else None


def run_stage(config, output: Path) -> dict[str, Any]:
    from llkd_ray.label import label_corpus

    started = time.perf_counter()
    result = label_corpus(config, output, overwrite=True)
    wall = time.perf_counter() - started
    rows = result.counts["read"]
    return {
        "rows": rows,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 2),
        "steady_rows_per_s": _round(steady_rate(output)),
        "actors": len(result.manifest["rows_per_actor"]),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


class PeakMemory:
    """Samples the summed RSS of this process and all its descendants (the local Ray it started)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak_total = 0
        self.peak_driver = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = driver = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
        self.peak_total = max(self.peak_total, total)
        self.peak_driver = max(self.peak_driver, driver)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# --------------------------------------------------------------------------- the measurements


def embedding_config(corpus: Path, *overrides: str):
    from llkd_ray.config import load_config

    return load_config(DEMO, [f"data.input={corpus}", "data.label_column=null", *overrides])


def plain_loop(config, batch_size: int) -> dict[str, Any]:
    """The same teacher in this process, one thread (as a 1-CPU actor), over the same batches."""
    import torch

    from llkd_ray.teachers import EmbeddingTeacher, check_teacher

    torch.set_num_threads(1)
    texts = [json.loads(line)["text"] for line in Path(config.data.input).read_text().splitlines()]
    started = time.perf_counter()
    teacher = EmbeddingTeacher(check_teacher(config.task, config.teacher))
    loaded = time.perf_counter()
    first_batch_done = None
    for start in range(0, len(texts), batch_size):
        teacher.score(texts[start : start + batch_size])
        first_batch_done = first_batch_done or time.perf_counter()
    done = time.perf_counter()
    steady_rows = len(texts) - min(batch_size, len(texts))
    return {
        "rows": len(texts),
        "load_s": round(loaded - started, 2),
        "wall_s": round(done - started, 2),
        "rows_per_s": round(len(texts) / (done - started), 2),
        "steady_rows_per_s": _round(steady_rows / (done - first_batch_done) if done > first_batch_done else None),
    }


def efficiency_and_scale_out(work: Path, rows: int, batch: int, cpus: int) -> dict[str, Any]:
    corpus = write_corpus(work / "pool.jsonl", rows)
    # Half a CPU reserved per actor: 2 actors x 1 CPU would take both CPUs of a 2-CPU machine and
    # leave none for the tasks that read the corpus. Each actor still runs one thread.
    settings = [
        f"teacher.embedding.batch_size={batch}",
        f"teacher.block_rows={batch}",
        "teacher.embedding.num_cpus=0.5",
    ]
    loop = plain_loop(embedding_config(corpus, *settings), batch)
    start_ray(cpus)
    try:
        one = run_stage(embedding_config(corpus, *settings, "teacher.embedding.concurrency=1"), work / "one")
        two = run_stage(embedding_config(corpus, *settings, "teacher.embedding.concurrency=2"), work / "two")
    finally:
        stop_ray()
    return {
        "loop": loop,
        "stage_1_actor": one,
        "stage_2_actors": two,
        "efficiency_steady": ratio(one["steady_rows_per_s"], loop["steady_rows_per_s"]),
        "efficiency_end_to_end": ratio(one["rows_per_s"], loop["rows_per_s"]),
        "scale_out_steady": ratio(two["steady_rows_per_s"], one["steady_rows_per_s"]),
        "scale_out_end_to_end": ratio(two["rows_per_s"], one["rows_per_s"]),
    }


def memory(work: Path, rows: int, model: Path, cpus: int) -> dict[str, Any]:
    """Peak memory labeling ``rows`` and ``10 * rows`` (tiny hf teacher: the pipeline, not the model)."""
    from llkd_ray.config import load_config

    result: dict[str, Any] = {}
    for scale in (1, 10):
        corpus = write_corpus(work / f"memory-{scale}x.jsonl", rows * scale)
        config = load_config(
            DEMO,
            [
                f"data.input={corpus}",
                "data.label_column=null",
                "teacher.backend=hf",
                f"teacher.hf.model={model}",
                "teacher.hf.batch_size=64",
                "teacher.hf.max_model_len=128",
                "teacher.block_rows=256",
            ],
        )
        start_ray(cpus)
        try:
            with PeakMemory() as peak:
                stage = run_stage(config, work / f"memory-{scale}x")
        finally:
            stop_ray()
        result[f"{scale}x"] = stage | {
            "peak_rss_total_mib": round(peak.peak_total / 2**20, 1),
            "peak_rss_driver_mib": round(peak.peak_driver / 2**20, 1),
        }
    result["peak_total_ratio_10x_vs_1x"] = ratio(
        result["10x"]["peak_rss_total_mib"], result["1x"]["peak_rss_total_mib"]
    )
    result["peak_driver_ratio_10x_vs_1x"] = ratio(
        result["10x"]["peak_rss_driver_mib"], result["1x"]["peak_rss_driver_mib"]
    )
    return result


def vllm_vs_hf(work: Path, rows: int, model: Path, cpus: int, skip_vllm: bool) -> dict[str, Any]:
    from llkd_ray.config import load_config

    corpus = write_corpus(work / "llm.jsonl", rows)
    common = [f"data.input={corpus}", "data.label_column=null", "teacher.block_rows=256"]
    result: dict[str, Any] = {}
    backends = ("hf",) if skip_vllm else ("hf", "vllm")
    start_ray(cpus)
    try:
        for backend in backends:
            config = load_config(
                DEMO,
                [
                    *common,
                    f"teacher.backend={backend}",
                    f"teacher.{backend}.model={model}",
                    f"teacher.{backend}.max_model_len=128",
                    f"teacher.{backend}.dtype=float32",
                    f"teacher.{backend}.batch_size=64",
                ],
            )
            result[backend] = run_stage(config, work / f"llm-{backend}")
    finally:
        stop_ray()
    if "vllm" in result:
        result["vllm_vs_hf_steady"] = ratio(result["vllm"]["steady_rows_per_s"], result["hf"]["steady_rows_per_s"])
        result["vllm_vs_hf_end_to_end"] = ratio(result["vllm"]["rows_per_s"], result["hf"]["rows_per_s"])
    return result


def tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama

    texts = [row["text"] for row in sst2_rows()[:3000]]
    return build_tiny_llama(work / "tiny-llama", texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="rows for efficiency and scale-out")
    parser.add_argument("--batch", type=int, default=256, help="embedding batch size (= rows per part)")
    parser.add_argument("--memory-rows", type=int, default=2000, help="the 1x corpus of the memory check")
    parser.add_argument("--llm-rows", type=int, default=2000, help="rows for vLLM vs hf")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="llkd-label-bench-") as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        figures: dict[str, Any] = {"cpus": args.cpus, "machine_cpus": os.cpu_count()}
        figures["throughput"] = efficiency_and_scale_out(work, args.rows, args.batch, args.cpus)
        print(json.dumps({"throughput": figures["throughput"]}, indent=2), flush=True)
        figures["memory"] = memory(work, args.memory_rows, model, args.cpus)
        print(json.dumps({"memory": figures["memory"]}, indent=2), flush=True)
        figures["llm"] = vllm_vs_hf(work, args.llm_rows, model, args.cpus, args.skip_vllm)
        print(json.dumps({"llm": figures["llm"]}, indent=2), flush=True)

    t, m, llm = figures["throughput"], figures["memory"], figures["llm"]
    lines = [
        "",
        "ratio                                             steady   end-to-end   target",
        f"pipeline efficiency (Ray Data, 1 actor / loop)    {t['efficiency_steady']!s:>6}   "
        f"{t['efficiency_end_to_end']!s:>10}   >= 0.9",
        f"scale-out (2 actors / 1 actor, embedding)         {t['scale_out_steady']!s:>6}   "
        f"{t['scale_out_end_to_end']!s:>10}   >= 1.6",
        f"memory, peak RSS all processes (10x / 1x rows)    {m['peak_total_ratio_10x_vs_1x']!s:>6}   {'':>10}   <= 1.2",
        f"memory, peak RSS driver (10x / 1x rows)           {m['peak_driver_ratio_10x_vs_1x']!s:>6}",
    ]
    if "vllm" in llm:
        lines.append(
            f"vLLM / hf rows/s (tiny Llama, CPU)                {llm['vllm_vs_hf_steady']!s:>6}   "
            f"{llm['vllm_vs_hf_end_to_end']!s:>10}"
        )
    print("\n".join(lines))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
