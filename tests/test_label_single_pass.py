"""The labeling stage reads the corpus once for both outputs, and reports how it used the machine."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import llkd_ray.corpus as corpus_module
from llkd_ray.artifacts import REJECTED_DIR
from llkd_ray.config import load_config
from llkd_ray.label.pool import plan_actor_pool
from llkd_ray.label.run import label_corpus

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def rows_read(log: Path) -> int:
    return sum(int(p.read_text()) for p in log.iterdir())


@pytest.fixture
def counted_reads(monkeypatch, tmp_path):
    """Every row the corpus reader produces is counted (in files: the reads run in Ray workers)."""
    log = tmp_path / "reads"
    log.mkdir()
    read_raw = corpus_module.read_raw

    def _log_rows(batch: pd.DataFrame, *, log: str) -> pd.DataFrame:
        # Fused into the read (a local function: Ray workers get it by value, not by module).
        with open(os.path.join(log, uuid.uuid4().hex), "w") as f:
            f.write(str(len(batch)))
        return batch

    def counting(*args, **kwargs):
        return read_raw(*args, **kwargs).map_batches(_log_rows, batch_format="pandas", fn_kwargs={"log": str(log)})

    monkeypatch.setattr(corpus_module, "read_raw", counting)
    return log


@pytest.mark.heavy  # two label runs (the first and a rerun) of the tiny corpus: ~25 s
def test_accepted_and_rejected_rows_come_from_one_read(ray_local, tmp_path, counted_reads):
    rows = [{"text": f"a fine film, number {i}"} for i in range(40)]
    rows[3] = {"text": ""}
    rows[17] = {"text": "   "}
    rows[31] = {"other": "no text"}
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(DEMO, [f"data.input={path}", "data.label_column=null", "teacher.block_rows=10"])

    result = label_corpus(config, tmp_path / "labels")

    assert rows_read(counted_reads) == 40  # once each: not once for the rejected, once for the rest
    labeled = pd.concat(pq.read_table(p).to_pandas() for p in (tmp_path / "labels").glob("part-*.parquet"))
    rejected = pd.concat(
        pq.read_table(p).to_pandas() for p in (tmp_path / "labels" / REJECTED_DIR).glob("part-*.parquet")
    )
    assert len(labeled) == 37 and sorted(rejected["reason"]) == ["empty_text", "missing_text", "whitespace_text"]
    assert set(labeled["id"]).isdisjoint(rejected["id"])
    run = result.manifest["run"]
    assert run["rows"] == 40 and run["labeled"] == 37 and run["rejected"] == 3
    assert result.counts == result.counts | {"read": 40, "labeled": 37, "rejected": 3, "duplicates_removed": 0}
    # The teacher's own time (summed over its actors): the profile of where the stage's time went.
    assert 0 < run["teacher_busy_s"] <= run["wall_time_s"] * len(run["threads_per_actor"])

    # A rerun reads the corpus once more and commits nothing new (rejected rows count as done).
    again = label_corpus(config, tmp_path / "labels")
    assert rows_read(counted_reads) == 80
    assert again.manifest["run"]["rows"] == 0 and again.manifest["run"]["skipped_already_committed"] == 40
    assert again.counts["rejected"] == 3 and again.counts["labeled"] == 37


def test_default_pool_uses_every_cpu_of_the_node_and_says_so(ray_local, tmp_path):
    config = load_config(DEMO, ["data.limit=60", "teacher.block_rows=20"])
    pool = plan_actor_pool(config.teacher.embedding)
    # One node of 2 CPUs: the embedding teacher runs one single-thread actor per CPU, each
    # reserving half a CPU, so that one CPU stays free for the reading tasks.
    assert (pool.min_size, pool.max_size, pool.threads, pool.actors_per_node, pool.num_cpus) == (2, 2, 1, 2, 0.5)
    result = label_corpus(config, tmp_path / "labels")
    run = result.manifest["run"]
    # Every actor that scored ran one thread (on 60 rows one actor may do every block).
    threads = list(run["threads_per_actor"].values())
    assert set(threads) == {1} and 1 <= len(threads) <= 2 and run["cluster_cpus"] == 2
    assert f"{len(threads)} actor(s) x 1 thread(s) on 2 CPUs" in result.summary()
    # The hf backend keeps one actor per node whose threads take the node's CPUs (one LLM copy).
    hf = plan_actor_pool(config.teacher.hf)
    assert (hf.min_size, hf.max_size, hf.threads, hf.actors_per_node, hf.num_cpus) == (1, 1, None, 1, 1.0)
    # An explicit num_cpus is kept.
    kept = plan_actor_pool(load_config(DEMO, ["teacher.embedding.num_cpus=0.25"]).teacher.embedding)
    assert (kept.max_size, kept.num_cpus) == (2, 0.25)


def test_explicit_pool_settings_are_kept(ray_local):
    config = load_config(
        DEMO, ["teacher.embedding.concurrency=[1,2]", "teacher.embedding.threads=1", "teacher.embedding.num_cpus=0.5"]
    )
    pool = plan_actor_pool(config.teacher.embedding)
    assert (pool.min_size, pool.max_size, pool.threads, pool.num_cpus) == (1, 2, 1, 0.5)
    # Two actors may share the node: "auto" threads then split its CPUs between them.
    shared = plan_actor_pool(load_config(DEMO, ["teacher.embedding.concurrency=2"]).teacher.embedding)
    assert shared.threads is None and shared.actors_per_node == 2


def _footer_readers() -> int:
    from ray._private.state import actors  # the GCS's view, dead actors included

    return sum(1 for actor in actors().values() if actor["ActorClassName"] == "FooterReader")


def test_reading_label_parts_starts_one_footer_reader_not_thirty_two(ray_local, tmp_path):
    """Ray Data lists Parquet files on a pool of FooterReader actors, 32 by default, each a Python
    worker started and killed per read: the raylet's "N PYTHON worker processes" warnings of the demo."""
    from llkd_ray import compat

    files = []
    for part in range(3):
        files.append(str(tmp_path / f"part-{part}.parquet"))
        pq.write_table(pd.DataFrame({"id": [f"{part}-{i}" for i in range(5)]}).pipe(pa.Table.from_pandas), files[-1])
    before = _footer_readers()
    assert len(compat.read_parquet(files).take_all()) == 15
    assert _footer_readers() - before == 1  # the one that reads the footers of these 3 files
    assert compat.FOOTER_ACTORS_ENV not in os.environ  # set for the read only
    assert [compat.footer_actors(n) for n in (1, 100, 101, 5000)] == [1, 1, 2, 32]
