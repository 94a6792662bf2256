"""Multi-node: the quick pipeline on a head and 2 worker nodes (ray.cluster_utils.Cluster) labels the
same rows as a single-node run, with labeling actors and training workers on different nodes.

Runs in a subprocess (tests/scenarios.py): the cluster must not share a process with the local Ray
this test session holds.
"""

from __future__ import annotations

import pytest
from scenarios import SCENARIO_ROWS, run_scenario, small_data


@pytest.mark.heavy
@pytest.mark.timeout(700)
def test_quick_pipeline_on_three_nodes_matches_a_single_node_run(tmp_path):
    outcome = run_scenario("multinode", tmp_path, "training.max_steps=8", *small_data(tmp_path))
    assert outcome["_returncode"] == 0, outcome["_log"]
    assert outcome["nodes"] == 3
    assert SCENARIO_ROWS >= outcome["multi_rows"] == outcome["single_rows"] > 0
    assert outcome["same_ids"], "the same row set on 3 nodes as on 1"
    assert outcome["duplicate_ids"] == 0
    assert outcome["same_labels"], "the same pseudo-labels on 3 nodes as on 1"
    placement = outcome["placement"]
    teacher_nodes = {node for name, nodes in placement.items() if "TeacherActor" in name for node in nodes}
    assert len(teacher_nodes) >= 2, f"labeling actors spread over nodes: {placement}"
    assert len(placement.get("RayTrainWorker", [])) >= 2, f"training workers spread over nodes: {placement}"
    assert (tmp_path / "multi" / "eval.json").is_file()
    assert (tmp_path / "multi" / "report" / "index.html").is_file()
