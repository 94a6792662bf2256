"""Corpus input on Ray Data: every format, every kind of bad row, stable ids, built-in data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llkd_ray.config import DataConfig
from llkd_ray.corpus import REJECT_REASONS, classify_rows, inspect_corpus, read_corpus, read_gold
from llkd_ray.errors import DataError

pytestmark = pytest.mark.usefixtures("ray_local")

TEXTS = ["a fine film", "a dull mess", "quietly moving", "loud and empty"]


def _rows(corpus) -> pd.DataFrame:
    return corpus.rows.to_pandas().sort_values("text").reset_index(drop=True)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "text"])
def test_each_format_reads_every_row(tmp_path: Path, fmt: str) -> None:
    frame = pd.DataFrame({"text": TEXTS, "label": ["positive", "negative", "positive", "negative"]})
    path = tmp_path / f"corpus.{'txt' if fmt == 'text' else fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, frame.to_dict("records"))
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pandas(frame), path)
    else:
        path.write_text("\n".join(TEXTS) + "\n")
    label_column = None if fmt == "text" else "label"
    rows = _rows(read_corpus(DataConfig(input=str(path), label_column=label_column)))
    assert sorted(rows["text"]) == sorted(TEXTS)
    assert rows["id"].is_unique
    if label_column:
        assert set(rows["gold_label"]) == {"positive", "negative"}


def test_directory_and_glob(tmp_path: Path) -> None:
    for part in range(3):
        _write_jsonl(tmp_path / f"part-{part}.jsonl", [{"text": f"doc {part} {i}"} for i in range(5)])
    by_dir = _rows(read_corpus(DataConfig(input=str(tmp_path))))
    by_glob = _rows(read_corpus(DataConfig(input=str(tmp_path / "part-*.jsonl"))))
    assert len(by_dir) == 15
    assert by_dir.equals(by_glob)
    assert by_dir["id"].is_unique


def test_bad_rows_go_to_rejected_with_reasons(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"text": "a fine film"},
            {"text": ""},
            {"text": 42},
            {"other": "no text field"},
            {"text": "   \t "},
            {"text": "x" * 101},
            {"text": ["a", "list"]},
            {"text": None},
        ],
    )
    corpus = read_corpus(DataConfig(input=str(path), max_chars=100))
    assert list(corpus.rows.to_pandas()["text"]) == ["a fine film"]
    rejected = corpus.rejected.to_pandas()
    assert sorted(rejected["reason"]) == sorted(
        [
            "empty_text",
            "non_string_text",
            "missing_text",
            "whitespace_text",
            "text_too_long",
            "non_string_text",
            "missing_text",
        ]
    )
    assert set(rejected.columns) == {"id", "text", "reason"}
    assert rejected["id"].is_unique


def test_text_file_keeps_blank_lines_as_rejected(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("first document\n\n   \nsecond document\n")
    corpus = read_corpus(DataConfig(input=str(path)))
    assert sorted(corpus.rows.to_pandas()["text"]) == ["first document", "second document"]
    assert sorted(corpus.rejected.to_pandas()["reason"]) == ["empty_text", "whitespace_text"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.text(max_size=30),
            st.integers(),
            st.floats(allow_nan=True),
            st.none(),
            st.booleans(),
            st.sampled_from(["", " ", "\n\t", "\u2003"]),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_every_generated_row_is_kept_or_rejected_with_the_right_reason(values: list) -> None:
    """The pure row classifier, on hypothesis-generated values: nothing is lost, reasons are right."""
    batch = pd.DataFrame({"text": pd.Series(values, dtype=object), "_row_id": range(len(values))})
    out = classify_rows(batch, text_column="text", id_column=None, label_column=None, max_chars=20)
    assert len(out) == len(values)
    for value, reason, text in zip(values, out["reason"], out["text"], strict=True):
        if value is None or (isinstance(value, float) and value != value):
            assert reason == "missing_text"
        elif not isinstance(value, str):
            assert reason == "non_string_text"
        elif value == "":
            assert reason == "empty_text"
        elif not value.strip():
            assert reason == "whitespace_text"
        elif len(value) > 20:
            assert reason == "text_too_long"
        else:
            assert pd.isna(reason) and text == value
        assert pd.isna(reason) or reason in REJECT_REASONS


def test_ids_are_stable_across_reads_and_use_the_id_column(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "c.jsonl", [{"doc": f"d{i}", "text": f"text {i}"} for i in range(50)])
    first = read_corpus(DataConfig(input=str(path))).rows.to_pandas()
    second = read_corpus(DataConfig(input=str(path))).rows.to_pandas()
    assert dict(zip(first["text"], first["id"], strict=True)) == dict(zip(second["text"], second["id"], strict=True))
    assert first["id"].is_unique
    with_ids = read_corpus(DataConfig(input=str(path), id_column="doc")).rows.to_pandas()
    assert sorted(with_ids["id"]) == sorted(f"d{i}" for i in range(50))


def test_duplicate_texts_get_distinct_ids(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "dup.jsonl", [{"text": "same"}] * 5)
    rows = read_corpus(DataConfig(input=str(path))).rows.to_pandas()
    assert len(rows) == 5 and rows["id"].is_unique


def test_missing_text_column_fails_fast_listing_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "c.jsonl", [{"body": "x", "title": "y"}])
    with pytest.raises(DataError, match=r"text column 'text' not found.*columns found: body, title"):
        read_corpus(DataConfig(input=str(path)))


def test_missing_input_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="input not found"):
        read_corpus(DataConfig(input=str(tmp_path / "absent.jsonl")))
    odd = tmp_path / "corpus.xml"
    odd.write_text("<a/>")
    with pytest.raises(DataError, match="cannot tell the corpus format"):
        read_corpus(DataConfig(input=str(odd)))
    with pytest.raises(DataError, match="unknown built-in data set"):
        read_corpus(DataConfig(input="builtin:imdb/train"))


def test_empty_corpus_reads_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    corpus = read_corpus(DataConfig(input=str(path)))
    assert corpus.rows.count() == 0


def test_builtin_data_loads() -> None:
    stats = inspect_corpus(DataConfig(input="builtin:sst2/test", label_column="label"))
    assert (stats.valid, stats.rejected) == (872, 0)
    assert set(stats.label_distribution) == {"negative", "positive"}
    trec = inspect_corpus(DataConfig(input="builtin:trec/test", label_column="label"))
    assert trec.valid == 500 and len(trec.label_distribution) == 6
    assert read_corpus(DataConfig(input="builtin:sst2/train")).rows.count() == 10_000


def test_limit_reads_only_the_first_rows() -> None:
    corpus = read_corpus(DataConfig(input="builtin:trec/train", limit=25))
    assert corpus.rows.count() == 25


def test_gold_set_checks_labels(tmp_path: Path) -> None:
    gold = read_gold("builtin:trec/test", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])
    assert len(gold) == 500 and set(gold.columns) == {"id", "text", "label"}
    path = _write_jsonl(
        tmp_path / "gold.jsonl", [{"text": "ok", "label": "positive"}, {"text": "meh", "label": "neutral"}]
    )
    with pytest.raises(DataError, match=r"unknown label 'neutral' in row 1"):
        read_gold(str(path), ["negative", "positive"])
