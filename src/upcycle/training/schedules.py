"""The learning-rate schedule and AdamW parameter groups upcycle trains with.

Training itself runs on ``transformers.Trainer`` through :mod:`upcycle.training`; these
pieces are what it (and the learned soups, MEHL-Soup and LEMON's recipe) plug into an
optimizer. One warm-up/decay formula, :func:`warmup_decay_factor`, serves them all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UpcycleError

DECAYS = ("cosine", "linear")
"""How :func:`warmup_decay_factor` decays after the warm-up, to ``min_ratio`` x peak at the
last step."""


def warmup_decay_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "cosine",
                        min_ratio: float = 0.0) -> float:
    """THE learning-rate multiplier at ``step`` (the one formula for the Trainer, the learned
    soups, MEHL-Soup and LEMON): a linear warm-up from 1/(warmup_steps + 1) to the peak over
    ``warmup_steps``, then a ``decay`` ("cosine" or "linear") to ``min_ratio`` x peak at
    ``total_steps``, held there after it. ``total_steps`` counts at least 1 and the warm-up
    at most ``total_steps``."""
    total_steps = max(1, total_steps)
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    elif decay == "linear":
        shape = 1 - progress
    else:
        raise UpcycleError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    return min_ratio + (1 - min_ratio) * shape


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the peak over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` x peak at ``total_steps`` (:func:`warmup_decay_factor`)."""

    def factor(step: int) -> float:  # a closure, not a partial: LambdaLR saves no state for it
        return warmup_decay_factor(step, warmup_steps, total_steps, "cosine", min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


__all__ = ["DECAYS", "cosine_with_warmup", "param_groups", "warmup_decay_factor"]
