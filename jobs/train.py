"""Ray job: train the student on pseudo-labels with LLKD selection (Ray Train, DDP).

    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml \
        --labels /tmp/runs/labels --output /tmp/runs/train
"""

from __future__ import annotations

from _common import config_parser, run


def main() -> int:
    parser = config_parser(__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="labels directory written by the label stage")
    parser.add_argument("--output", "-o", required=True, help="training output directory")
    args = parser.parse_args()

    from llkd_ray.config import load_config
    from llkd_ray.train.launch import train_student

    config = load_config(args.config, args.overrides)
    # train_student joins the job's cluster (RAY_ADDRESS) or starts a local Ray sized for its workers.
    train_student(config, labels=args.labels, output=args.output)
    return 0


if __name__ == "__main__":
    run(main)
