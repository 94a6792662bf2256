"""Labeling under faults: the soak's corpus and checker, and what the soak found (bad lines that
failed the read, actors dying while they start, repeated ids lost or doubled across a resume)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from llkd_ray.artifacts import REJECTED_DIR
from llkd_ray.config import DataConfig, load_config
from llkd_ray.label.scan import scan_output
from llkd_ray.label.store import OutputStore, commit_block

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["negative", "positive"]


def _soak():
    spec = importlib.util.spec_from_file_location("label_soak", ROOT / "benchmarks" / "label_soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["label_soak"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the soak's corpus and checker


def test_the_soak_corpus_is_deterministic_with_every_kind_of_bad_row_and_unique_ids(tmp_path):
    soak = _soak()
    path = tmp_path / "corpus.jsonl"
    c = soak.build_corpus(path, 1000, 0.01, seed=4)
    other = path.read_bytes()
    b = soak.build_corpus(path, 1000, 0.01, seed=3)
    first = path.read_bytes()
    a = soak.build_corpus(path, 1000, 0.01, seed=3)
    assert path.read_bytes() == first != other
    assert set(a.bad_kinds) == set(soak.EXPECTED_REASON) and sum(a.bad_kinds.values()) == 10
    lines = first.splitlines()
    assert len(lines) == 1000
    # Every row but the repeats has its own id (the not-JSON line's is its position hash).
    assert len(a.expected) == 1000 - a.bad_kinds["duplicate_id"] == len(set(a.expected))
    assert set(a.duplicates) <= {i for i, reason in a.expected.items() if reason is None}
    assert sum(len(line) > soak.HUGE_CHARS for line in lines) == a.bad_kinds["huge"]
    assert a.expected == b.expected and c.expected != a.expected


def _fabricate(directory: Path, spec, drop: str | None = None, double: str | None = None) -> None:
    """A label directory as a correct run writes it, less ``drop`` and with ``double`` twice."""
    store = OutputStore(directory)
    good = [i for i, reason in spec.expected.items() if reason is None and i != drop]
    labeled = pd.DataFrame(
        {"id": good, "text": "t", "probs": [[0.4, 0.6]] * len(good), "truncated": False, "reason": None}
    )
    commit_block(labeled, store=store, label_names=NAMES, has_gold=False)
    if double:
        commit_block(labeled[labeled["id"] == double].assign(text="u"), store=store, label_names=NAMES, has_gold=False)
    rejected = [(i, reason) for i, reason in spec.expected.items() if reason is not None]
    rejected += [(i, "duplicate_id") for i, n in spec.duplicates.items() for _ in range(n)]
    frame = pd.DataFrame(rejected, columns=["id", "reason"]).assign(text="t", probs=None, truncated=False)
    commit_block(frame, store=store, label_names=NAMES, has_gold=False)


def test_the_soak_checker_catches_one_missing_and_one_doubled_id(tmp_path):
    soak = _soak()
    spec = soak.build_corpus(tmp_path / "corpus.jsonl", 200, 0.05, seed=0)
    _fabricate(tmp_path / "right", spec)
    right = soak.check_output(tmp_path / "right", spec)
    assert right["exactly_once"] and right["ids_missing"] == right["ids_doubled"] == 0
    assert right["rejected_by_reason"]["duplicate_id"] == sum(spec.duplicates.values())

    good = [i for i, reason in spec.expected.items() if reason is None]
    _fabricate(tmp_path / "wrong", spec, drop=good[3], double=good[7])
    wrong = soak.check_output(tmp_path / "wrong", spec)
    assert not wrong["exactly_once"]
    assert (wrong["ids_missing"], wrong["ids_doubled"]) == (1, 1)
    assert wrong["examples"]["missing"] == [good[3]] and wrong["examples"]["doubled"] == [good[7]]


# --------------------------------------------------------------------------- what the soak found


@pytest.mark.usefixtures("ray_local")
def test_a_line_that_is_not_utf8_or_not_json_is_a_rejected_row_not_a_failed_read(tmp_path):
    from llkd_ray.corpus import read_corpus

    path = tmp_path / "corpus.jsonl"
    path.write_bytes(
        b'{"id": "a", "text": "fine"}\n'
        b'{"id": "b", "text": "caf\xe9 \xff"}\n'
        b"\n"
        b'{"id": "c", "text": "cut off\n'
        b"[1, 2]\n"
        b'{"id": "d", "text": 42}\n'
        b'{"id": "e", "text": "also fine"}\n'
    )
    rows = read_corpus(DataConfig(input=str(path), id_column="id")).classified.to_pandas()
    reasons = {i: None if pd.isna(r) else r for i, r in zip(rows["id"], rows["reason"], strict=True)}
    assert len(rows) == 6  # the blank line is no row
    assert reasons["a"] is None and reasons["e"] is None and reasons["d"] == "non_string_text"
    assert reasons["b"] == "invalid_utf8"  # its id survives, its text with replacement characters
    assert rows.loc[rows["id"] == "b", "text"].item() == "caf\ufffd \ufffd"
    assert sorted(r for i, r in reasons.items() if i not in "abde") == ["invalid_json", "invalid_json"]


def test_teacher_actors_are_restarted_without_a_job_long_budget_and_replaced_when_they_die_starting():
    import ray.data

    from llkd_ray.label.pool import tolerate_actor_deaths

    teacher = load_config(ROOT / "configs" / "demo.yaml").teacher
    assert teacher.max_restarts == -1  # a budget over the job's life fails a long job
    context = ray.data.DataContext.get_current()
    before = context.max_consecutive_actor_init_deaths
    assert before == 0, "Ray Data's default: the first actor killed while starting fails the job"
    with tolerate_actor_deaths(teacher.max_task_retries):
        assert ray.data.DataContext.get_current().max_consecutive_actor_init_deaths == 3
    assert context.max_consecutive_actor_init_deaths == before


def _block(ids: list[str], texts: list[str]) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({"id": ids, "text": texts, "probs": [[0.3, 0.7]] * n, "truncated": False, "reason": None})


def test_a_repeated_id_goes_to_rejected_as_duplicate_id_and_the_same_row_is_kept_whatever_the_order(tmp_path):
    kept = {}
    for order in ("ab", "ba"):
        store = OutputStore(tmp_path / order)
        blocks = {"a": _block(["1", "2"], ["first", "two"]), "b": _block(["1", "3"], ["second", "three"])}
        for name in order:
            commit_block(blocks[name], store=store, label_names=NAMES, has_gold=False)
        totals = scan_output(store, NAMES)
        counts = totals["counts"]
        assert counts["labeled"] == 3 and counts["rejected_by_reason"] == {"duplicate_id": 1}
        assert counts["duplicates_removed"] == 0 and counts["read"] == 4
        labeled = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / order).glob("part-*.parquet")))
        kept[order] = labeled.set_index("id").loc["1", "text"]
        assert scan_output(store, NAMES)["counts"] == counts  # a second scan changes nothing
    assert kept["ab"] == kept["ba"]
    # A row committed twice (the same id and text) is one row, not a repeated id.
    store = OutputStore(tmp_path / "twice")
    for _ in range(2):
        commit_block(_block(["1", "2"], ["same", "two"]).iloc[::-1], store=store, label_names=NAMES, has_gold=False)
        commit_block(_block(["1"], ["same"]), store=store, label_names=NAMES, has_gold=False)
    counts = scan_output(store, NAMES)["counts"]
    assert counts["labeled"] == 2 and counts["rejected"] == 0 and counts["duplicates_removed"] == 1


def test_a_resume_skips_committed_rows_not_every_row_of_a_committed_id(tmp_path):
    from llkd_ray.label.store import drop_committed_rows, row_keys

    committed = row_keys(pa.array(["1", "2"]), pa.array(["first", None]))
    batch = pa.table({"id": ["1", "1", "2", "3"], "text": ["first", "second", None, "three"]})
    kept = drop_committed_rows(batch, committed=committed)
    assert kept.to_pylist() == [{"id": "1", "text": "second"}, {"id": "3", "text": "three"}]


def test_llkd_label_puts_rays_logs_beside_the_labels_not_inside(tmp_path, monkeypatch):
    import llkd_ray.label.run
    import llkd_ray.runtime
    from llkd_ray.cli import logs_beside, main

    seen = {}
    monkeypatch.setattr(llkd_ray.runtime, "init_ray", lambda **kwargs: seen.update(kwargs))

    class Result:
        def summary(self) -> str:
            return "label: done"

    monkeypatch.setattr(llkd_ray.label.run, "label_corpus", lambda config, output, overwrite: Result())
    out = tmp_path / "runs" / "labels"
    assert main(["label", "--config", str(ROOT / "configs" / "demo.yaml"), "--output", str(out)]) == 0
    assert seen["log_dir"] == tmp_path / "runs" / "labels.logs" == logs_beside(out)
    assert out not in seen["log_dir"].parents
    assert logs_beside("runs/labels/") == Path("runs/labels.logs")
    main(["label", "--config", str(ROOT / "configs" / "demo.yaml"), "-o", str(out), "--logs", str(tmp_path / "L")])
    assert seen["log_dir"] == tmp_path / "L"


# --------------------------------------------------------------------------- the soak itself, small


@pytest.mark.heavy  # two label jobs of their own local Ray, two actor kills and a driver kill
def test_the_soak_at_2000_rows_labels_every_row_exactly_once_with_the_same_labels(tmp_path):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "label_soak.py"), "--rows", "2000", "--block-rows", "100",
        "--kill-every", "3", "--actor-kills", "2", "--drain-s", "5", "--output", str(tmp_path),
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    soak = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = soak.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        soak.terminate()  # the soak then stops the label job it runs (its own process session)
        output, _ = soak.communicate(timeout=120)
    assert soak.returncode == 0, output[-6000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    chaos = report["runs"]["chaos"]
    assert (chaos["actor_kills"], chaos["driver_kills"], len(chaos["attempts"])) == (2, 1, 2)
    for run in report["runs"].values():
        check = run["check"]
        assert check["exactly_once"] and check["ids_missing"] == check["ids_doubled"] == 0, check
        assert check["rejected_by_reason"] == {
            reason: n for kind, n in check["bad_rows_by_kind"].items() for reason in [_soak().EXPECTED_REASON[kind]]
        }
    assert report["labels"]["identical"] and report["labels"]["ids_compared"] == 2000 - 20
    # Ray's logs beside each labels directory, nothing but labels inside it.
    assert (tmp_path / "chaos" / "labels.logs" / "ray-data.log").is_file()
    assert {p.name for p in (tmp_path / "chaos" / "labels").iterdir()} <= {
        "_manifest.json", "_job.json", REJECTED_DIR,
    } | {p.name for p in (tmp_path / "chaos" / "labels").glob("part-*.parquet")}  # fmt: skip
