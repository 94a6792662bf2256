"""The ``llkd`` command as a user runs it: exit codes and one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def llkd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llkd_ray.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_config_validate_and_show() -> None:
    ok = llkd("config", "validate", "configs/demo.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    shown = llkd("config", "show", "configs/demo.yaml", "--set", "training.workers=1")
    assert shown.returncode == 0
    assert "workers: 1" in shown.stdout and "momentum: 0.9" in shown.stdout


def test_config_validate_names_a_misspelt_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "demo.yaml").read_text().replace("momentum:", "momentun:"))
    result = llkd("config", "validate", str(bad))
    assert result.returncode != 0
    assert "selection.momentun: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.heavy  # `llkd data inspect` in a subprocess that starts its own Ray: ~16 s
def test_data_inspect_builtin() -> None:
    result = llkd("data", "inspect", "builtin:sst2/test", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["valid"] == 872 and stats["rejected"] == 0
    assert sorted(stats["label_distribution"]) == ["negative", "positive"]


@pytest.mark.heavy  # a second Ray started in a subprocess (test_corpus checks the reasons in process)
def test_data_inspect_reports_rejected_rows(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ""}\n{"text": 42}\n{"label": "x"}\n')
    result = llkd("data", "inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "4 rows, 1 valid, 3 rejected" in result.stdout
    for reason in ("empty_text", "non_string_text", "missing_text"):
        assert f"rejected {reason}: 1" in result.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"body": "x", "title": "y"}\n', "columns found: body, title"),
        (None, "input not found"),
    ],
)
def test_data_inspect_user_errors(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "corpus.jsonl"
    if content is not None:
        path.write_text(content)
    result = llkd("data", "inspect", str(path))
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
