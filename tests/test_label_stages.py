"""The label stage's declared pipeline, its backend registry and the Ray-internal imports (no Ray run)."""

from __future__ import annotations

import typing

import pytest

from llkd_ray.config import TeacherConfig, load_config
from llkd_ray.errors import ConfigError
from llkd_ray.label.stages import CLASSIFIED_COLUMNS, LABEL_STAGES, Stage, check_stages
from llkd_ray.label.store import SUMMARY_COLUMNS
from llkd_ray.label.teachers.check import check_teacher
from llkd_ray.label.teachers.registry import BACKENDS, backend_spec, build_local_teacher

DEMO = "configs/demo.yaml"


def test_the_declared_stages_fit_together_in_order():
    assert [s.name for s in LABEL_STAGES] == [
        "keep_ids",
        "drop_committed",
        "commit_rejected",
        "repartition",
        "score_and_commit",
    ]
    # Only counts come back to the driver: the last stage replaces the rows by per-part summaries.
    assert check_stages(LABEL_STAGES, CLASSIFIED_COLUMNS) == SUMMARY_COLUMNS


def test_a_stage_missing_its_input_columns_is_refused_before_anything_runs():
    needs_reason = Stage("needs_reason", needs=("reason",), adds=(), apply=lambda dataset, run: dataset)
    with pytest.raises(ValueError, match="'needs_reason' needs reason"):
        check_stages([*LABEL_STAGES[:3], needs_reason], CLASSIFIED_COLUMNS)  # commit_rejected dropped it


def test_every_configurable_backend_is_registered_once():
    allowed = set(typing.get_args(TeacherConfig.model_fields["backend"].annotation))
    assert allowed == set(BACKENDS)
    for name, spec in BACKENDS.items():
        assert spec.name == name and (spec.local is None) != (spec.stage is None)
    assert not backend_spec("embedding").llm and backend_spec("hf").sequence_scoring
    with pytest.raises(ConfigError, match="unknown teacher backend"):
        backend_spec("nope")


def test_vllm_runs_as_its_own_stage_not_in_a_teacher_actor(tiny_llm_dir):
    config = load_config(DEMO, ["teacher.backend=vllm", f"teacher.vllm.model={tiny_llm_dir}"])
    plan = check_teacher(config.task, config.teacher)
    with pytest.raises(ValueError, match="its own Ray Data stage"):
        build_local_teacher(plan)
    with pytest.raises(ConfigError, match="vllm backend does not do"):
        sequence = load_config(
            DEMO, ["teacher.backend=vllm", f"teacher.vllm.model={tiny_llm_dir}", "teacher.scoring=sequence"]
        )
        check_teacher(sequence.task, sequence.teacher)


def test_ray_internal_imports_resolve_on_the_pinned_ray():
    import ray

    from llkd_ray import compat

    assert ".".join(ray.__version__.split(".")[:2]) == compat.RAY_PIN
    compat.check_ray_version()  # no warning on the pin
    for name in ("CSVDatasource", "PandasJSONDatasource", "TextDatasource", "compute_row_hashes"):
        assert getattr(compat, name) is not None
