"""Model Stock (Jang et al. 2024), as mergekit's ``model_stock``: per tensor, with k >= 2
fine-tunes of the base, cos phi = the mean pairwise cosine of their task vectors and
t = k cos phi / (1 + (k - 1) cos phi); theta = t * mean_i theta_i + (1 - t) theta_0.

Streamed one tensor at a time without holding the k task vectors: a first read gives each
|tau_i|; the second sums theta_i and u_i = tau_i / |tau_i|, and the sum of the pairwise
cosines is (|sum_i u_i|^2 - sum_i |u_i|^2) / 2. Where a pair's norm product is below
mergekit's floor 1e-6 (cos = dot / max(|tau_i| |tau_j|, 1e-6)), that tensor's cosines are
taken pair by pair, two tensors at a time, so the result is mergekit's either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..io.source import TensorSource
from .common import SoupResult, ingredient_names
from .merge import WORK, TensorReads, require_base, stream_merge
from .registry import SoupContext, SoupMethod, register

NORM_FLOOR = 1e-6
"""The floor of a pair's norm product in the cosine (mergekit's clamp)."""


def _mean_cosine(reads: TensorReads, norms: list[float], u_sum: torch.Tensor,
                 u_square: float) -> float:
    k = len(norms)
    pairs = k * (k - 1) / 2
    if all(a * b >= NORM_FLOOR or a == 0 or b == 0 for i, a in enumerate(norms)
           for b in norms[i + 1:]):
        return float((u_sum.dot(u_sum) - u_square) / 2) / pairs
    total = 0.0
    for i in range(k):
        tau_i = reads.delta(i).view(-1)
        for j in range(i + 1, k):
            cos = float(tau_i.dot(reads.delta(j).view(-1))) / max(norms[i] * norms[j],
                                                                  NORM_FLOOR)
            total += min(1.0, max(-1.0, cos))
    return total / pairs


def model_stock_soup(ingredients: Sequence[TensorSource], base: TensorSource, *,
                     dtype: torch.dtype | None = None, progress: bool = False) -> SoupResult:
    """Model Stock per tensor in fp64, rounded once; the coefficients are per tensor: the
    base's 1 - t, each ingredient's t / k."""
    k = len(ingredients)
    ratios: dict[str, float] = {}

    def merge_one(reads: TensorReads) -> torch.Tensor:
        norms = [float(reads.delta(i).norm()) for i in range(k)]
        theta_sum = torch.zeros_like(reads.base)
        u_sum = torch.zeros(reads.base.numel(), dtype=WORK)
        u_square = 0.0
        for i in range(k):
            theta = reads.ingredient(i)
            theta_sum.add_(theta)
            if norms[i] > 0:
                u = theta.sub_(reads.base).view(-1).div_(norms[i])
                u_sum.add_(u)
                u_square += float(u.dot(u))
        cos = _mean_cosine(reads, norms, u_sum, u_square)
        t = k * cos / (1 + (k - 1) * cos)
        ratios[reads.name] = t
        return theta_sum.mul_(t / k).add_(reads.base, alpha=1 - t)

    state = stream_merge(ingredients, merge_one, base=base, dtype=dtype, progress=progress,
                         desc="model stock")
    names = list(ratios)
    t = torch.tensor([ratios[n] for n in names], dtype=WORK)
    coefficients = torch.cat([(1 - t)[None], (t / k)[None].expand(k, -1)])
    return SoupResult("model-stock", state, [str(base.path), *ingredient_names(ingredients)],
                      coefficients, names,
                      info={"base": str(base.path), "t_mean": float(t.mean()) if len(t) else None,
                            "coefficient_rows": "the base, then the ingredients"})


def _run(ingredients, context: SoupContext, config: None) -> SoupResult:
    base = require_base(context, ingredients, "model-stock")
    return model_stock_soup(ingredients, base, dtype=context.dtype, progress=context.progress)


register(SoupMethod("model-stock", _run, "Model Stock",
                    "per tensor, t * the ingredients' mean + (1 - t) * the base, t from the "
                    "angle between their task vectors", min_ingredients=2, needs_base=True))
