"""SNELL's competition mask: given the threshold tau of a part of delta_W's rows, the
``floor(sparsity * n)`` smallest-magnitude entries are zeroed and the survivors scaled by
their own detached magnitude (``reference``) or soft-thresholded (``paper``).
:func:`sparsify` is the dense form (its threshold from ``kthvalue``), :func:`_sparsify_rows`
the same arithmetic on a block of rows."""

from __future__ import annotations

import math

import torch

from ...errors import UpcycleError
from .config import SPARSIFY_MODES
from .kernel import _Scratch
from .parts import row_parts


def _num_zeroed(sparsity: float, numel: int) -> int:
    return min(numel - 1, math.floor(sparsity * numel + 1e-9)) if numel else 0


def _sparsify_rows(K: torch.Tensor, tau: torch.Tensor | None, mode: str,
                   keep_factor: bool = False, scratch: _Scratch | None = None,
                   in_place: bool = True):
    """``(delta, factor)`` for rows of K given their part's threshold (0-dim, or (rows, 1):
    one per row), with the same elementwise arithmetic as :func:`sparsify` (delta = K *
    factor; factor is the detached magnitude term, returned only with keep_factor). ``tau``
    None means sparsity 0 (delta = K, factor None). K's storage is reused for delta
    (``in_place``; otherwise delta is None: the caller only wants the factor). With
    ``scratch`` the factor lives in its buffers 'm' and 'f'."""
    if tau is None:
        return K, None
    if scratch is None:
        magnitude = K.abs()
        factor_out = None
    else:
        magnitude = torch.abs(K, out=scratch.get("m", *K.shape, K))
        factor_out = scratch.get("f", *K.shape, K)
    if mode == "reference":
        # magnitude * (magnitude > tau) as in sparsify (the same products: m * 1.0, m * 0.0);
        # a same-dtype multiply (and a float-valued comparison) is several times faster
        # than one with a bool tensor
        if factor_out is None:
            factor = magnitude.mul_((magnitude > tau).to(magnitude.dtype))
        else:
            factor = torch.gt(magnitude, tau, out=factor_out).mul_(magnitude)
    elif mode == "paper":
        factor = magnitude.sub_(tau.clamp_min(0)).clamp_min_(0)
    else:
        raise UpcycleError(f"SNELL sparsify_mode must be one of {SPARSIFY_MODES}, got {mode!r}")
    delta = K.mul_(factor) if in_place else None
    return delta, (factor if keep_factor else None)


def sparsify(delta: torch.Tensor, sparsity: float, mode: str = "reference",
             num_slices: int = 1, parts=None) -> torch.Tensor:
    """Competition-based sparsification of ``delta`` (d_out x d_in), per part of its rows.

    Zeroes the ``floor(sparsity * n)`` smallest-magnitude entries of each part (n entries
    each) and keeps the rest: ``reference``: ``delta * |delta|`` (magnitude detached);
    ``paper``: ``delta * max(|delta| - tau, 0)``. The parts: ``parts`` (row indices per part,
    or a :class:`RowParts`, see :func:`row_parts`), else ``num_slices`` equal stacked slices.
    Each part's threshold tau comes from ``kthvalue`` on that part alone (no
    ``torch.quantile`` size limit) and is detached, so pruned entries get no gradient and a
    survivor's gradient scales with its magnitude. ``sparsity == 0`` returns ``delta``.
    Non-finite entries are never masked out: a NaN stays NaN (NaN * 0 is NaN).
    """
    if sparsity == 0:
        return delta
    d_out, d_in = delta.shape
    split = row_parts(num_slices if parts is None else parts, d_out)
    magnitude = delta.detach().abs()
    if split.count == 1:
        k = _num_zeroed(sparsity, magnitude.numel())
        threshold = (magnitude.reshape(-1).kthvalue(k).values if k else
                     magnitude.new_full((), -1.0))
    else:
        threshold = magnitude.new_empty((d_out, 1))
        for idx, size in zip(split.indices(delta.device), split.sizes):
            k = _num_zeroed(sparsity, size * d_in)
            threshold[idx] = (magnitude.index_select(0, idx).reshape(-1).kthvalue(k).values
                              if k else -1.0)
    if mode == "reference":
        return delta * (magnitude * (magnitude > threshold))
    if mode == "paper":
        return delta * (magnitude - threshold.clamp_min(0)).clamp_min(0)
    raise UpcycleError(f"SNELL sparsify_mode must be one of {SPARSIFY_MODES}, got {mode!r}")


__all__ = ["sparsify"]
