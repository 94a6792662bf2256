"""The pipeline config: good configs load, bad ones fail before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llkd_ray.config import PipelineConfig, load_config
from llkd_ray.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "llkd_ray" / "configs"


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _demo_raw() -> dict:
    return yaml.safe_load((CONFIGS / "demo.yaml").read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert len(config.task.label_names) >= 2


def test_demo_config_values() -> None:
    config = load_config(CONFIGS / "demo.yaml")
    assert config.task.label_names == ["negative", "positive"]
    assert config.data.input == "builtin:sst2/train"
    assert config.teacher.backend == "embedding"
    assert config.training.workers == 2


def test_overrides_are_typed() -> None:
    config = load_config(CONFIGS / "demo.yaml", ["training.workers=1", "selection.momentum=0.9", "data.limit=50"])
    assert config.training.workers == 1
    assert config.selection.momentum == pytest.approx(0.9)
    assert config.data.limit == 50


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda raw: raw["training"].update(batchsize=8),
            r"training\.batchsize: unknown key.*allowed in training: .*batch_size",
        ),
        (lambda raw: raw.update(trainer={}), r"trainer: unknown key"),
        (lambda raw: raw["selection"].update(strategy="best"), r"selection\.strategy: Input should be 'llkd'"),
        (lambda raw: raw["selection"].update(momentum=1.5), r"selection\.momentum"),
        (
            lambda raw: raw["training"].update(workers=3),
            r"batch_size \(32\) must be divisible by training\.workers \(3\)",
        ),
        (lambda raw: raw["task"]["labels"].pop(), r"task\.labels"),
        (lambda raw: raw["task"]["labels"][1].update(name="negative"), r"repeated: negative"),
        (
            lambda raw: raw["task"]["labels"][0].pop("description"),
            r"task\.labels\.0\.description: required key is missing",
        ),
        (lambda raw: raw.pop("data"), r"data: required key is missing"),
        (lambda raw: raw["teacher"].update(backend="vllm"), r"teacher\.vllm\.model is required"),
        (lambda raw: raw["teacher"].update(prompt_template="no text field"), r"\{text\}"),
        (lambda raw: raw["serving"].update(port=70000), r"serving\.port"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, mutate, expected: str) -> None:
    raw = _demo_raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=expected):
        load_config(_write(tmp_path, raw))


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"a\.b=value"):
        load_config(CONFIGS / "demo.yaml", ["training.workers"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolved_config_round_trips() -> None:
    config = load_config(CONFIGS / "demo.yaml")
    again = PipelineConfig.model_validate(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_section_hash_tracks_only_named_sections() -> None:
    base = load_config(CONFIGS / "demo.yaml")
    changed_training = load_config(CONFIGS / "demo.yaml", ["training.learning_rate=1e-4"])
    assert base.section_hash("task", "data", "teacher") == changed_training.section_hash("task", "data", "teacher")
    assert base.section_hash("training") != changed_training.section_hash("training")
