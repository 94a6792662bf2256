"""Ray job: the whole pipeline (label → train → evaluate → report), resumable stage by stage.

ray job submit --working-dir . -- python jobs/pipeline.py --config configs/quick.yaml --output /tmp/runs/quick
"""

from __future__ import annotations

from pathlib import Path

from _common import config_parser, run


def main() -> int:
    parser = config_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        help="run directory: an absolute path (on a multi-node cluster, shared storage)",
    )
    parser.add_argument("--force", default=None, help="redo this stage and every stage after it")
    args = parser.parse_args()

    from llkd_ray.config import load_config
    from llkd_ray.pipeline.run import format_summary, run_pipeline

    config = load_config(args.config, args.overrides)
    output = Path(args.output).resolve()  # a relative path lands in the job's temporary working dir
    # run_pipeline joins the job's cluster (init_ray reads the RAY_ADDRESS the job supervisor sets),
    # or, run by hand, starts a local Ray sized for the trainer.
    result = run_pipeline(config, output, force=args.force)
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    run(main)
