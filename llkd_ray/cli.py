"""The ``llkd`` command line.

Each subcommand parses its arguments, loads and validates the config at the edge, and calls the
stage's Python API. User errors (:class:`~llkd_ray.errors.LlkdError`) print one line and exit 2;
only bugs print a traceback. Heavy imports (torch, Ray) happen inside the handlers, so
``llkd --help`` and ``llkd config validate`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from llkd_ray.artifacts import STAGES
from llkd_ray.config import STRATEGIES, PipelineConfig, load_config
from llkd_ray.errors import ConfigError, run_reporting_errors

Handler = Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--config`` and repeatable ``--set KEY=VALUE``, for every command and job that loads a config."""
    parser.add_argument("--config", "-c", required=required, help="pipeline config (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.workers=1 (repeatable)",
    )


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """``--plan`` and its settings, for ``llkd label`` and ``llkd run``: the labeling bill before it is run."""
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print rows, teacher tokens, FLOPs and GPU-hours of labeling from a sample; start nothing",
    )
    parser.add_argument("--plan-rows", type=_positive_int, default=1000, help="rows sampled by --plan (default 1000)")
    parser.add_argument(
        "--plan-peak-tflops", type=_positive_float, default=989.0, help="--plan: accelerator peak (H100/H200 bf16: 989)"
    )
    parser.add_argument("--plan-mfu", type=_positive_float, default=0.3, help="--plan: utilisation of the peak (0.3)")


def _print_plan(config: PipelineConfig, args: argparse.Namespace) -> int:
    """``--plan``: the labeling forecast, without Ray or an engine."""
    from llkd_ray.errors import ConfigError
    from llkd_ray.label.cost import label_plan

    if args.plan_mfu > 1:
        raise ConfigError(f"--plan-mfu {args.plan_mfu}: a share of the peak, at most 1")
    plan = label_plan(config, sample_rows=args.plan_rows, peak_tflops=args.plan_peak_tflops, mfu=args.plan_mfu)
    if getattr(args, "json", False):
        _print_json(plan.to_dict())
    else:
        print(plan.describe())
    return 0


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def _load(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def _print_json(payload: object) -> None:
    print(json.dumps(payload, indent=2, default=str))


# --------------------------------------------------------------------------- config


def _config_validate(args: argparse.Namespace) -> int:
    config = _load(args)
    print(
        f"{args.config}: valid ({len(config.task.labels)} labels, teacher {config.teacher.backend}, "
        f"strategy {config.selection.strategy})"
    )
    return 0


def _config_show(args: argparse.Namespace) -> int:
    print(_load(args).to_yaml(), end="")
    return 0


# --------------------------------------------------------------------------- data


def _data_inspect(args: argparse.Namespace) -> int:
    from llkd_ray.config import DataConfig
    from llkd_ray.corpus import check_input, inspect_corpus
    from llkd_ray.runtime import init_ray

    data = DataConfig(
        input=args.reference,
        text_column=args.text_column,
        label_column=args.label_column,
        id_column=args.id_column,
        max_chars=args.max_chars,
    )
    check_input(data)  # a wrong path or column fails at once, before a Ray starts
    init_ray()
    stats = inspect_corpus(data)
    if args.json:
        _print_json(stats.to_dict())
        return 0
    print(f"{stats.reference}: {stats.rows} rows, {stats.valid} valid, {stats.rejected} rejected")
    for reason, count in stats.rejected_by_reason.items():
        print(f"  rejected {reason}: {count}")
    if stats.label_distribution:
        print(f"labels ({len(stats.label_distribution)}):")
        for label, count in stats.label_distribution.items():
            print(f"  {label}: {count} ({count / max(stats.valid, 1):.1%})")
    if stats.text_length_percentiles:
        lengths = ", ".join(f"{k} {v:.0f}" for k, v in stats.text_length_percentiles.items())
        print(f"text length (chars): {lengths}")
    return 0


# --------------------------------------------------------------------------- label


def _label(args: argparse.Namespace) -> int:
    from llkd_ray.label.run import label_corpus
    from llkd_ray.runtime import init_ray

    overrides = [*args.overrides, *([f"teacher.backend={args.teacher}"] if args.teacher else [])]
    config = load_config(args.config, overrides)
    if args.input:
        config.data.input = args.input
    if args.limit:
        config.data.limit = args.limit
    if args.plan:
        return _print_plan(config, args)
    output = args.output or f"runs/{Path(args.config).stem}/labels"
    # Ray's logs beside the labels, never inside: a labels directory is a data set (its readers
    # take every part) and refuses files it does not know.
    init_ray(log_dir=Path(args.logs or logs_beside(output)))
    result = label_corpus(config, output, overwrite=args.overwrite)
    print(result.summary())
    return 0


def logs_beside(path: str | Path) -> Path:
    """``DIR.logs``: where a command that writes (or reads) ``DIR`` puts Ray's own logs."""
    path = Path(path)
    return path.with_name(f"{path.name or path.resolve().name}.logs")


# --------------------------------------------------------------------------- train / eval


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """``llkd train``'s own options as ``--set`` overrides, applied after the others: one config,
    validated once, reaches the trainer. A budget of one kind clears the other kind's."""
    if args.max_steps is not None and args.budget is not None:
        raise ConfigError("give a step budget (--max-steps) or a compute budget (--budget), not both")
    overrides = [f"selection.strategy={args.strategy}"] if args.strategy else []
    overrides += [f"training.workers={args.workers}"] if args.workers else []
    if args.max_steps is not None:
        overrides += [f"training.max_steps={args.max_steps}", "training.budget=null"]
    if args.budget is not None:
        overrides += [f"training.budget={args.budget}", "training.max_steps=null"]
    return overrides


def _train(args: argparse.Namespace) -> int:
    from llkd_ray.train.launch import CONFIG_GOLD, format_training, train_student

    config = load_config(args.config, [*args.overrides, *_train_overrides(args)])
    eval_data = None if args.no_eval else (args.eval or CONFIG_GOLD)
    summary = train_student(config, labels=args.labels, output=args.output, eval_data=eval_data)
    print(format_training(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from llkd_ray.evaluate import evaluate_model
    from llkd_ray.metrics import format_metrics

    metrics = evaluate_model(
        args.model, args.data, text_column=args.text_column, label_column=args.label_column, backend=args.backend
    )
    if args.json:
        _print_json(metrics)
    else:
        print(f"{args.model} ({metrics['backend']}) on {args.data}")
        print(format_metrics(metrics))
    return 0


def _export(args: argparse.Namespace) -> int:
    from llkd_ray.serve.export import export_onnx, read_gold_set

    gold = None
    if args.gold:
        from llkd_ray.runtime import init_ray

        init_ray()
        gold = read_gold_set(args.model, args.gold, text_column=args.text_column, label_column=args.label_column)
    result = export_onnx(
        args.model,
        args.output,
        quantize=None if args.quantize == "none" else args.quantize,
        gold=gold,
        max_f1_drop=args.max_f1_drop,
        overwrite=args.overwrite,
    )
    print(result.summary())
    return 0


# --------------------------------------------------------------------------- bench


def _bench_quality(args: argparse.Namespace) -> int:
    from llkd_ray.quality.cli import quality_main

    return quality_main(args)


# --------------------------------------------------------------------------- pipeline


def _run(args: argparse.Namespace) -> int:
    from llkd_ray.pipeline.run import format_summary, run_pipeline

    config = _load(args)
    if args.plan:
        return _print_plan(config, args)
    output = args.output or f"runs/{Path(args.config).stem}"
    result = run_pipeline(config, output, serve=args.serve, force=args.force)
    if not args.serve:
        print(format_summary(result))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from llkd_ray.pipeline.run import run_demo

    run_demo(quick=args.quick, output=args.output, overrides=args.overrides, force=args.force)
    return 0


def _report(args: argparse.Namespace) -> int:
    from llkd_ray.report.page import build_report

    print(build_report(args.run))
    return 0


# --------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    from llkd_ray.serve.server import run_server

    logs = Path(args.logs or logs_beside(args.model))
    return run_server(args.model, args.config, overrides=args.overrides, host=args.host, port=args.port, log_dir=logs)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llkd",
        description="Distil an LLM teacher into a small served classifier on Ray (LLKD).",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="Ray's own logs on the console (else to files: RUN/logs/, OUTPUT.logs/ or --logs; also LLKD_VERBOSE=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in (_add_inspection, _add_stages, _add_bench, _add_pipeline, _add_serve):
        add_commands(commands)
    return parser


#: What ``ArgumentParser.add_subparsers`` returns: each ``_add_*`` below adds its commands to it.
Commands = argparse._SubParsersAction


def _add_inspection(commands: Commands) -> None:
    """``llkd config validate|show`` and ``llkd data inspect``."""
    config = commands.add_parser("config", help="validate or show a pipeline config")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    for name, handler, help_text in (
        ("validate", _config_validate, "check a config; exit non-zero naming the bad key"),
        ("show", _config_show, "print the resolved config with every default filled in"),
    ):
        sub = config_commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="pipeline config (YAML)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        sub.set_defaults(handler=handler)

    data = commands.add_parser("data", help="look at a corpus")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    inspect = data_commands.add_parser("inspect", help="rows, rejections by reason, labels, text lengths")
    inspect.add_argument("reference", help="file, directory, glob, URI or builtin:NAME/SPLIT")
    inspect.add_argument("--text-column", default="text")
    inspect.add_argument("--label-column", default="label", help="gold label column, counted when present")
    inspect.add_argument("--id-column", default=None)
    inspect.add_argument("--max-chars", type=int, default=20_000)
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(handler=_data_inspect)


def _add_stages(commands: Commands) -> None:
    """The stages one by one: ``llkd label``, ``llkd train``, ``llkd eval``, ``llkd export``."""
    label = commands.add_parser("label", help="the teacher pseudo-labels a corpus into Parquet (resumable)")
    add_config_arguments(label)
    label.add_argument("--input", default=None, help="corpus reference (default: data.input of the config)")
    label.add_argument("--output", "-o", default=None, help="labels directory (default runs/CONFIG-NAME/labels)")
    label.add_argument("--teacher", choices=("vllm", "hf", "embedding"), default=None, help="teacher backend")
    label.add_argument("--limit", type=_positive_int, default=None, help="label at most the first N rows")
    label.add_argument("--overwrite", action="store_true", help="replace labels of a different config in --output")
    label.add_argument("--logs", default=None, metavar="DIR", help="Ray's own logs (default: OUTPUT.logs beside it)")
    add_plan_arguments(label)
    label.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    label.set_defaults(handler=_label)

    train = commands.add_parser("train", help="train the student on pseudo-labels with LLKD selection (Ray Train)")
    add_config_arguments(train)
    train.add_argument("--labels", required=True, help="labels directory written by `llkd label`")
    train.add_argument("--output", "-o", required=True, help="output directory (student/, metrics.jsonl, ...)")
    train.add_argument("--strategy", choices=STRATEGIES, default=None, help="selection strategy (default: config)")
    train.add_argument("--workers", type=_positive_int, default=None, help="Ray Train workers (default: config)")
    train.add_argument("--max-steps", type=_positive_int, default=None, help="step budget (default: config epochs)")
    train.add_argument(
        "--budget",
        type=_positive_float,
        default=None,
        help="compute budget in passes of `all` over the pool, scoring included (replaces the step budget)",
    )
    train.add_argument(
        "--eval", default=None, metavar="REF", help="gold set evaluated during training (default data.gold)"
    )
    train.add_argument("--no-eval", action="store_true", help="no gold-set evaluation during training")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="accuracy, macro-F1, per-class report, confusion matrix")
    evaluate.add_argument("--model", required=True, help="sequence-classification model directory")
    evaluate.add_argument("--data", required=True, help="gold set (text, label): file, directory, builtin:NAME/SPLIT")
    evaluate.add_argument("--text-column", default="text")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument(
        "--backend", choices=("auto", "torch", "onnx"), default="auto", help="runtime (default: the directory's)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.set_defaults(handler=_eval)

    from llkd_ray.serve.export import DEFAULT_MAX_F1_DROP, FORMATS, QUANTIZATIONS

    export = commands.add_parser(
        "export", help="the student as an ONNX graph (fp32 or int8) for CPU serving, checked against torch"
    )
    export.add_argument("--model", required=True, help="torch sequence-classification directory (RUN/train/student)")
    export.add_argument("--output", "-o", required=True, help="directory to write (llkd serve/eval take it as --model)")
    export.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default onnx)")
    export.add_argument(
        "--quantize", choices=(*QUANTIZATIONS, "none"), default="none", help="int8: dynamic int8 weights (default none)"
    )
    export.add_argument("--gold", default=None, metavar="REF", help="gold set to compare macro-F1 on (text, label)")
    export.add_argument("--text-column", default="text")
    export.add_argument("--label-column", default="label")
    export.add_argument(
        "--max-f1-drop",
        type=float,
        default=DEFAULT_MAX_F1_DROP,
        metavar="POINTS",
        help=f"fail when the export's macro-F1 on --gold is more points below torch's (default {DEFAULT_MAX_F1_DROP})",
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    export.set_defaults(handler=_export)


def _add_bench(commands: Commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    quality = bench_commands.add_parser(
        "quality", help="LLKD against its baselines on a labeled data set: results.json, results.md, quality.png"
    )
    from llkd_ray.quality.cli import add_quality_arguments

    add_quality_arguments(quality)
    quality.set_defaults(handler=_bench_quality)


def _add_pipeline(commands: Commands) -> None:
    """``llkd run``, ``llkd demo`` and ``llkd report``: the stages in one go, on a run directory."""
    run = commands.add_parser("run", help="label -> train -> evaluate -> report (-> serve), resuming finished stages")
    add_config_arguments(run)
    run.add_argument("--output", "-o", default=None, help="run directory (default runs/CONFIG-NAME)")
    run.add_argument("--serve", action="store_true", help="serve the student when the pipeline is done")
    run.add_argument("--force", choices=STAGES, default=None, help="redo this stage and every stage after it")
    add_plan_arguments(run)
    run.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    run.set_defaults(handler=_run)

    demo = commands.add_parser("demo", help="the offline demo: SST-2, embedding teacher, MiniLM student, report")
    demo.add_argument("--quick", action="store_true", help="small pool, few steps (about 2 minutes on 2 cores)")
    demo.add_argument("--output", "-o", default=None, help="run directory (default runs/demo or runs/demo-quick)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--force", choices=STAGES, default=None, help="redo this stage and every stage after it")
    demo.set_defaults(handler=_demo)

    report = commands.add_parser("report", help="write RUN/report/index.html with plots from a run directory")
    report.add_argument("run", help="run directory written by llkd run / llkd demo")
    report.set_defaults(handler=_report)


def _add_serve(commands: Commands) -> None:
    serve = commands.add_parser(
        "serve", help="serve a student over HTTP on Ray Serve (blocks until Ctrl-C; see docs/serving.md)"
    )
    serve.add_argument("--model", required=True, help="sequence-classification model directory (with id2label)")
    serve.add_argument("--host", default=None, help="bind address (default serving.host: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default serving.port: 8000)")
    serve.add_argument("--logs", default=None, metavar="DIR", help="Ray's own logs (default: MODEL.logs beside it)")
    add_config_arguments(serve, required=False)
    serve.set_defaults(handler=_serve)


def main(argv: Sequence[str] | None = None) -> int:
    from llkd_ray.console import set_verbose

    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    handler: Handler = args.handler
    return run_reporting_errors(handler, args)


if __name__ == "__main__":
    sys.exit(main())
