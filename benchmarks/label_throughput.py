"""Labeling throughput: the Ray Data stage against a bare loop over the same teacher, on short,
news-length and long texts; the whole machine; 2 actors against 1; memory; the hf teacher's
scoring; vLLM vs hf.

    python benchmarks/label_throughput.py [--rows 2000] [--long-rows 2000] [--block-rows 256]
                                          [--memory-rows 2000] [--llm-rows 2000] [--cpus N]
                                          [--cases short,news,long] [--skip-vllm] [--output results.json]

Everything runs in one process, on its own local Ray (``--cpus``, default: every core), and prints
the ratios measured in this run:

1. **Pipeline efficiency** per text length — ``label_corpus`` with one actor of one thread vs the
   same teacher (``EmbeddingTeacher``, one thread) in a bare loop over the same blocks. Texts:
   SST-2 phrases (a few words), news-length (30-50 words) and long (250-400 words, over the
   model's 256 tokens), the last two built by joining sentences of the built-in SST-2 and TREC
   pools.
2. **Whole machine** — ``label_corpus`` with every setting at its default (``concurrency: auto``,
   ``threads: auto``: one single-thread actor per core) vs the bare loop on every core, which is
   also the N-actors / 1-actor ratio; and the other layout, one actor whose threads take every
   core.
3. **Memory** — peak resident memory (the driver and every Ray process it started, summed) while
   labeling 10x the rows vs 1x, each on a fresh Ray; and the driver's own peak.
4. **hf scoring** — the hf teacher's first-token and sequence scoring against the computation it
   replaced (a log-softmax over the vocabulary at every position), on the tiny test Llama and on
   the same model with a 32k vocabulary.
5. **vLLM vs hf** — both LLM backends on the same tiny random Llama (the test model).

Rates are given two ways: end to end (rows over the whole call, start-up included: for the stage,
planning, the actor's start and model load; for the loop, the model load) and steady state (rows
committed after the first part over the time between the first and the last commit, read from
the parts' modification times; for the loop, the blocks after the first). The manifest's
``teacher_busy_s`` (the teacher's own seconds) is reported with each stage run: the rest of the
wall time is start-up, reading, committing and waiting.
"""

from __future__ import annotations

import argparse
import functools
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


def pool_texts(name: str) -> list[str]:
    from llkd_ray.corpus import builtin_path

    return [json.loads(line)["text"] for line in builtin_path(name).read_text().splitlines()]


def sst2_rows() -> list[dict[str, str]]:
    return [{"text": t} for t in pool_texts("builtin:sst2/train")]


#: Text lengths of the efficiency cases, in words (None: SST-2 phrases as they are).
LENGTHS: dict[str, tuple[int, int] | None] = {"short": None, "news": (30, 50), "long": (250, 400)}


def case_texts(case: str, rows: int, seed: int = 0) -> list[str]:
    """``rows`` texts of the case's length: SST-2 phrases, or sentences of the SST-2 and TREC pools
    joined until the text has a random length in the case's range of words."""
    import random

    sentences = pool_texts("builtin:sst2/train") + pool_texts("builtin:trec/train")
    if LENGTHS[case] is None:
        return [sentences[i % 10_000] for i in range(rows)]
    low, high = LENGTHS[case]
    rng = random.Random(seed)
    texts = []
    for _ in range(rows):
        target, words = rng.randint(low, high), []
        while len(words) < target:
            words += rng.choice(sentences).split()
        texts.append(" ".join(words[:target]))
    return texts


def write_texts(path: Path, texts: list[str]) -> Path:
    with path.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_corpus(path: Path, rows: int) -> Path:
    """``rows`` SST-2 phrases (cycling through the built-in pool), one JSON object a line."""
    return write_texts(path, case_texts("short", rows))


def steady_rate(directory: Path) -> float | None:
    """Rows committed after the first part / time from the first commit to the last."""
    import pyarrow.parquet as pq

    stamps = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in directory.glob("part-*.parquet"))
    if len(stamps) < 3:
        return None
    span = stamps[-1][0] - stamps[0][0]
    return sum(n for _, n in stamps[1:]) / span if span > 0 else None


def run_stage(config, output: Path) -> dict[str, Any]:
    from llkd_ray.label.run import label_corpus

    started = time.perf_counter()
    result = label_corpus(config, output, overwrite=True)
    wall = time.perf_counter() - started
    rows = result.counts["read"]
    run = result.manifest["run"]
    return {
        "rows": rows,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 2),
        "steady_rows_per_s": _round(steady_rate(output)),
        "actors": len(result.manifest["rows_per_actor"]),
        "threads_per_actor": sorted(run["threads_per_actor"].values()),
        "teacher_busy_s": run["teacher_busy_s"],
        "summary": result.summary().split(";")[1].strip(),
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


def plain_loop(config, threads: int) -> dict[str, Any]:
    """The same teacher in this process, ``threads`` torch threads, over the same blocks."""
    import torch

    from llkd_ray.label.teachers.check import check_teacher
    from llkd_ray.label.teachers.embedding import EmbeddingTeacher

    torch.set_num_threads(threads)
    texts = [json.loads(line)["text"] for line in Path(config.data.input).read_text().splitlines()]
    block = config.teacher.block_rows
    started = time.perf_counter()
    teacher = EmbeddingTeacher(check_teacher(config.task, config.teacher))
    loaded = time.perf_counter()
    first_block_done = None
    for start in range(0, len(texts), block):
        teacher.score(texts[start : start + block])
        first_block_done = first_block_done or time.perf_counter()
    done = time.perf_counter()
    steady_rows = len(texts) - min(block, len(texts))
    return {
        "rows": len(texts),
        "threads": threads,
        "load_s": round(loaded - started, 2),
        "wall_s": round(done - started, 2),
        "rows_per_s": round(len(texts) / (done - started), 2),
        "steady_rows_per_s": _round(steady_rows / (done - first_block_done) if done > first_block_done else None),
    }


def cold_start_s(config, threads: int) -> float:
    """Seconds a fresh Python process takes to import the teacher and load its model: what a bare
    script pays before its loop, and what each teacher actor pays (the in-process loop above runs
    in a process that has imported torch and transformers already)."""
    import subprocess

    code = (
        "import sys, torch; torch.set_num_threads(int(sys.argv[2]));"
        "from llkd_ray.config import load_config; from llkd_ray.label.teachers.check import check_teacher;"
        "from llkd_ray.label.teachers.embedding import EmbeddingTeacher;"
        "c = load_config(sys.argv[1]); EmbeddingTeacher(check_teacher(c.task, c.teacher))"
    )
    path = Path(tempfile.mkdtemp(prefix="llkd-cold-")) / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(path), str(threads)], check=True, capture_output=True)
    return round(time.perf_counter() - started, 2)


def with_cold_start(loop: dict[str, Any], cold: float) -> float:
    """The loop's end-to-end rate had it started in a fresh process (cold start instead of its load)."""
    return round(loop["rows"] / (loop["wall_s"] - loop["load_s"] + cold), 2)


def efficiency(work: Path, case: str, rows: int, block: int) -> dict[str, Any]:
    """One single-thread actor vs the bare loop on one thread (Ray must be running)."""
    corpus = write_texts(work / f"{case}.jsonl", case_texts(case, rows))
    settings = [f"teacher.block_rows={block}"]
    one = ["teacher.embedding.concurrency=1", "teacher.embedding.threads=1"]
    loop = plain_loop(embedding_config(corpus, *settings), threads=1)
    loop["cold_start_s"] = cold_start_s(embedding_config(corpus, *settings), threads=1)
    loop["rows_per_s_cold"] = with_cold_start(loop, loop["cold_start_s"])
    stage = run_stage(embedding_config(corpus, *settings, *one), work / f"{case}-one")
    return {
        "loop_1_thread": loop,
        "stage_1_actor_1_thread": stage,
        "efficiency_steady": ratio(stage["steady_rows_per_s"], loop["steady_rows_per_s"]),
        "efficiency_end_to_end": ratio(stage["rows_per_s"], loop["rows_per_s"]),
        "efficiency_end_to_end_vs_cold_loop": ratio(stage["rows_per_s"], loop["rows_per_s_cold"]),
    }


def whole_machine(work: Path, case: str, rows: int, block: int, cpus: int, single: dict[str, Any]) -> dict[str, Any]:
    """The defaults (one single-thread actor per core) vs the bare loop on every core; and the
    other layout, one actor whose threads take every core."""
    corpus = work / f"{case}.jsonl"
    settings = [f"teacher.block_rows={block}"]
    loop = plain_loop(embedding_config(corpus, *settings), threads=cpus)
    loop["cold_start_s"] = cold_start_s(embedding_config(corpus, *settings), threads=cpus)
    loop["rows_per_s_cold"] = with_cold_start(loop, loop["cold_start_s"])
    default = run_stage(embedding_config(corpus, *settings), work / f"{case}-default")
    threaded = ["teacher.embedding.concurrency=1", f"teacher.embedding.threads={cpus}"]
    one_actor = run_stage(embedding_config(corpus, *settings, *threaded), work / f"{case}-threaded")
    one = single["stage_1_actor_1_thread"]
    return {
        f"loop_{cpus}_threads": loop,
        "stage_default": default,
        f"stage_1_actor_{cpus}_threads": one_actor,
        "default_vs_loop_steady": ratio(default["steady_rows_per_s"], loop["steady_rows_per_s"]),
        "default_vs_loop_end_to_end": ratio(default["rows_per_s"], loop["rows_per_s"]),
        "default_vs_cold_loop_end_to_end": ratio(default["rows_per_s"], loop["rows_per_s_cold"]),
        "threaded_vs_loop_steady": ratio(one_actor["steady_rows_per_s"], loop["steady_rows_per_s"]),
        "threaded_vs_loop_end_to_end": ratio(one_actor["rows_per_s"], loop["rows_per_s"]),
        "scale_out_steady": ratio(default["steady_rows_per_s"], one["steady_rows_per_s"]),
        "scale_out_end_to_end": ratio(default["rows_per_s"], one["rows_per_s"]),
        "loop_threads_speed_up_steady": ratio(loop["steady_rows_per_s"], single["loop_1_thread"]["steady_rows_per_s"]),
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


def wide_vocabulary_copy(model: Path, work: Path, vocab: int) -> Path:
    """The tiny Llama with a ``vocab``-token output layer (random weights; same tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = work / f"tiny-llama-vocab-{vocab}"
    config = LlamaConfig.from_pretrained(model)
    config.vocab_size = vocab
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(model).save_pretrained(target)
    return target


def hf_scoring(work: Path, model: Path, rows: int, batch: int) -> dict[str, Any]:
    """Rows/s of the hf teacher's scoring against the full-vocabulary computation, same prompts."""
    import numpy as np

    from llkd_ray.config import load_config, validate_config
    from llkd_ray.label.teachers.check import check_teacher
    from llkd_ray.label.teachers.hf import HFTeacher
    from llkd_ray.testing import reference_first_token, reference_sequence

    texts = case_texts("news", rows)
    result: dict[str, Any] = {"rows": rows, "batch": batch}
    for name, path in (("vocab_1024", model), ("vocab_32000", wide_vocabulary_copy(model, work, 32000))):
        for scoring, verbalizers in (("first_token", None), ("sequence", ("negative review", "positive review"))):
            raw = load_config(
                DEMO,
                [
                    "teacher.backend=hf",
                    f"teacher.hf.model={path}",
                    "teacher.hf.max_model_len=256",
                    "teacher.hf.dtype=float32",
                    f"teacher.scoring={scoring}",
                ],
            ).model_dump(mode="json")
            if verbalizers:
                for label, verbalizer in zip(raw["task"]["labels"], verbalizers, strict=True):
                    label["verbalizer"] = verbalizer
            config = validate_config(raw)
            teacher = HFTeacher(check_teacher(config.task, config.teacher))
            prompts, _ = teacher.encoder.encode(texts)
            new = teacher._first_token_scores if scoring == "first_token" else teacher._sequence_scores
            old = functools.partial(reference_first_token if scoring == "first_token" else reference_sequence, teacher)
            step = batch if scoring == "first_token" else max(1, batch // 2)
            timings: dict[str, float] = {}
            outputs: dict[str, Any] = {}
            for label, fn in (("old", old), ("new", new)):
                started = time.perf_counter()
                outputs[label] = np.concatenate([fn(prompts[i : i + step]) for i in range(0, len(prompts), step)])
                timings[label] = time.perf_counter() - started
            agree = float(np.abs(outputs["old"] - outputs["new"]).max())
            old_s, new_s = timings["old"], timings["new"]
            result[f"{name}_{scoring}"] = {
                "old_rows_per_s": round(rows / old_s, 1),
                "new_rows_per_s": round(rows / new_s, 1),
                "speed_up": round(old_s / new_s, 2),
                "max_abs_difference": agree,
                "prompt_tokens_mean": round(float(np.mean([len(p) for p in prompts])), 1),
            }
    return result


def tiny_model(work: Path) -> Path:
    from llkd_ray.testing import build_tiny_llama

    texts = [row["text"] for row in sst2_rows()[:3000]]
    return build_tiny_llama(work / "tiny-llama", texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows of the short and news-length cases")
    parser.add_argument("--long-rows", type=int, default=2000, help="rows of the long-text case")
    parser.add_argument("--block-rows", type=int, default=256, help="teacher.block_rows (= rows per part)")
    parser.add_argument("--cases", default="short,news,long", help="text lengths to measure")
    parser.add_argument("--whole-machine-case", default="news", help="the case of the whole-machine ratios")
    parser.add_argument("--memory-rows", type=int, default=2000, help="the 1x corpus of the memory check")
    parser.add_argument("--llm-rows", type=int, default=2000, help="rows for vLLM vs hf")
    parser.add_argument("--hf-rows", type=int, default=64, help="prompts for the hf scoring comparison")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="the local Ray's CPUs")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(LENGTHS))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(LENGTHS)}")

    figures: dict[str, Any] = {"cpus": args.cpus, "machine_cpus": os.cpu_count(), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="llkd-label-bench-") as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        figures["hf_scoring"] = hf_scoring(work, model, args.hf_rows, batch=16)
        print(json.dumps({"hf_scoring": figures["hf_scoring"]}, indent=2), flush=True)
        start_ray(args.cpus)
        try:
            for case in cases:
                rows = args.long_rows if case == "long" else args.rows
                figures[case] = efficiency(work, case, rows, args.block_rows)
                print(json.dumps({case: figures[case]}, indent=2), flush=True)
            case = args.whole_machine_case
            if case in figures:
                rows = args.long_rows if case == "long" else args.rows
                figures["whole_machine"] = whole_machine(work, case, rows, args.block_rows, args.cpus, figures[case])
                figures["whole_machine"]["case"] = case
                print(json.dumps({"whole_machine": figures["whole_machine"]}, indent=2), flush=True)
        finally:
            stop_ray()
        if not args.skip_memory:
            figures["memory"] = memory(work, args.memory_rows, model, args.cpus)
            print(json.dumps({"memory": figures["memory"]}, indent=2), flush=True)
        figures["llm"] = vllm_vs_hf(work, args.llm_rows, model, args.cpus, args.skip_vllm)
        print(json.dumps({"llm": figures["llm"]}, indent=2), flush=True)
    figures["load_average_after"] = os.getloadavg()
    print(table(figures, args.cpus))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def table(figures: dict[str, Any], cpus: int) -> str:
    """The ratios of one run, against the issue's targets."""

    def line(name: str, steady: Any, end_to_end: Any = "", target: str = "") -> str:
        return f"{name:<58} {steady!s:>7}   {end_to_end!s:>10}   {target}"

    lines = ["", line("ratio", "steady", "end-to-end", "target")]
    for case in LENGTHS:
        if case in figures:
            f = figures[case]
            lines.append(
                line(
                    f"{case}: stage 1 actor x 1 thread / loop 1 thread",
                    f["efficiency_steady"],
                    f["efficiency_end_to_end"],
                    ">= 0.9 steady, >= 0.8 end to end",
                )
            )
            lines.append(
                line(f"{case}:   end to end against the loop started cold", "", f["efficiency_end_to_end_vs_cold_loop"])
            )
    if "whole_machine" in figures:
        w = figures["whole_machine"]
        case = w["case"]
        lines += [
            line(
                f"{case}: stage defaults / loop {cpus} threads",
                w["default_vs_loop_steady"],
                w["default_vs_loop_end_to_end"],
                ">= 0.8 end to end",
            ),
            line(f"{case}:   end to end against the loop started cold", "", w["default_vs_cold_loop_end_to_end"]),
            line(
                f"{case}: stage 1 actor x {cpus} threads / loop {cpus} threads",
                w["threaded_vs_loop_steady"],
                w["threaded_vs_loop_end_to_end"],
            ),
            line(
                f"{case}: defaults ({cpus} actors) / 1 actor x 1 thread (scale-out)",
                w["scale_out_steady"],
                w["scale_out_end_to_end"],
                ">= 1.6",
            ),
            line(f"{case}: loop {cpus} threads / loop 1 thread", w["loop_threads_speed_up_steady"]),
        ]
    if "memory" in figures:
        m = figures["memory"]
        lines += [
            line("memory, peak RSS all processes (10x / 1x rows)", m["peak_total_ratio_10x_vs_1x"], "", "<= 1.2"),
            line("memory, peak RSS driver (10x / 1x rows)", m["peak_driver_ratio_10x_vs_1x"]),
        ]
    for key, value in figures.get("hf_scoring", {}).items():
        if isinstance(value, dict):
            lines.append(line(f"hf scoring {key}: new / old rows/s", value["speed_up"], "", "reported"))
    llm = figures.get("llm", {})
    if "vllm" in llm:
        lines.append(line("vLLM / hf rows/s (tiny Llama, CPU)", llm["vllm_vs_hf_steady"], llm["vllm_vs_hf_end_to_end"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
