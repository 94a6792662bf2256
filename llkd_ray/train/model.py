"""The student and its optimizer: any ``AutoModelForSequenceClassification`` with the task's labels, and
AdamW as the recipe builds them (split out of :mod:`llkd_ray.train.recipe`; plain torch and
transformers, no Ray)."""

from __future__ import annotations

from typing import Any

import torch


def build_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights; the fused kernel where torch has one.

    Fused matters for selection: an LLKD step back-propagates a few rows, and the optimizer step
    over every parameter (the embedding table included) is then most of its cost. Measured on
    2 CPU cores with the MiniLM student (22.7M parameters): 0.158 s per step with the default
    (foreach) implementation, 0.027 s fused, against 0.07 s for forward + backward of 5 rows.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=learning_rate)


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
