"""Quality benchmark: LLKD against its baselines on real data, at equal compute (``llkd bench quality``).

The command line of ``llkd bench quality``: the arguments, the
settings they make (``--quick``'s included), and :func:`quality_main`, which prepares the data,
runs the benchmark and writes ``results.json``, ``results.md`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from llkd_ray.config import DEFAULT_MOMENTUM, MINILM, STRATEGIES
from llkd_ray.errors import ConfigError
from llkd_ray.quality.data import dataset_name, prepare_data
from llkd_ray.quality.runs import run_benchmark
from llkd_ray.quality.settings import (
    DEFAULT_BUDGET,
    BenchSettings,
    build_variants,
    labeling_variants,
    parse_candidates,
    parse_fractions,
)
from llkd_ray.quality.tables import write_results

# --------------------------------------------------------------------------- quick mode


#: ``--quick``: a tiny pool, a tiny student, one seed, two passes of compute (room for the rounds'
#: scoring passes of any rule, a typical first slice included), a 4-point curve (CI).
QUICK = {
    "pool_size": 96,
    "gold_size": 96,
    "seeds": 1,
    "budget": 2.0,
    "eval_points": 4,
    "batch_size": 16,
    "max_length": 32,
}
#: ``--quick`` also exercises score reuse and the label-free stop; a churn bar of 1 (always under it)
#: and no selection bar make the stop deterministic: called at the third of 8 checks (3/8 of the
#: budget, the first has no churn to compare), the run ends 5 % of the budget later.
QUICK_OVERRIDES = [
    "selection.score_ttl=1",
    "training.stop=auto",
    "training.stop_checks=8",
    "training.stop_churn=1",
    "training.stop_selected=0",
]


#: ``--quick``'s student-guided arm: two rounds (a random slice, then one the student chooses).
QUICK_LABELING_ROUNDS = 2


# --------------------------------------------------------------------------- command line


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (a built-in set, or a pool + gold pair with label descriptions)")
    data.add_argument(
        "--dataset",
        "--data",
        dest="dataset",
        default=None,
        help="builtin:sst2 or builtin:trec (default builtin:sst2 when no --pool is given)",
    )
    data.add_argument(
        "--pool", help="unlabeled pool, JSONL with 'text' (a 'label' is kept hidden, to score the teacher)"
    )
    data.add_argument("--gold", help="gold set, JSONL with 'text' and 'label'")
    data.add_argument("--labels", help="label descriptions, YAML: {name: description} or a list of {name, description}")
    data.add_argument("--pool-size", type=int, help="sample this many pool rows (default 1500; 0 = the whole pool)")
    data.add_argument("--gold-size", type=int, help="sample this many gold rows (default: the whole gold set)")
    models = parser.add_argument_group("models")
    models.add_argument(
        "--teacher",
        choices=("embedding", "hf", "vllm"),
        default="embedding",
        help="teacher backend (default: the offline embedding teacher)",
    )
    models.add_argument("--teacher-model", help="teacher model (hub id or local dir; default the backend's)")
    models.add_argument("--student", help=f"student model (default {MINILM}; --quick: a tiny random BERT)")
    runs = parser.add_argument_group("strategies and budget")
    runs.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default all five)")
    runs.add_argument(
        "--candidates",
        default="1",
        help="llkd's candidates_per_step M values to compare, comma-separated; fillN for adaptive M "
        "capped at N (selection.fill_batch) (default 1, the default M)",
    )
    runs.add_argument("--seeds", type=int, help="seeds per strategy (default 3)")
    runs.add_argument(
        "--budget",
        type=float,
        help=f"compute budget of every strategy, in passes of `all` over the pool (default {DEFAULT_BUDGET:g})",
    )
    runs.add_argument(
        "--steps", type=int, help="compare at equal steps instead: this many training steps for every strategy"
    )
    runs.add_argument("--eval-points", type=int, help="gold-set evaluations along each run (default 8)")
    runs.add_argument("--batch-size", type=int, help="global batch size (default 32)")
    runs.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, help="default 1e-4")
    runs.add_argument("--max-length", type=int, help="student max tokens (default 64)")
    runs.add_argument("--momentum", type=float, help=f"threshold EMA momentum (default {DEFAULT_MOMENTUM})")
    runs.add_argument("--workers", type=int, help="Ray Train workers per run (default 1)")
    runs.add_argument(
        "--cpus-per-worker", type=float, help="CPUs (torch threads) per worker (default: cores / workers)"
    )
    labeling = parser.add_argument_group("labeling axis (how much of the pool must the teacher label? docs/quality.md)")
    labeling.add_argument(
        "--labeling-budgets",
        help="fractions of the pool the teacher labels, e.g. 0.1,0.2,0.3,0.5: for each, a random subset "
        "then the strategy, and student-guided rounds to the same fraction, at equal student compute",
    )
    labeling.add_argument(
        "--labeling-rounds", type=int, help="rounds of the student-guided arm (default 3; --quick: 2)"
    )
    labeling.add_argument("--labeling-strategy", help="strategy the labeling arms train with (default llkd)")
    labeling.add_argument(
        "--labeling-explore",
        type=float,
        help="share of each later slice of the rounds drawn at random (labeling.explore; default 0)",
    )
    labeling.add_argument(
        "--labeling-choose",
        help="rules of the rounds' later slices, one rounds arm each, e.g. entropy,llkd,bald "
        "(labeling.choose: entropy, bald, disagreement, llkd, head_entropy, gated_head; default entropy)",
    )
    labeling.add_argument(
        "--labeling-first",
        choices=("random", "typical"),
        help="the rounds' first slice (labeling.first; default random)",
    )
    labeling.add_argument(
        "--labeling-clip", type=float, help="share of the most uncertain rows the rounds set aside (labeling.clip)"
    )
    labeling.add_argument(
        "--count-teacher", action="store_true", help="total the teacher's FLOPs with the student's in that table"
    )
    runs.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any pipeline config value for every run, e.g. --set selection.weighting=none",
    )
    parser.add_argument("--output", "-o", help="output directory (default runs/bench-quality-NAME)")
    parser.add_argument("--quick", action="store_true", help="tiny pool and student, one seed, a few steps (CI)")
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing: write the results of the runs finished so far"
    )
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="count the runs of an earlier results.json of the same settings as finished (repeatable)",
    )


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    settings = BenchSettings(teacher=args.teacher, teacher_model=args.teacher_model, overrides=list(args.overrides))
    if args.quick:
        for key, value in QUICK.items():
            setattr(settings, key, value)
        settings.overrides = [*QUICK_OVERRIDES, *settings.overrides]
    if args.labeling_budgets:
        settings.labeling_budgets = parse_fractions(args.labeling_budgets)
    if args.labeling_rounds is not None or args.quick:
        settings.labeling_rounds = args.labeling_rounds or QUICK_LABELING_ROUNDS
    settings.labeling_strategy = args.labeling_strategy or settings.labeling_strategy
    if args.labeling_explore is not None:
        settings.labeling_explore = args.labeling_explore
    if args.labeling_choose:
        settings.labeling_choose = [c.strip() for c in args.labeling_choose.split(",") if c.strip()]
    settings.labeling_first = args.labeling_first or settings.labeling_first
    if args.labeling_clip is not None:
        settings.labeling_clip = args.labeling_clip
    settings.count_teacher = args.count_teacher
    keys = ("seeds", "budget", "steps", "eval_points", "batch_size", "learning_rate", "max_length", "momentum")
    for key in (*keys, "workers", "gold_size"):
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    if args.steps is not None and args.budget is not None:
        raise ConfigError("--budget (equal compute) and --steps (equal steps) are two budgets; give one of them")
    if args.steps is not None:
        settings.budget = None
    else:
        settings.steps = None
    if settings.budget is not None and settings.budget <= 0:
        raise ConfigError("--budget must be positive (passes of `all` over the pool, e.g. 5)")
    settings.cpus_per_worker = args.cpus_per_worker or float(max(1, (os.cpu_count() or 1) // settings.workers))
    if args.pool_size is not None:
        settings.pool_size = args.pool_size or None
    if args.student:
        settings.student = args.student
    for key in ("seeds", "steps", "eval_points", "batch_size", "max_length", "workers"):
        if getattr(settings, key) is not None and getattr(settings, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")
    return settings


def quality_main(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """``llkd bench quality``: run the benchmark and write results.json, results.md, quality.png."""
    settings = settings_from_args(args)
    variants = build_variants(
        [s.strip() for s in args.strategies.split(",") if s.strip()], parse_candidates(args.candidates)
    )
    if settings.labeling_budgets:
        variants += labeling_variants(
            settings.labeling_strategy, settings.labeling_budgets, settings.labeling_rounds, settings.labeling_explore,
            settings.labeling_choose, settings.labeling_first, settings.labeling_clip,
        )  # fmt: skip
    dataset = args.dataset or (None if args.pool else "builtin:sst2")
    name = dataset_name(dataset, args.pool)
    output = Path(args.output or f"runs/bench-quality-{name}{'-quick' if args.quick else ''}")
    data = prepare_data(
        dataset=dataset,
        pool=args.pool,
        gold=args.gold,
        labels_file=args.labels,
        pool_size=settings.pool_size,
        gold_size=settings.gold_size,
        sample_seed=settings.sample_seed,
        directory=output / "work" / "data",
    )
    if args.quick and not args.student:
        from llkd_ray.testing import build_tiny_encoder

        settings.student = str(build_tiny_encoder(output / "work" / "tiny-student"))
    log(
        f"quality benchmark on {data.name}: pool {data.pool_rows} rows, gold {data.gold_rows} rows, "
        f"{len(variants)} strategies x {settings.seeds} seed(s), {settings.budget_text}"
    )
    started = time.perf_counter()
    reuse = [Path(p) for p in args.reuse]
    results = run_benchmark(data, settings, variants, output, train=not args.report_only, reuse=reuse, log=log)
    results["wall_time_s"] = time.perf_counter() - started
    paths = write_results(results, output)
    log("")
    log(paths["md"].read_text())
    log(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0
