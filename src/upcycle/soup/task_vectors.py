"""Combining task vectors tau_i = theta_i - theta_0, one tensor at a time: what task
arithmetic, TIES and DARE share (mergekit's ``generalized_task_arithmetic``).

Per tensor: each tau_i is sparsified (TIES: its top-``density`` magnitudes; DARE: a seeded
random ``density`` share, rescaled) and weighted by w_i; then either summed (task arithmetic,
dare-linear) or combined with TIES' sign election and disjoint mean (ties, dare-ties):

    elected  = sign(sum_i w_i tau_i)   (mass, not count; 0 counts as +)
    merged   = sum_i w_i tau_i [sign(w_i tau_i) == elected]
    divisor  = sum_i w_i       [sign(w_i tau_i) == elected]   (0 -> 1)

``normalize`` divides by the divisor (without election: by sum_i w_i); theta = theta_0 +
lambda * merged. With election the ingredients are read twice (the election needs every
tau_i first), so memory stays a few tensors whatever N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .merge import TensorReads

Sparsify = Callable[[int, torch.Tensor], torch.Tensor]
"""``sparsify(i, tau_i) -> tau_i`` kept: deterministic for (tensor, i), since an elected
merge calls it twice on the same tau_i."""


def combine(reads: TensorReads, weights: Sequence[float], *, sparsify: Sparsify | None = None,
            elect: bool = False, normalize: bool = False, scale: float = 1.0) -> torch.Tensor:
    """theta_0 + scale * the (elected, normalised) weighted sum of the sparsified task vectors
    of one tensor (fp64)."""

    def kept(i: int) -> torch.Tensor:
        tau = reads.delta(i)
        return tau if sparsify is None else sparsify(i, tau)

    if elect:
        mass = torch.zeros_like(reads.base)
        for i, w in enumerate(weights):
            mass.add_(kept(i), alpha=w)
        elected = torch.where(mass >= 0, 1.0, -1.0).to(mass.dtype)
        del mass
        merged = torch.zeros_like(reads.base)
        divisor = torch.zeros_like(reads.base)
        for i, w in enumerate(weights):
            weighted = kept(i).mul_(w)
            agree = (weighted.sign() == elected).to(weighted.dtype)
            merged.addcmul_(weighted, agree)
            divisor.add_(agree, alpha=w)
        if normalize:
            merged.div_(divisor.masked_fill_(divisor == 0, 1.0))
    else:
        merged = torch.zeros_like(reads.base)
        for i, w in enumerate(weights):
            merged.add_(kept(i), alpha=w)
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            merged.div_(total)
    if scale != 1:
        merged.mul_(scale)
    return merged.add_(reads.base)


def task_vector_coefficients(weights: Sequence[float], *, normalize: bool,
                             scale: float) -> torch.Tensor:
    """Task arithmetic as a combination of (theta_0, theta_1..N): the column of coefficients
    (base first), which sums to 1."""
    total = sum(weights) if normalize and abs(sum(weights)) >= 1e-8 else 1.0
    c = [scale * w / total for w in weights]
    return torch.tensor([[1.0 - sum(c)], *[[x] for x in c]], dtype=torch.float64)
