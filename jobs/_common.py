"""Shared bits of the Ray job entry points (``ray job submit --working-dir . -- python jobs/X.py``).

Jobs import the installed ``llkd_ray``; when it is not installed on the node, the submitted
working directory (the repository checkout) provides it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import llkd_ray  # noqa: F401
except ImportError:  # not installed on this node: use the package in the submitted working dir
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def config_parser(description: str) -> argparse.ArgumentParser:
    """A job's parser: ``--config`` (a path inside the working dir) and ``--set``, as in ``llkd``."""
    from llkd_ray.cli import add_config_arguments

    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    return parser


def run(main) -> None:
    """Run a job's ``main`` so user errors end the job with one line and a non-zero status."""
    from llkd_ray.errors import LlkdError

    try:
        sys.exit(main())
    except LlkdError as error:
        print(f"llkd job: error: {error}", file=sys.stderr)
        sys.exit(2)
