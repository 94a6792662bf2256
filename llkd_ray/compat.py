"""Every use of a Ray-internal module, in one place, tied to the Ray pin.

The labeling stage relies on a few classes Ray does not export publicly: its file datasources
(subclassed to add a stable row id), its row-hash helper (the same hash ``read_parquet``'s
``include_row_hash`` uses), and the vLLM engine stage UDF of ``ray.data.llm`` (subclassed to
record which engine answered a row). They move between Ray releases, so they are imported here
only; a Ray upgrade is checked by importing this module (``tests/test_label_stages.py``).
"""

from __future__ import annotations

from typing import Any

import ray

#: The Ray minor release these imports were checked against (``pyproject.toml`` pins ``>=2.60,<2.61``).
RAY_PIN = "2.60"


def check_ray_version() -> None:
    """Warn when the running Ray is not the pinned minor release: the internal paths below may have moved."""
    if ".".join(ray.__version__.split(".")[:2]) != RAY_PIN:
        import warnings

        warnings.warn(
            f"llkd-ray was checked against Ray {RAY_PIN}, this is Ray {ray.__version__}: the Ray-internal "
            "imports in llkd_ray/compat.py may need updating",
            stacklevel=2,
        )


from ray.data._internal.datasource.csv_datasource import CSVDatasource  # noqa: E402
from ray.data._internal.datasource.json_datasource import PandasJSONDatasource  # noqa: E402
from ray.data._internal.datasource.text_datasource import TextDatasource  # noqa: E402
from ray.data._internal.datasource_v2.common.synthesized_columns import (  # noqa: E402
    _compute_row_hashes as compute_row_hashes,
)


def vllm_engine_stage_udf() -> type[Any]:
    """``ray.data.llm``'s vLLM engine stage UDF class (imported lazily: it pulls in vLLM)."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF

    return vLLMEngineStageUDF


__all__ = [
    "RAY_PIN",
    "CSVDatasource",
    "PandasJSONDatasource",
    "TextDatasource",
    "check_ray_version",
    "compute_row_hashes",
    "vllm_engine_stage_udf",
]
