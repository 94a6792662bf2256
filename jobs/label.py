"""Ray job: the teacher labels a corpus into Parquet pseudo-labels.

ray job submit --working-dir . -- python jobs/label.py --config configs/demo.yaml --output /tmp/runs/labels
"""

from __future__ import annotations

from _common import config_parser, run


def main() -> int:
    parser = config_parser(__doc__.splitlines()[0])
    parser.add_argument("--output", "-o", required=True, help="labels directory")
    parser.add_argument("--input", default=None, help="corpus reference (default: data.input of the config)")
    parser.add_argument("--limit", type=int, default=None, help="label at most this many rows")
    args = parser.parse_args()

    from llkd_ray.config import load_config
    from llkd_ray.label.run import label_corpus
    from llkd_ray.runtime import init_ray

    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"data.input={args.input}")
    if args.limit:
        overrides.append(f"data.limit={args.limit}")
    config = load_config(args.config, overrides)
    init_ray()
    label_corpus(config, output=args.output)
    return 0


if __name__ == "__main__":
    run(main)
