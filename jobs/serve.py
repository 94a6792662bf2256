"""Ray job: serve a trained student over HTTP with Ray Serve (runs until the job is stopped).

ray job submit --working-dir . -- python jobs/serve.py --config configs/demo.yaml --model /tmp/runs/train/student
"""

from __future__ import annotations

from _common import config_parser, run


def main() -> int:
    parser = config_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="student model directory (train output's student/)")
    args = parser.parse_args()

    from llkd_ray.config import load_config
    from llkd_ray.runtime import init_ray
    from llkd_ray.serve.server import run_server

    config = load_config(args.config, args.overrides)
    init_ray()
    run_server(args.model, config)
    return 0


if __name__ == "__main__":
    run(main)
