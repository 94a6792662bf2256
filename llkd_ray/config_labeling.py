"""The ``labeling`` section: how much of the pool the teacher labels, and in how many student-guided rounds.

Off by default (``budget: 1.0``, ``rounds: 1``: the teacher labels the whole pool, as before) until
the quality benchmark measures the rounds (docs/labeling.md, Student-guided labeling rounds).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from llkd_ray.config_base import Concurrency, PositiveFloat, PositiveInt, Section, check_concurrency


class LabelingConfig(Section):
    budget: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Fraction of the pool (its usable rows) the teacher may label, in (0, 1]."""
    rounds: PositiveInt = 1
    """Labeling rounds: round 0 labels a seeded random slice, each later one the rows the student
    is most uncertain about; every round labels ``budget / rounds`` of the pool."""
    explore: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Share of each later round's slice drawn uniformly at random from the unlabeled rows (seeded),
    the rest chosen by uncertainty: the rows the student is least sure of are often the ones the
    teacher is least sure of too, and LLKD's teacher gate discards those (docs/labeling.md)."""
    scoring_concurrency: Concurrency = (1, 2)
    """The student's scoring actors over the unlabeled pool: a fixed size or an autoscaled (min, max)."""
    scoring_num_cpus: PositiveFloat = 0.5
    """CPUs each scoring actor reserves (one torch thread each on CPU); 2 x 0.5 leaves a 2-CPU node
    one CPU for the tasks reading the corpus."""
    scoring_num_gpus: Annotated[float, Field(ge=0)] = 0.0
    scoring_batch_size: PositiveInt = 256
    """Rows per call of a scoring actor (the predictor batches them by length within)."""

    @field_validator("scoring_concurrency")
    @classmethod
    def _concurrency_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        return check_concurrency(value)

    @property
    def enabled(self) -> bool:
        """Rounds run when the teacher labels less than the pool or in more than one round."""
        return self.budget < 1.0 or self.rounds > 1
