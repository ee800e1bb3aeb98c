"""The exact threshold of SNELL's mask, per part of delta_W's rows, found block by block:
in one pass when it lies in a window around the value the last steps predict
(:class:`ThresholdHint`), else by the exact radix select of :mod:`upcycle.ops.kselect`;
bit for bit what ``kthvalue`` gives on the whole |K|."""

from __future__ import annotations

import itertools
import math
import weakref

import torch

from ...ops.kselect import kthvalue_blocked, kthvalue_in_window
from .compiled import _fused_rows
from .kernel import _kernel_rows, _padded_factors, _Scratch
from .mask import _num_zeroed
from .parts import row_parts


def _magnitude_rows(pads, coeffs: torch.Tensor, o0: int, o1: int,
                    scratch: _Scratch | None = None) -> torch.Tensor:
    """|K| of rows o0:o1 (compiled: in the kernel's own loop)."""
    if getattr(pads, "compiled", False):
        return _fused_rows(pads, coeffs, o0, o1, "magnitude")
    return _kernel_rows(pads, coeffs, o0, o1, scratch=scratch).abs_()


class ThresholdHint:
    """A layer's recent thresholds, to guess the next ones: consecutive training steps move
    each part's tau smoothly, so :func:`snell_thresholds` first looks for the k-th value in a
    narrow window around the extrapolated tau, which needs one pass over |K| that counts the
    entries below the window and keeps the few inside it, instead of a radix select. The
    result is exact either way: when the k-th value is not inside the window (or the window
    holds too many entries) the radix select runs as without a hint. Not saved and not
    part of the state; plain floats, so it follows the layer to any device.

    Under ``torch.compile`` the hint is never read by the traced code (its floats change
    every step and would be guards, a recompile per step): the compiled graph passes its
    ``handle``, an int fixed for the hint's life, to SNELL's custom operator, whose eager
    body finds the hint again with :meth:`find`. A copy (``copy.deepcopy`` of a layer, a
    pickle) gets a handle of its own."""

    MIN_WINDOW, MAX_WINDOW = 2e-3, 0.05
    """Bounds of the window's relative half-width around the guess; no guess is tried while
    the recent errors call for a wider window (early steps, a large learning rate)."""

    _handles = itertools.count()
    _live: weakref.WeakValueDictionary[int, ThresholdHint] = weakref.WeakValueDictionary()

    def __init__(self):
        self._register()
        self.last: list[float] | None = None
        self.before: list[float] | None = None
        self.width = 0.01
        self.errors: list[float] = []
        self.hits = self.misses = 0

    def _register(self) -> None:
        self.handle = next(ThresholdHint._handles)
        ThresholdHint._live[self.handle] = self

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "handle"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()

    @classmethod
    def find(cls, handle: int) -> ThresholdHint | None:
        """The live hint of ``handle`` (None for a negative handle or a hint gone)."""
        return cls._live.get(handle) if handle >= 0 else None

    def guesses(self, parts: int) -> list[float | None]:
        if self.last is None or len(self.last) != parts:
            return [None] * parts
        out = []
        for s, tau in enumerate(self.last):
            prev = None if self.before is None else self.before[s]
            if not (tau > 0 and math.isfinite(tau)):
                out.append(None)
            elif prev is not None and prev > 0:  # linear extrapolation, bounded
                out.append(min(2 * tau, max(tau / 2, 2 * tau - prev)))
            else:
                out.append(tau)
        return out

    @property
    def usable(self) -> bool:
        return self.width <= self.MAX_WINDOW

    def update(self, taus: list[float], guesses: list[float | None], tried: bool,
               missed: bool) -> None:
        """Record this pass's exact thresholds; the window becomes 2.5x the largest relative
        error of the last three guesses (the next one's is about the same)."""
        errors = [abs(t / g - 1) for t, g in zip(taus, guesses) if g and t > 0]
        if errors:
            if tried:
                self.misses += missed
                self.hits += not missed
            self.errors = [*self.errors[-2:], max(errors)]
            self.width = max(self.MIN_WINDOW, 2.5 * max(self.errors))
        self.before, self.last = self.last, list(taus)


@torch.no_grad()
def snell_thresholds(A: torch.Tensor, B: torch.Tensor, coeffs: torch.Tensor, sparsity: float,
                     parts=1, block_rows: int | None = None, *,
                     scratch: _Scratch | None = None, compiled: bool = False,
                     hint: ThresholdHint | None = None) -> torch.Tensor:
    """Per part of delta_W's rows (``parts``: see :func:`row_parts`; an int gives equal
    stacked slices), the threshold tau of the competition mask: the
    ``floor(sparsity * n)``-th smallest ``|K|`` of the part's n entries (-1 when none is
    zeroed), exactly what :func:`sparsify` takes from ``kthvalue``, found block by block
    (``block_rows`` rows of delta_W at a time, never crossing a part; None: a whole run of the
    part at once) by :func:`kthvalue_blocked`, with the kernel's blocks in ``scratch``'s
    buffers when given (``compiled``: see :func:`snell_kernel`). With ``hint`` (the layer's
    :class:`ThresholdHint`, updated here), a single pass looks in a window around the
    expected tau first. Shape (number of parts,)."""
    d_out, d_in = B.shape[1], A.shape[1]
    split = row_parts(parts, d_out)
    coeffs = coeffs.detach().to(A.dtype)
    A, B = A.detach(), B.detach()
    out = torch.full((split.count,), -1.0, dtype=A.dtype, device=A.device)
    if sparsity <= 0:
        return out
    pads = _padded_factors(A, B, compiled)
    scratch = scratch if scratch is not None else _Scratch()
    guesses = hint.guesses(split.count) if hint is not None else [None] * split.count
    tried = hint is not None and hint.usable
    missed = False
    for s, size in enumerate(split.sizes):
        n = size * d_in
        k = _num_zeroed(sparsity, n)
        if k == 0:
            continue
        bounds = list(split.blocks(s, block_rows or d_out))
        if len(bounds) == 1:  # the part is one block: kthvalue itself
            o0, o1 = bounds[0]
            out[s] = _magnitude_rows(pads, coeffs, o0, o1).reshape(-1).kthvalue(k).values
            continue

        def chunks(bounds=bounds):
            for o0, o1 in bounds:
                yield _magnitude_rows(pads, coeffs, o0, o1, scratch)
        if tried and guesses[s] is not None:
            window = torch.tensor([guesses[s] * (1 - hint.width), guesses[s] * (1 + hint.width)],
                                  dtype=A.dtype, device=A.device)

            def windows(bounds=bounds, window=window):
                for o0, o1 in bounds:
                    m = _magnitude_rows(pads, coeffs, o0, o1, scratch).reshape(-1)
                    yield (torch.count_nonzero(m < window[0]),
                           m[(m >= window[0]) & (m <= window[1])])
            tau = kthvalue_in_window(windows, k, cap=max(1 << 16, n // 8))
            if tau is not None:
                out[s] = tau
                continue
            missed = True
        out[s] = kthvalue_blocked(chunks, k, n=n)
    if hint is not None:
        hint.update(out.tolist(), guesses, tried, missed)
    return out


__all__ = ["ThresholdHint", "snell_thresholds"]
