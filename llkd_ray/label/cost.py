"""What labeling costs: the teacher's compute, counted during a run.

At a user's scale the teacher is the bill: an 8B teacher reading a 136-token prompt costs about
500 times what one training pass of a MiniLM student costs on the same row. So the teacher is
counted by the trainer's own rule (:mod:`llkd_ray.compute`: ``2·N`` FLOPs per real token of a
forward, N the non-embedding parameters), in the same unit as the student:

- **N without weights** — :func:`teacher_parameters` builds the teacher from its ``config.json``
  on the ``meta`` device (shapes only, no memory, no download) and counts it with
  :func:`~llkd_ray.compute.non_embedding_parameters`; for the embedding teacher, its encoder;
- **tokens as read** — each backend reports the real (unpadded, truncated) tokens its forward read
  per row (``TeacherOutput.tokens``), committed with the row (``teacher_tokens``), so the
  manifest's total is a sum over committed rows and a resumed run counts each row once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llkd_ray.compute import forward_flops
from llkd_ray.label.teachers.base import TeacherPlan
from llkd_ray.label.teachers.registry import backend_spec

logger = logging.getLogger(__name__)

#: How the teacher's FLOPs are counted (recorded with them).
TEACHER_RULE = "2·N FLOPs per real prompt token the teacher read (llkd_ray/compute.py), N without embeddings"


def _config_dir(model_path: str) -> Path:
    """The directory holding the transformer's ``config.json`` (a sentence-transformers model may
    keep its Transformer module in a sub-directory named by ``modules.json``)."""
    root = Path(model_path)
    if (root / "config.json").is_file() or not (root / "modules.json").is_file():
        return root
    try:
        modules = json.loads((root / "modules.json").read_text())
        first = next(m for m in modules if str(m.get("type", "")).endswith("Transformer"))
        return root / str(first.get("path", ""))
    except (OSError, ValueError, StopIteration):
        return root


def teacher_parameters(plan: TeacherPlan) -> int | None:
    """The teacher's non-embedding parameters, from its config on the ``meta`` device (no weights).

    None, with a warning, when the config cannot be built (an architecture transformers does not
    know without remote code): the FLOPs are then "not recorded", never guessed.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from llkd_ray.compute import non_embedding_parameters

    builder = AutoModelForCausalLM if backend_spec(plan.backend).llm else AutoModel
    try:
        config = AutoConfig.from_pretrained(_config_dir(plan.model_path))
        with torch.device("meta"):
            model = builder.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        logger.warning("cannot count the parameters of teacher %s: %s", plan.model_path, error)
        return None
    return non_embedding_parameters(model)


def teacher_compute(parameters: int | None, tokens: dict[str, int]) -> dict[str, Any]:
    """The manifest's ``teacher_compute``: N, the real tokens read, FLOPs by the trainer's rule.

    ``tokens`` is :func:`~llkd_ray.label.scan.teacher_token_totals`; rows committed by a version that
    did not count tokens are listed in ``rows_not_counted`` and make ``tokens`` (and the FLOPs) a
    lower bound, which ``complete`` says.
    """
    counted = tokens.get("tokens", 0)
    return {
        "parameters": parameters,
        "tokens": counted,
        "flops": forward_flops(parameters, counted) if parameters is not None else None,
        "rows": tokens.get("rows", 0),
        "rows_not_counted": tokens.get("rows_not_counted", 0),
        "complete": parameters is not None and not tokens.get("rows_not_counted", 0),
        "rule": TEACHER_RULE,
    }
