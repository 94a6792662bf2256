"""The building blocks of the config's sections: their base class and the constrained types they share.

Apart from :mod:`llkd_ray.config` so that a section can live in a module of its own
(:mod:`llkd_ray.config_labeling`) without importing the schema that includes it back.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]

Concurrency = PositiveInt | tuple[PositiveInt, PositiveInt]
"""A fixed actor pool size, or ``(min, max)``: an autoscaled pool that grows with the backlog."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_concurrency(value: int | tuple[int, int]) -> int | tuple[int, int]:
    if isinstance(value, tuple) and value[0] > value[1]:
        raise ValueError(f"concurrency (min, max) needs min <= max, got {list(value)}")
    return value
