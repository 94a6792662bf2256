"""The student and its optimizer: any ``AutoModelForSequenceClassification`` with the task's labels, and
AdamW as the recipe builds them (split out of :mod:`llkd_ray.train.recipe`; plain torch and
transformers, no Ray)."""

from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights; the fused kernel where torch has one.

    Fused matters for selection: an LLKD step back-propagates a few rows, and the optimizer step
    over every parameter (the embedding table included) is then most of its cost, and the fused
    kernel cuts it several-fold (docs/training.md, "Throughput").
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
