"""The labeling stage on a local Ray: output contract, resume, exactly-once, bad input, autoscaling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from llkd_ray.artifacts import MANIFEST, REJECTED_DIR
from llkd_ray.cli import main
from llkd_ray.config import load_config, validate_config
from llkd_ray.errors import ConfigError
from llkd_ray.label.run import label_corpus
from llkd_ray.label.scan import read_labels, scan_output
from llkd_ray.label.store import JOB_FILE, OutputStore, commit_block
from llkd_ray.sessions import freeze_session, kill_session

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
LABEL_COLUMNS = ["id", "text", "pseudo_label", "label_index", "confidence", "probs", "truncated", "teacher_tokens"]


def parts(directory: Path, sub: str = "") -> list[Path]:
    return sorted((directory / sub).glob("part-*.parquet"))


def read_dir(directory: Path, sub: str = "") -> pd.DataFrame:
    files = parts(directory, sub)
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True) if files else pd.DataFrame()


def manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def write_config(path: Path, *overrides: str) -> Path:
    raw = load_config(DEMO, list(overrides)).model_dump(mode="json")
    path.write_text(yaml.safe_dump(raw))
    return path


def expected_ids(config) -> tuple[set[str], set[str]]:
    """(accepted ids, rejected ids) of the corpus the config names, read independently."""
    from llkd_ray.corpus import read_corpus

    corpus = read_corpus(config.data)
    return tuple(
        {row["id"] for row in dataset.select_columns(["id"]).iter_rows()}  # type: ignore[return-value]
        for dataset in (corpus.rows, corpus.rejected)
    )


def check_label_rows(frame: pd.DataFrame, names: list[str]) -> None:
    probs = np.array(frame["probs"].tolist())
    assert probs.shape == (len(frame), len(names))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (frame["confidence"].to_numpy() == probs.max(axis=1)).all()
    assert (frame["label_index"].to_numpy() == probs.argmax(axis=1)).all()
    assert frame["pseudo_label"].tolist() == [names[i] for i in frame["label_index"]]
    assert not frame["id"].duplicated().any()


# --------------------------------------------------------------------------- the demo teacher, end to end


@pytest.mark.heavy  # four label runs of 400 rows (the fast lane labels in test_label_single_pass)
def test_llkd_label_demo_400_rows_then_resume_then_refuse_other_config(ray_local, tmp_path, capsys):
    out = tmp_path / "labels"
    assert main(["label", "--config", DEMO, "--limit", "400", "--output", str(out)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("label: 400 labeled, 0 rejected of 400 rows") and "rows/s" in summary
    assert "gold accuracy" in summary and "mean confidence" in summary

    frame = read_dir(out)
    assert list(frame.columns) == [*LABEL_COLUMNS, "gold_label"]
    assert len(frame) == 400
    check_label_rows(frame, ["negative", "positive"])
    agreement = (frame["pseudo_label"] == frame["gold_label"]).mean()
    assert agreement >= 0.65, agreement  # measured 0.7275 on these 400 rows

    m = manifest(out)
    assert m["input"] == "builtin:sst2/train" and m["limit"] == 400
    assert m["counts"] == {
        "read": 400,
        "labeled": 400,
        "rejected": 0,
        "truncated": 0,
        "rejected_by_reason": {},
        "duplicates_removed": 0,
    }
    assert m["label_distribution"] == frame["pseudo_label"].value_counts().reindex(m["labels"]).to_dict()
    assert m["mean_confidence"] == pytest.approx(frame["confidence"].mean())
    assert m["gold_accuracy"] == pytest.approx(agreement)
    assert m["teacher"]["backend"] == "embedding" and m["teacher"]["model"] == "builtin:minilm"
    assert len(m["teacher"]["prompt_hash"]) == 16 and len(m["config_hash"]) == 16
    assert m["wall_time_s"] > 0 and m["rows_per_s"] > 0
    assert sum(m["rows_per_actor"].values()) == 400
    assert not list(out.glob(".*.tmp"))

    # Same config again: everything is committed already, nothing is labeled twice.
    files_before = {p.name: p.stat().st_mtime_ns for p in parts(out)}
    assert main(["label", "--config", DEMO, "--limit", "400", "--output", str(out)]) == 0
    again = manifest(out)
    assert again["run"]["rows"] == 0 and again["run"]["skipped_already_committed"] == 400
    assert again["counts"]["labeled"] == 400
    assert {p.name: p.stat().st_mtime_ns for p in parts(out)} == files_before

    # Another config into the same directory is refused (exit 2, one line), unless --overwrite.
    other = [
        "label",
        "--config",
        DEMO,
        "--limit",
        "400",
        "--output",
        str(out),
        "--set",
        "teacher.embedding.temperature=0.1",
    ]
    assert main(other) == 2
    assert "different config" in capsys.readouterr().err
    assert main([*other, "--overwrite"]) == 0
    assert manifest(out)["config_hash"] != m["config_hash"]
    assert len(read_dir(out)) == 400


# --------------------------------------------------------------------------- bad input and bad configs


@pytest.fixture
def messy_corpus(tmp_path) -> Path:
    rows = [{"text": f"a fine film, number {i}"} for i in range(30)]
    rows += [
        {"text": ""},
        {"text": "   "},
        {"other": "no text at all"},
        {"text": 42},
        {"text": "way too long " * 100},
        {"text": "an endless, pointless, tedious slog " * 30},  # long for the teacher, fine for the reader
    ]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_hf_teacher_labels_good_rows_rejects_bad_ones_flags_truncation(ray_local, tmp_path, tiny_llm_dir, messy_corpus):
    from llkd_ray.label.teachers.check import check_teacher
    from llkd_ray.label.teachers.hf import HFTeacher

    config = load_config(
        DEMO,
        [
            f"data.input={messy_corpus}",
            "data.label_column=null",
            "data.max_chars=1200",
            "teacher.backend=hf",
            f"teacher.hf.model={tiny_llm_dir}",
            "teacher.hf.max_model_len=128",
            "teacher.hf.batch_size=8",
            "teacher.block_rows=10",
        ],
    )
    out = tmp_path / "labels"
    result = label_corpus(config, out)

    labeled, rejected = read_dir(out), read_dir(out, REJECTED_DIR)
    assert list(labeled.columns) == LABEL_COLUMNS  # no gold column when the pool has none
    check_label_rows(labeled, ["negative", "positive"])
    assert len(labeled) == 31 and len(rejected) == 5
    reasons = dict(zip(rejected["text"].fillna("<missing>"), rejected["reason"], strict=True))
    assert reasons == {
        "": "empty_text",
        "   ": "whitespace_text",
        "<missing>": "missing_text",
        "42": "non_string_text",
        "way too long " * 100: "text_too_long",
    }
    assert labeled["truncated"].sum() == 1
    assert labeled.loc[labeled["truncated"], "text"].iloc[0].startswith("an endless")
    accepted, refused = expected_ids(config)
    assert set(labeled["id"]) == accepted and set(rejected["id"]) == refused
    assert result.counts["read"] == 36 and result.counts["truncated"] == 1
    assert result.counts["rejected_by_reason"]["text_too_long"] == 1
    assert result.manifest["gold_accuracy"] is None
    assert result.manifest["teacher"]["verbalizer_token_ids"].keys() == {"negative", "positive"}

    # The Ray stage gives exactly what the teacher gives in process.
    direct = HFTeacher(check_teacher(config.task, config.teacher)).score(labeled["text"].tolist())
    np.testing.assert_allclose(np.array(labeled["probs"].tolist()), direct.probs, atol=1e-6)
    assert read_labels(out).count() == 31


def test_empty_corpus_gives_an_empty_output_and_a_clear_message(ray_local, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "labels"
    assert main(["label", "--config", DEMO, "--input", str(empty), "--output", str(out)]) == 0
    assert "has no rows: wrote an empty label set" in capsys.readouterr().out
    m = manifest(out)
    assert m["counts"]["read"] == 0 and m["mean_confidence"] is None
    table = pq.read_table(parts(out)[0])
    assert table.num_rows == 0 and table.column_names == [*LABEL_COLUMNS, "gold_label"]


def test_a_missing_teacher_model_fails_before_any_data_is_read(tmp_path, capsys):
    out = tmp_path / "labels"
    code = main(
        [
            "label",
            "--config",
            DEMO,
            "--input",
            str(tmp_path / "no-such-corpus.jsonl"),
            "--output",
            str(out),
            "--teacher",
            "hf",
            "--set",
            f"teacher.hf.model={tmp_path / 'no-such-model'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "model directory not found" in err and "no-such-corpus" not in err
    assert not out.exists()


def test_unverbalizable_labels_fail_before_any_data_is_read(tiny_llm_dir, tmp_path):
    raw = load_config(DEMO, ["teacher.backend=hf", f"teacher.hf.model={tiny_llm_dir}"]).model_dump(mode="json")
    raw["task"]["labels"][0]["verbalizer"] = "negative review"
    raw["task"]["labels"][1]["verbalizer"] = "negative movie"
    raw["data"]["input"] = str(tmp_path / "no-such-corpus.jsonl")
    with pytest.raises(ConfigError, match="same token"):
        label_corpus(validate_config(raw), tmp_path / "labels")
    assert not (tmp_path / "labels").exists()


def test_output_holding_other_files_is_refused(ray_local, tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        label_corpus(load_config(DEMO, ["data.limit=5"]), out)


# --------------------------------------------------------------------------- exactly once


def test_commit_is_atomic_and_a_repeated_id_is_repaired(tmp_path):
    store = OutputStore(tmp_path)
    names = ["negative", "positive"]

    def block(ids, reason=None):
        return pd.DataFrame(
            {
                "id": ids,
                "text": [f"t{i}" for i in ids],
                "gold_label": ["negative"] * len(ids),
                "probs": [[0.25, 0.75]] * len(ids),
                "truncated": [False] * len(ids),
                "reason": [reason] * len(ids),
                "teacher_actor": ["a"] * len(ids),
            }
        )

    first = commit_block(block(["1", "2", "3"]), store=store, label_names=names, has_gold=True)
    assert first[["labeled", "rejected"]].values.tolist() == [[3, 0]]
    # A retried block rewrites the same part (its name is a hash of its ids).
    commit_block(block(["3", "1", "2"]), store=store, label_names=names, has_gold=True)
    assert len(parts(tmp_path)) == 1
    # A block the teacher could not label goes to rejected/ with the reason.
    commit_block(block(["9"], reason="teacher_error: boom"), store=store, label_names=names, has_gold=True)
    assert read_dir(tmp_path, REJECTED_DIR)[["id", "reason"]].values.tolist() == [["9", "teacher_error: boom"]]
    # Two blocks sharing an id (never produced by a normal run): the scan keeps one copy.
    commit_block(block(["3", "4"]), store=store, label_names=names, has_gold=True)
    totals = scan_output(store, names)
    assert totals["counts"]["duplicates_removed"] == 1
    assert sorted(read_dir(tmp_path)["id"]) == ["1", "2", "3", "4"]
    assert totals["counts"]["labeled"] == 4 and totals["counts"]["rejected"] == 1
    assert totals["gold_accuracy"] == 0.0 and totals["label_distribution"] == {"negative": 0, "positive": 4}
    assert not list(tmp_path.glob(".*.tmp"))


def _wait_for_parts(directory: Path, count: int, process: subprocess.Popen | None, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = len(parts(directory))
        if found >= count:
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the labeling job ended (rc {process.returncode}) before {count} parts")
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} parts after {timeout} s")


@pytest.mark.heavy  # a second Ray in a subprocess, killed, then a resume: 1500 rows labelled
def test_resume_after_the_job_is_killed_labels_every_id_exactly_once(ray_local, tmp_path):
    settings = ["data.limit=1500", "teacher.embedding.batch_size=50", "teacher.block_rows=50"]
    config_path = write_config(tmp_path / "config.yaml", *settings)
    out = tmp_path / "labels"
    env = os.environ | {"RAY_ADDRESS": "local"}  # its own local Ray, not the test session's
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen(
        [sys.executable, "-m", "llkd_ray.cli", "label", "--config", str(config_path), "--output", str(out)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_parts(out, 3, job, timeout=240)
        # Freeze the whole job the moment 3 parts are there, so it cannot finish before the kill.
        freeze_session(job.pid)
    finally:
        kill_session(job.pid)  # the job, the local Ray it started and that Ray's workers
        job.wait(timeout=60)
    committed = read_dir(out)
    assert 3 * 50 <= len(committed) < 1500, "the kill must land part-way"
    assert not (out / MANIFEST).exists() and (out / JOB_FILE).exists()

    config = load_config(config_path)
    result = label_corpus(config, out)
    labeled = read_dir(out)
    accepted, _ = expected_ids(config)
    assert not labeled["id"].duplicated().any()
    assert set(labeled["id"]) == accepted and len(accepted) == 1500
    assert set(committed["id"]) <= set(labeled["id"])
    run = result.manifest["run"]
    assert run["resumed"] and run["skipped_already_committed"] == len(committed)
    assert run["labeled"] == 1500 - len(committed)
    assert result.counts["duplicates_removed"] == 0 and result.counts["labeled"] == 1500
    check_label_rows(labeled, ["negative", "positive"])


def teacher_actors() -> dict[str, dict]:
    from ray._private.state import actors  # the GCS's view; needs no dashboard

    return {k: v for k, v in actors().items() if v["ActorClassName"].endswith("(MapBatches(TeacherActor))")}


@pytest.mark.heavy  # 1000 rows and a teacher actor restart
def test_a_teacher_actor_killed_mid_run_is_restarted_and_nothing_is_lost(ray_local, tmp_path):
    # One actor (the layout the hf backend uses by default), so that the kill hits the only one.
    overrides = ["data.limit=1000", "teacher.embedding.batch_size=50", "teacher.block_rows=50"]
    config = load_config(DEMO, [*overrides, "teacher.embedding.concurrency=1"])
    out = tmp_path / "labels"
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("result", label_corpus(config, out)))
    worker.start()
    _wait_for_parts(out, 2, None, timeout=180)
    alive = {k: v for k, v in teacher_actors().items() if v["State"] == "ALIVE"}
    assert len(alive) == 1
    ((actor_id, actor),) = alive.items()
    os.kill(actor["Pid"], signal.SIGKILL)
    worker.join(timeout=300)
    assert not worker.is_alive()
    result = outcome["result"]
    labeled = read_dir(out)
    assert len(labeled) == 1000 and not labeled["id"].duplicated().any()
    assert set(labeled["id"]) == expected_ids(config)[0]
    assert result.counts["duplicates_removed"] == 0
    assert teacher_actors()[actor_id]["NumRestarts"] >= 1


# --------------------------------------------------------------------------- autoscaling


@pytest.mark.heavy  # 2000 rows, a second teacher actor started
def test_autoscaled_pool_grows_to_two_actors_under_backlog(ray_local, tmp_path):
    config = load_config(
        DEMO,
        [
            "data.limit=2000",
            "teacher.embedding.batch_size=32",
            "teacher.block_rows=50",
            "teacher.embedding.concurrency=[1,2]",
        ],
    )
    result = label_corpus(config, tmp_path / "labels")
    per_actor = result.manifest["rows_per_actor"]
    assert len(per_actor) == 2, per_actor
    assert sum(per_actor.values()) == 2000 and min(per_actor.values()) > 0
    assert result.manifest["run"]["rows_per_actor"] == per_actor
