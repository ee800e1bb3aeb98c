"""Linear merge: theta = sum_i w_i theta_i (divided by sum_i w_i with ``normalize``), streamed
one tensor at a time; the uniform soup is its special case (equal weights)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..io.source import TensorSource
from .common import SoupResult, ingredient_names
from .merge import WORK, TensorReads, check_weights, resolve_weights, stream_merge
from .registry import SoupContext, SoupMethod, register


@dataclass
class LinearConfig:
    weights: list[float] | None = field(default=None, metadata={"metavar": "W"})
    """one weight per ingredient, in their order (default: 1 each)"""
    normalize: bool = True
    """divide the weighted sum by the sum of the weights (mergekit's ``normalize``)"""


def linear_soup(ingredients: Sequence[TensorSource], config: LinearConfig, *,
                dtype: torch.dtype | None = None, progress: bool = False) -> SoupResult:
    """sum_i w_i theta_i [/ sum_i w_i], summed in fp64 in the ingredients' order and rounded
    once: with equal weights, bit for bit the uniform soup."""
    w = resolve_weights(config.weights, len(ingredients))
    total = sum(w) if config.normalize else 1.0

    def merge_one(reads: TensorReads) -> torch.Tensor:
        acc = reads.ingredient(0).mul_(w[0])
        for i in range(1, len(reads)):
            acc.add_(reads.ingredient(i).mul_(w[i]))
        return acc.div_(total) if config.normalize else acc

    state = stream_merge(ingredients, merge_one, dtype=dtype, progress=progress, desc="linear")
    coefficients = torch.tensor([[x / total] for x in w], dtype=WORK)
    return SoupResult("linear", state, ingredient_names(ingredients), coefficients, ["<model>"],
                      info={"weights": w, "normalize": config.normalize})


def _run(ingredients, context: SoupContext, config: LinearConfig) -> SoupResult:
    return linear_soup(ingredients, config, dtype=context.dtype, progress=context.progress)


def _check(config: LinearConfig, n: int) -> None:
    check_weights(config.weights, n, config.normalize)


register(SoupMethod("linear", _run, "Linear merge",
                    "the weighted average of the ingredients, sum_i w_i theta_i / sum_i w_i",
                    config_class=LinearConfig, check=_check))
