"""Every use of a Ray-internal module, in one place, tied to the Ray pin.

The labeling stage relies on a few classes Ray does not export publicly: its file datasources
(subclassed to add a stable row id), its row-hash helper (the same hash ``read_parquet``'s
``include_row_hash`` uses), and the vLLM engine stage UDF of ``ray.data.llm`` (subclassed to
record which engine answered a row); training and ``read_labels`` set one knob of its Parquet
reader (:func:`read_parquet`). They move between Ray releases, so they are used here only; a Ray
upgrade is checked by importing this module (``tests/test_label_stages.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
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


# --------------------------------------------------------------------------- Parquet footer readers

#: Ray Data 2.60's Parquet reader (datasource V2) lists its files on a pool of ``FooterReader``
#: actors that every execution of a ``read_parquet`` dataset starts afresh and kills once listed:
#: 32 of them unless this variable says otherwise, each a Python worker process. On a labels
#: directory of a few dozen parts nearly all of them start only to be killed: they were the
#: short-lived workers behind the raylet's "N PYTHON worker processes have been started ... the
#: maximum expected startup concurrency" warnings in the demo (and seconds of CPU on a small
#: machine) while Ray Train read its labels.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
#: An actor takes batches of 10 files (``RAY_DATA_PARQUET_FOOTER_BATCH_SIZE``), one batch at a time,
#: the batch's footers read on its IO threads: 100 files are 10 round trips, well under a second even
#: on object storage, so one actor per 100 files.
_FILES_PER_FOOTER_ACTOR = 100
_FOOTER_ACTORS_DEFAULT = 32


def footer_actors(files: int) -> int:
    """Footer-reading actors for a listing of ``files`` Parquet files: one per 100, at most Ray's 32."""
    return min(_FOOTER_ACTORS_DEFAULT, max(1, math.ceil(files / _FILES_PER_FOOTER_ACTOR)))


@contextlib.contextmanager
def _footer_actor_pool(files: int) -> Iterator[None]:
    # Ray reads the variable when read_parquet builds the dataset's file indexer (in this process).
    if FOOTER_ACTORS_ENV in os.environ:  # the user's own choice
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(files))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)


def read_parquet(files: list[str], **kwargs: Any) -> ray.data.Dataset:
    """``ray.data.read_parquet`` of a list of Parquet files (not directories) with :func:`footer_actors`
    footer readers instead of 32 (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` set by the user wins)."""
    import ray.data

    with _footer_actor_pool(len(files)):
        return ray.data.read_parquet(files, **kwargs)


__all__ = [
    "FOOTER_ACTORS_ENV",
    "RAY_PIN",
    "CSVDatasource",
    "PandasJSONDatasource",
    "TextDatasource",
    "check_ray_version",
    "compute_row_hashes",
    "footer_actors",
    "read_parquet",
    "vllm_engine_stage_udf",
]
