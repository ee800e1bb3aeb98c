"""TIES-Merging (Yadav et al. 2023), as mergekit's ``ties``: per tensor, trim each task vector
to its top-``density`` magnitudes, elect the sign of the weighted sum (mass, not count), and
average only the entries that agree with it; theta = theta_0 + lambda * merged. Relative to
``--base``, streamed one tensor at a time (the ingredients are read twice: election, then
the disjoint mean)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..io.source import TensorSource
from .common import SoupResult, ingredient_names
from .merge import (
    TensorReads,
    check_density,
    check_weights,
    require_base,
    resolve_weights,
    stream_merge,
)
from .registry import SoupContext, SoupMethod, register
from .task_vectors import combine


@dataclass
class TiesConfig:
    weights: list[float] | None = field(default=None, metadata={"metavar": "W"})
    """one weight per ingredient, in their order (default: 1 each)"""
    density: float = 1.0
    """the share of each task vector kept: TIES keeps its largest magnitudes, DARE keeps each
    entry with this probability (drop rate 1 - density); in (0, 1], mergekit's default 1 keeps
    all (the TIES paper uses 0.2)"""
    lambda_: float = field(default=1.0, metadata={"flag": "--lambda"})
    """the scale of the merged task vector"""
    normalize: bool = True
    """divide by the summed weights of the agreeing entries (the disjoint mean)"""


def top_magnitudes(tau: torch.Tensor, density: float, memo: dict, i: int) -> torch.Tensor:
    """``tau`` with all but its ``int(density * numel)`` (at least 1) largest magnitudes
    zeroed, in place; equal magnitudes at the cut are kept in storage order. The cut is
    remembered in ``memo[i]`` so that the second read of the same tau is not sorted again."""
    if density >= 1:
        return tau
    flat = tau.view(-1)
    size = flat.numel()
    k = max(1, int(density * size))
    magnitude = flat.abs()
    if i not in memo:
        cut = torch.kthvalue(magnitude, size - k + 1).values
        memo[i] = (cut, k - int((magnitude > cut).sum()))
    cut, ties = memo[i]
    keep = magnitude > cut
    if ties > 0:
        keep[torch.nonzero(magnitude == cut).view(-1)[:ties]] = True
    return flat.mul_(keep).view_as(tau)


def ties_soup(ingredients: Sequence[TensorSource], base: TensorSource, config: TiesConfig, *,
              dtype: torch.dtype | None = None, progress: bool = False) -> SoupResult:
    """TIES per tensor in fp64, rounded once."""
    w = resolve_weights(config.weights, len(ingredients))

    def merge_one(reads: TensorReads) -> torch.Tensor:
        memo: dict = {}
        return combine(reads, w, sparsify=lambda i, tau: top_magnitudes(tau, config.density,
                                                                         memo, i),
                       elect=True, normalize=config.normalize, scale=config.lambda_)

    state = stream_merge(ingredients, merge_one, base=base, dtype=dtype, progress=progress,
                         desc="ties")
    return SoupResult("ties", state, ingredient_names(ingredients),
                      info={"base": str(base.path), "weights": w, "density": config.density,
                            "lambda": config.lambda_, "normalize": config.normalize})


def _run(ingredients, context: SoupContext, config: TiesConfig) -> SoupResult:
    base = require_base(context, ingredients, "ties")
    return ties_soup(ingredients, base, config, dtype=context.dtype, progress=context.progress)


def _check(config: TiesConfig, n: int) -> None:
    check_density(config.density)
    check_weights(config.weights, n, False)


register(SoupMethod("ties", _run, "TIES merge",
                    "the base plus the sign-elected disjoint mean of the ingredients' trimmed "
                    "task vectors (top-density magnitudes)",
                    config_class=TiesConfig, check=_check, needs_base=True))
