"""Student-training throughput: Ray Train against a plain PyTorch loop, the selection's cost, scale-out.

Prints, from one run on this machine, comparing **equal work** only:

1. **Ray Train, 1 worker vs a plain PyTorch loop** — the same model, batches (global batch 32),
   optimizer and schedule; the Ray side trains with ``strategy: all`` (every row, unit weights,
   no scoring), so both back-propagate 32 rows a step. Target: >= 0.9 of the loop's trained
   samples/s.
2. **Where an LLKD step's time goes** — ``llkd`` at M = 1 and M = 4: candidates scored and samples
   trained per second (reported apart), and the loop's wall time split into scoring (inference
   mode), training (forward, backward, optimizer step) and selection (the information need,
   masks, weights, the all-reduces, the id gathering). Target: selection <= 3% of step time.
3. **2 workers vs 1** (trained samples/s, ``strategy: all``; and ``llkd``) on this machine; on a
   GPU when one is visible (``--gpu``). On one machine the two workers share its cores, so the
   work per second cannot grow; DDP adds a gradient all-reduce per step.

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


def _throughput(metrics_path: Path) -> dict[str, float]:
    """Trained and scored samples/s, seconds per step and the time split, over steps SKIP+1.. of a metrics.jsonl."""
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if '"loss"' in line]
    first, last = steps[SKIP - 1], steps[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    measured = [r["step_compute"] for r in steps[SKIP:]]
    split = {kind: sum(r[f"{kind}_s"] for r in measured) for kind in ("scoring", "training", "selection")}
    return {
        "trained_samples_per_s": sum(r["trained_samples"] for r in measured) / seconds,
        "scored_samples_per_s": sum(r["scored_samples"] for r in measured) / seconds,
        "step_s": seconds / (len(steps) - SKIP),
        **{f"{kind}_share": value / seconds for kind, value in split.items()},
    }


def label_pool(config, rows: int, output: Path) -> Path:
    """The embedding teacher labels ``rows`` rows of SST-2 train (the real pipeline's first stage)."""
    from llkd_ray.label.run import label_corpus

    labeled = config.model_copy(deep=True)
    labeled.data.limit = rows
    label_corpus(labeled, output)
    return output


def plain_loop(config, labels: Path, steps: int, threads: int) -> dict[str, Any]:
    """The same model, batches and optimizer in a hand-written PyTorch loop (no Ray, no selection)."""
    import pyarrow.dataset as pads
    import torch

    from llkd_ray.compute import ProgressSchedule
    from llkd_ray.student.model import resolve_model_path
    from llkd_ray.train.data import validate_labels_dir
    from llkd_ray.train.recipe import build_optimizer, load_student

    torch.set_num_threads(threads)
    pool = validate_labels_dir(labels, config.task.label_names)
    table = pads.dataset(pool.files, format="parquet").to_table(columns=["text", "label_index"])
    texts, targets = table.column("text").to_pylist(), table.column("label_index").to_pylist()
    model, tokenizer = load_student(resolve_model_path(config.student.model), config.task.label_names, 0)
    optimizer = build_optimizer(model, config.training.learning_rate, config.training.weight_decay)
    schedule = ProgressSchedule(config.training.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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
        schedule.progress = (step + 1) / steps
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    seconds = times[-1] - times[SKIP - 1]
    return {"trained_samples_per_s": batch * (steps - SKIP) / seconds, "step_s": seconds / (steps - SKIP)}


def selection_cost(num_classes: int, batch: int = 32, rounds: int = 300) -> float:
    """Milliseconds for one step's information need + selection on 1 process (no all-reduce)."""
    import torch

    from llkd_ray.train.selection import Selector, normalized_entropy

    generator = torch.Generator().manual_seed(0)
    selector = Selector(num_classes)
    logits = torch.randn(rounds, batch, num_classes, generator=generator)
    confidence = torch.rand(rounds, batch, generator=generator)
    labels = torch.randint(0, num_classes, (rounds, batch), generator=generator)
    started = time.perf_counter()
    for r in range(rounds):
        selector.select(confidence[r], labels[r], normalized_entropy(logits[r]))
    return 1000 * (time.perf_counter() - started) / rounds


def ray_run(config, labels: Path, work: Path, name: str) -> dict[str, Any]:
    from llkd_ray.train.launch import train_student

    started = time.perf_counter()
    train_student(config, labels=labels, output=work / name, eval_data=None)
    return _throughput(work / name / "metrics.jsonl") | {"wall_s": time.perf_counter() - started}


def compute_ratios(results: dict[str, Any], *, gpu: bool) -> dict[str, float]:
    """The measured ratios: Ray Train against the loop, the selection's share, 2 workers against 1."""
    plain, one_all, one, two_all, two = (
        results[k] for k in ("plain_loop", "ray_1_all", "ray_1_llkd", "ray_2_all", "ray_2_llkd")
    )
    figures = {
        "ray_train_1_worker_vs_plain_loop": one_all["trained_samples_per_s"] / plain["trained_samples_per_s"],
        "selection_share_1_worker": one["selection_share"],
        "selection_share_2_workers": two["selection_share"],
        "two_workers_vs_one_all": two_all["trained_samples_per_s"] / one_all["trained_samples_per_s"],
        "two_workers_vs_one_llkd": two["scored_samples_per_s"] / one["scored_samples_per_s"],
        "selection_compute_share_1_worker": results["selection_ms_per_step_1_process"] / 1000 / one["step_s"],
    }
    if gpu:
        figures["gpu_two_workers_vs_one"] = (
            results["gpu_2_llkd"]["scored_samples_per_s"] / results["gpu_1_llkd"]["scored_samples_per_s"]
        )
    return figures


def print_figures(results: dict[str, Any], runs: list[str], cores: int, steps: int) -> None:
    """The table of runs and the ratios, as the module docstring lists them."""
    ratios = results["ratios"]
    print(
        f"\nStudent training throughput ({results['machine']}, {results['student']}, batch 32, "
        f"{steps} steps, from step {SKIP + 1}; load average {results['load_average_at_start'][0]:.1f})"
    )
    print(f"  {'run':<14} {'trained/s':>10} {'scored/s':>9} {'s/step':>7}  time: scoring / training / selection")
    for name in ("plain_loop", *runs):
        entry = results[name]
        shares = (
            f"  {entry['scoring_share']:6.1%} / {entry['training_share']:6.1%} / {entry['selection_share']:5.2%}"
            if "scoring_share" in entry
            else ""
        )
        scored = f"{entry['scored_samples_per_s']:9.1f}" if "scored_samples_per_s" in entry else f"{'–':>9}"
        print(f"  {name:<14} {entry['trained_samples_per_s']:10.1f} {scored} {entry['step_s']:7.3f}{shares}")
    print(f"  Ray Train 1 worker / plain loop (all, equal work): {ratios['ray_train_1_worker_vs_plain_loop']:.3f}")
    print(
        f"  selection share of llkd step time, 1 / 2 workers: {ratios['selection_share_1_worker']:.2%} / "
        f"{ratios['selection_share_2_workers']:.2%}  (target <= 3%)"
    )
    print(
        f"  selection compute alone: {results['selection_ms_per_step_1_process']:.2f} ms per step = "
        f"{ratios['selection_compute_share_1_worker']:.2%} of a 1-worker llkd step"
    )
    print(
        f"  2 workers / 1 worker on {cores} cores: all {ratios['two_workers_vs_one_all']:.3f}, "
        f"llkd {ratios['two_workers_vs_one_llkd']:.3f}"
    )


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
        from llkd_ray.testing import build_tiny_encoder

        tiny = build_tiny_encoder(work / "tiny-student", hidden_size=64, max_positions=None)
        overrides.append(f"student.model={tiny}")
    config = load_config(args.config, overrides)
    # A Ray of our own (not a cluster someone started here); one CPU is left over for Ray Data's
    # reader, the workers' threads take the cores.
    ray.init(address="local", num_cpus=cores + 1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    labels = Path(args.labels) if args.labels else label_pool(config, 256 if args.quick else args.rows, work / "labels")

    def variant(strategy: str, workers: int, use_gpu: bool = False, m: int = 1):
        return load_config(
            args.config,
            [
                *overrides,
                f"selection.strategy={strategy}",
                f"selection.candidates_per_step={m}",
                f"training.workers={workers}",
                f"training.cpus_per_worker={max(1, cores // workers)}",
                f"training.use_gpu={str(use_gpu).lower()}",
                f"training.max_steps={steps}",
                "training.budget=null",
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
    results["selection_ms_per_step_1_process"] = selection_cost(len(config.task.labels))
    runs = {
        "ray_1_all": variant("all", 1),
        "ray_1_llkd": variant("llkd", 1),
        "ray_1_llkd_m4": variant("llkd", 1, m=4),
        "ray_2_all": variant("all", 2),
        "ray_2_llkd": variant("llkd", 2),
    }
    if args.gpu:
        runs |= {"gpu_1_llkd": variant("llkd", 1, True), "gpu_2_llkd": variant("llkd", 2, True)}
    for name, run_config in runs.items():
        results[name] = ray_run(run_config, labels, work, name)
    results["load_average_at_end"] = os.getloadavg()

    results["ratios"] = compute_ratios(results, gpu=args.gpu)
    print_figures(results, [*runs], cores, steps)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
