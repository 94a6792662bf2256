"""Why the label stage keeps its own committed-ids filter instead of Ray Data's CheckpointConfig.

Ray 2.60's checkpointing (``DataContext.checkpoint_config``, beta) applies only to a plan that
ends in a Ray Data write (or a streaming split) and filters rows at the read by an id column the
read itself produces. The label stage ends in its teacher actors, which commit each block
themselves so that the actor pool can take the cluster's CPUs, and its ids are made after the read
(the id column or a hash of file and position). Ray Data therefore switches checkpointing off for
it, with a warning, and the stage's own resume (docs/labeling.md) stays in charge. This test shows
it on the real pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llkd_ray.config import load_config
from llkd_ray.label.run import label_corpus

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.mark.heavy  # a label run, for a property of Ray Data
def test_ray_data_checkpointing_does_not_apply_to_the_label_pipeline(ray_local, tmp_path):
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    context = DataContext.get_current()
    previous = context.checkpoint_config
    checkpoints = tmp_path / "ray-checkpoints"
    context.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=str(checkpoints))
    config = load_config(DEMO, ["data.limit=30", "teacher.block_rows=10"])
    try:
        with pytest.warns(UserWarning, match="doesn't support checkpointing"):
            result = label_corpus(config, tmp_path / "labels")
    finally:
        context.checkpoint_config = previous
    assert result.counts["labeled"] == 30
    assert not checkpoints.exists() or not any(checkpoints.rglob("*.parquet"))
