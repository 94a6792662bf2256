"""Student-training throughput: Ray Train against a plain PyTorch loop, selection overhead, scale-out.

Prints, from one run on this machine:

1. **Ray Train, 1 worker vs a plain PyTorch loop** — the same model, batches (global batch 32),
   optimizer and schedule; the Ray side trains with ``strategy: all`` (every row, unit weights).
   Target: >= 0.9 of the loop's samples/s.
2. **Selection overhead** at batch 32 on the MiniLM student — ``llkd`` against ``all`` step time
   (the same forward and backward at M = 1, so the difference is the selection: information need,
   masks, weights, the all-reduces, the id gathering), on 1 and on 2 workers; and the share of
   step time timed inside the workers around those operations (an upper bound on 2 workers: an
   all-reduce also waits for the slower worker, which DDP's gradient all-reduce would otherwise
   absorb). Target: <= 3%.
3. **2 workers vs 1** (samples/s, ``strategy: llkd``) on this machine; on a GPU when one is
   visible (``--gpu``).

Throughput is measured inside the training loop from the third step on (start-up, Ray Data's first
block and the first steps' lazy initialisation are reported apart, as end-to-end wall time).

    python benchmarks/train_throughput.py                 # MiniLM student, real teacher labels
    python benchmarks/train_throughput.py --quick         # tiny student, a minute or two
    python benchmarks/train_throughput.py --labels DIR    # reuse a labels directory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

SKIP = 2  # steps left out of the throughput (warm-up)


def _throughput(metrics_path: Path) -> tuple[float, float]:
    """(samples/s, seconds per step) over steps SKIP+1.. from a metrics.jsonl."""
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if '"loss"' in line]
    first, last = steps[SKIP - 1], steps[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    samples = sum(r["candidates"] for r in steps[SKIP:])
    return samples / seconds, seconds / (len(steps) - SKIP)


def label_pool(config, rows: int, output: Path) -> Path:
    """The embedding teacher labels ``rows`` rows of SST-2 train (the real pipeline's first stage)."""
    from llkd_ray.label import label_corpus

    labeled = config.model_copy(deep=True)
    labeled.data.limit = rows
    label_corpus(labeled, output)
    return output


def plain_loop(config, labels: Path, steps: int, threads: int) -> dict[str, Any]:
    """The same model, batches and optimizer in a hand-written PyTorch loop (no Ray, no selection)."""
    import pyarrow.dataset as pads
    import torch
    from transformers import get_linear_schedule_with_warmup

    from llkd_ray.models import resolve_model_path
    from llkd_ray.train import TrainingPlan, build_optimizer, load_student, validate_labels_dir

    torch.set_num_threads(threads)
    pool = validate_labels_dir(labels, config.task.label_names)
    plan = TrainingPlan.build(config, pool.rows)
    table = pads.dataset(pool.files, format="parquet").to_table(columns=["text", "label_index"])
    texts, targets = table.column("text").to_pylist(), table.column("label_index").to_pylist()
    model, tokenizer = load_student(resolve_model_path(config.student.model), config.task.label_names, 0)
    optimizer = build_optimizer(model, config.training.learning_rate, config.training.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
    batch = config.training.batch_size
    model.train()
    started, times = time.perf_counter(), []
    for step in range(steps):
        start = (step * batch) % max(1, len(texts) - batch)
        encoded = tokenizer(
            texts[start : start + batch],
            padding=True,
            truncation=True,
            max_length=config.student.max_length,
            return_tensors="pt",
        )
        logits = model(**encoded).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets[start : start + batch]))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    seconds = times[-1] - times[SKIP - 1]
    return {"samples_per_s": batch * (steps - SKIP) / seconds, "step_s": seconds / (steps - SKIP)}


def selection_cost(num_classes: int, batch: int = 32, rounds: int = 300) -> float:
    """Milliseconds for one round's information need + selection on 1 process (no all-reduce)."""
    import torch

    from llkd_ray.selection import Selector, normalized_entropy

    generator = torch.Generator().manual_seed(0)
    selector = Selector(num_classes)
    logits = torch.randn(rounds, batch, num_classes, generator=generator)
    confidence = torch.rand(rounds, batch, generator=generator)
    labels = torch.randint(0, num_classes, (rounds, batch), generator=generator)
    started = time.perf_counter()
    for r in range(rounds):
        selector.select(confidence[r], labels[r], normalized_entropy(logits[r]))
    return 1000 * (time.perf_counter() - started) / rounds


def ray_run(config, labels: Path, work: Path, name: str, **options) -> dict[str, Any]:
    from llkd_ray.train import train_student

    started = time.perf_counter()
    summary = train_student(config, labels=labels, output=work / name, eval_data=None, **options)
    samples_per_s, step_s = _throughput(work / name / "metrics.jsonl")
    return {
        "samples_per_s": samples_per_s,
        "step_s": step_s,
        "selection_share": summary["selection_share"],
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    parser.add_argument("--labels", default=None, help="labels directory (default: label SST-2 rows now)")
    parser.add_argument("--rows", type=int, default=1024, help="rows to label when --labels is not given")
    parser.add_argument("--steps", type=int, default=24, help="steps per measured run")
    parser.add_argument("--quick", action="store_true", help="tiny random student, few steps (a smoke run)")
    parser.add_argument("--gpu", action="store_true", help="also 1 vs 2 GPU workers (needs 2 GPUs)")
    parser.add_argument("--json", default=None, help="write the figures to this file too")
    args = parser.parse_args(argv)

    import ray

    from llkd_ray.config import load_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="llkd-train-bench-"))
    overrides = [
        "training.batch_size=32",
        "training.checkpoint_every=100000",
        "training.report_every=100000",
        "training.warmup_ratio=0.1",
    ]
    steps = 8 if args.quick else args.steps
    if args.quick:
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        from llkd_ray.models import resolve_model_path

        tiny = work / "tiny-student"
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:minilm"))
        BertForSequenceClassification(
            BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
            )
        ).save_pretrained(tiny)
        tokenizer.save_pretrained(tiny)
        overrides.append(f"student.model={tiny}")
    config = load_config(args.config, overrides)
    # A Ray of our own (not a cluster someone started here); one CPU is left over for Ray Data's
    # reader, the workers' threads take the cores.
    ray.init(address="local", num_cpus=cores + 1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    labels = Path(args.labels) if args.labels else label_pool(config, 256 if args.quick else args.rows, work / "labels")

    def variant(strategy: str, workers: int, use_gpu: bool = False):
        return load_config(
            args.config,
            [
                *overrides,
                f"selection.strategy={strategy}",
                f"training.workers={workers}",
                f"training.cpus_per_worker={max(1, cores // workers)}",
                f"training.use_gpu={str(use_gpu).lower()}",
            ],
        )

    results: dict[str, Any] = {
        "machine": f"{cores} CPU cores",
        "steps": steps,
        "batch_size": 32,
        "student": config.student.model,
        "load_average_at_start": os.getloadavg(),
    }
    results["plain_loop"] = plain_loop(config, labels, steps, threads=cores)
    results["selection_ms_per_round_1_process"] = selection_cost(len(config.task.labels))
    results["ray_1_all"] = ray_run(variant("all", 1), labels, work, "ray-1-all", max_steps=steps)
    results["ray_1_llkd"] = ray_run(variant("llkd", 1), labels, work, "ray-1-llkd", max_steps=steps)
    results["ray_2_all"] = ray_run(variant("all", 2), labels, work, "ray-2-all", max_steps=steps)
    results["ray_2_llkd"] = ray_run(variant("llkd", 2), labels, work, "ray-2-llkd", max_steps=steps)
    if args.gpu:
        results["gpu_1_llkd"] = ray_run(variant("llkd", 1, True), labels, work, "gpu-1-llkd", max_steps=steps)
        results["gpu_2_llkd"] = ray_run(variant("llkd", 2, True), labels, work, "gpu-2-llkd", max_steps=steps)
    results["load_average_at_end"] = os.getloadavg()

    plain, one_all, one, two_all, two = (
        results[k] for k in ("plain_loop", "ray_1_all", "ray_1_llkd", "ray_2_all", "ray_2_llkd")
    )
    ratios = {
        "ray_train_1_worker_vs_plain_loop": one_all["samples_per_s"] / plain["samples_per_s"],
        "llkd_vs_all_step_time_1_worker": one["step_s"] / one_all["step_s"] - 1,
        "llkd_vs_all_step_time_2_workers": two["step_s"] / two_all["step_s"] - 1,
        "selection_share_timed_1_worker": one["selection_share"],
        "selection_share_timed_2_workers": two["selection_share"],
        "two_workers_vs_one": two["samples_per_s"] / one["samples_per_s"],
        "selection_compute_share_1_worker": results["selection_ms_per_round_1_process"] / 1000 / one["step_s"],
    }
    if args.gpu:
        gpu_one, gpu_two = results["gpu_1_llkd"], results["gpu_2_llkd"]
        ratios["gpu_two_workers_vs_one"] = gpu_two["samples_per_s"] / gpu_one["samples_per_s"]
    results["ratios"] = ratios

    print(
        f"\nStudent training throughput ({results['machine']}, {results['student']}, batch 32, "
        f"{steps} steps, from step {SKIP + 1}; load average {results['load_average_at_start'][0]:.1f})"
    )
    for name in ("plain_loop", "ray_1_all", "ray_1_llkd", "ray_2_all", "ray_2_llkd", "gpu_1_llkd", "gpu_2_llkd"):
        if name in results:
            entry = results[name]
            extra = f", selection {entry['selection_share']:.2%} of step time" if "selection_share" in entry else ""
            print(f"  {name:<12} {entry['samples_per_s']:8.1f} samples/s  {entry['step_s']:.3f} s/step{extra}")
    print(f"  Ray Train 1 worker / plain loop:   {ratios['ray_train_1_worker_vs_plain_loop']:.3f}  (target >= 0.9)")
    print(
        f"  llkd vs all step time, 1 / 2 workers: {ratios['llkd_vs_all_step_time_1_worker']:+.2%} / "
        f"{ratios['llkd_vs_all_step_time_2_workers']:+.2%}  (selection overhead, target <= 3%)"
    )
    print(
        f"  selection share timed, 1 / 2 workers: {ratios['selection_share_timed_1_worker']:.2%} / "
        f"{ratios['selection_share_timed_2_workers']:.2%}"
    )
    print(
        f"  selection compute alone: {results['selection_ms_per_round_1_process']:.2f} ms per round = "
        f"{ratios['selection_compute_share_1_worker']:.2%} of a 1-worker step"
    )
    print(f"  2 workers / 1 worker:              {ratios['two_workers_vs_one']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
