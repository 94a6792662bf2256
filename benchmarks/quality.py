"""Quality benchmark: LLKD against its baselines on real data (same as ``llkd bench quality``).

    python benchmarks/quality.py --dataset builtin:trec --quick
    python benchmarks/quality.py --dataset builtin:sst2 --output runs/bench-quality-sst2
    python benchmarks/quality.py --pool pool.jsonl --gold gold.jsonl --labels labels.yaml

Writes results.json, results.md and quality.png into the output directory; see docs/quality.md.
"""

import sys

from llkd_ray.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
