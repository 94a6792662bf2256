"""The run report: HTML + PNG plots rendered from a small run directory in the stages' formats."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llkd_ray.report.page import build_report
from llkd_ray.report.plots import PLOTS

LABELS = ["negative", "positive"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_labels(directory: Path, rows: int = 120, seed: int = 0) -> pd.DataFrame:
    """A labeling output: Parquet parts with the label stage's columns, a rejected/ part, a manifest."""
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        p = rng.random()
        probs = [p, 1 - p]
        index = 0 if p >= 0.5 else 1
        gold = LABELS[index] if rng.random() < 0.5 + abs(p - 0.5) else LABELS[1 - index]
        records.append(
            {
                "id": f"{i:016x}",
                "text": f"text {i}",
                "pseudo_label": LABELS[index],
                "label_index": index,
                "confidence": max(probs),
                "probs": probs,
                "truncated": False,
                "gold_label": gold,
            }
        )
    frame = pd.DataFrame(records)
    directory.mkdir(parents=True)
    half = rows // 2
    pq.write_table(pa.Table.from_pandas(frame.iloc[:half], preserve_index=False), directory / "part-a.parquet")
    pq.write_table(pa.Table.from_pandas(frame.iloc[half:], preserve_index=False), directory / "part-b.parquet")
    (directory / "rejected").mkdir()
    pq.write_table(
        pa.table({"id": ["x"], "text": [""], "reason": ["empty_text"]}), directory / "rejected" / "part-r.parquet"
    )
    (directory / "_manifest.json").write_text(json.dumps({"counts": {"labeled": rows}}))
    return frame


def write_training(directory: Path, ids: list[str], steps: int = 40) -> None:
    directory.mkdir(parents=True)
    (directory / "student").mkdir()
    (directory / "student" / "config.json").write_text("{}")
    lines = []
    ever: set[str] = set()
    for step in range(1, steps + 1):
        chosen = ids[(step * 3) % len(ids) : (step * 3) % len(ids) + 4]
        ever.update(chosen)
        lines.append(
            {
                "step": step,
                "epoch": step / steps,
                "loss": 0.7 * math.exp(-step / 15),
                "selected_fraction": 4 / 32,
                "teacher_thresholds": {"negative": 0.8 - 0.001 * step, "positive": 0.75},
                "student_thresholds": {"negative": 0.6, "positive": 0.55 + 0.002 * step},
                "data_usage": {"pool_fraction": len(ever) / len(ids), "sample_step_fraction": 4 / 32},
                "compute": {
                    "scoring_flops": 2e9 * step,
                    "training_flops": 1.5e9 * step,
                    "scoring_s": 0.2 * step,
                    "training_s": 0.3 * step,
                    "selection_s": 0.01 * step,
                },
            }
        )
        if step % 20 == 0:
            lines.append(
                {
                    "kind": "eval",
                    "step": step,
                    "epoch": step / steps,
                    "accuracy": 0.7 + step / 400,
                    "macro_f1": 0.69 + step / 400,
                }
            )
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    pq.write_table(
        pa.table({"id": sorted(ever), "times_selected": [1] * len(ever)}), directory / "selected_ids.parquet"
    )
    (directory / "training_summary.json").write_text(
        json.dumps(
            {
                "strategy": "llkd",
                "steps": steps,
                "data_usage": {"pool_fraction": len(ever) / len(ids), "sample_step_fraction": 0.125},
            }
        )
    )


def write_eval(path: Path) -> None:
    from llkd_ray.metrics import classification_metrics

    def metrics(confusion):
        """The real metrics of predictions with this confusion matrix (rows gold, columns predicted)."""
        pairs = [(LABELS[g], LABELS[p]) for g in range(2) for p in range(2) for _ in range(confusion[g][p])]
        return classification_metrics([g for g, _ in pairs], [p for _, p in pairs], LABELS)

    path.write_text(
        json.dumps(
            {
                "gold": "builtin:sst2/test",
                "gold_rows": 100,
                "labels": LABELS,
                "teacher": {"backend": "embedding", **metrics([[40, 10], [19, 31]])},
                "student": {"model": "student", **metrics([[42, 8], [14, 36]])},
                "data_usage": {"pool_fraction": 0.4, "sample_step_fraction": 0.125},
            }
        )
    )


def write_markers(run: Path, stages=("label", "train", "evaluate")) -> None:
    (run / "_stages").mkdir(parents=True, exist_ok=True)
    for stage in stages:
        (run / "_stages" / f"{stage}.json").write_text(
            json.dumps({"stage": stage, "hash": "abc", "status": "done", "wall_s": 12.5})
        )


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    frame = write_labels(run / "labels")
    write_training(run / "train", list(frame["id"]))
    write_eval(run / "eval.json")
    write_markers(run)
    return run


def images_of(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_full_report_has_every_plot_and_the_numbers(run_dir):
    index = build_report(run_dir)
    assert index == run_dir / "report" / "index.html"
    page = index.read_text()
    images = images_of(page)
    assert images == [name for name, *_ in PLOTS], "every plot is drawn, in order"
    for name in images:
        data = (run_dir / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, f"{name} is a real PNG"
    for text in ("0.710", "0.780", "teacher", "student", "40.0%", "12.5%", "llkd", "Not drawn"):
        if text == "Not drawn":
            assert text not in page
        else:
            assert text in page, text
    assert "<script" not in page and "http" not in page.split("</style>")[1], "static, no external resources"


def test_confidence_split_uses_selected_ids_and_hidden_gold(run_dir):
    from llkd_ray.report.run_data import load_run

    run = load_run(run_dir)
    assert run.labels is not None and len(run.labels) == 120, "rejected/ rows are not labeled rows"
    assert run.selected_ids and run.selected_ids <= set(run.labels["id"])
    assert run.label_names == LABELS
    assert len(run.steps) == 40 and len(run.gold_evals) == 2


def test_steps_recorded_again_after_a_restore_count_once(run_dir):
    from llkd_ray.report.run_data import load_run

    metrics = run_dir / "train" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    replayed = [dict(r, loss=9.0) for r in records if r.get("kind") is None and r["step"] > 30]
    metrics.write_text("\n".join(json.dumps(r) for r in records + replayed) + "\n")
    run = load_run(run_dir)
    assert [r["step"] for r in run.steps] == list(range(1, 41))
    assert run.steps[-1]["loss"] == 9.0, "the latest attempt's record wins"


def test_partial_run_still_renders_what_it_has(tmp_path):
    run = tmp_path / "run"
    write_labels(run / "labels")
    write_markers(run, stages=("label",))
    page = build_report(run).read_text()
    assert set(images_of(page)) == {"confidence.png", "labels.png"}
    assert "Not drawn" in page
    assert not (run / "report" / "training.png").exists()


def test_rerendering_replaces_stale_plots(run_dir):
    build_report(run_dir)
    (run_dir / "train" / "metrics.jsonl").unlink()
    (run_dir / "eval.json").unlink()
    page = build_report(run_dir).read_text()
    assert "thresholds.png" not in images_of(page)
    assert not (run_dir / "report" / "thresholds.png").exists(), "a plot without its data is not left behind"


def test_missing_run_dir_is_a_user_error(tmp_path):
    from llkd_ray.errors import LlkdError

    with pytest.raises(LlkdError, match="not found"):
        build_report(tmp_path / "nope")


def test_cli_report(run_dir, capsys):
    from llkd_ray.cli import main

    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report" / "index.html")
    assert main(["report", str(run_dir / "missing")]) == 2
