"""The exact k-th smallest of values too many to hold at once: a radix select over the float
bits (:func:`kthvalue_blocked`) and a one-pass look in a window where the value is expected
(:func:`kthvalue_in_window`). Both give bit for bit what ``torch.kthvalue`` gives on all
the values together; the values come in chunks from a function called once per pass."""

from __future__ import annotations

import torch

from ..errors import UpcycleError

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


@torch.no_grad()
def kthvalue_blocked(chunks, k: int, n: int | None = None, window: float = 0.01
                     ) -> torch.Tensor:
    """The k-th smallest (1-based) of the non-negative floats yielded by ``chunks()``, bit
    for bit what ``torch.kthvalue`` returns on their concatenation, without holding them all.

    A radix select over the bit patterns (monotone in the value for non-negative floats):
    ``chunks()`` yields the same values (in any blocking) each time it is called; each call
    counts one 16-bit digit of the entries that share the digits found so far.

    With ``n`` (the number of values), the first call also collects the candidates near
    the k/n quantile of the first chunk (about ``2 * window * n`` values, at most as many as
    the largest chunk holds): when the k-th value is among them (it is unless the first
    chunk misjudged the quantile, or ties crowd the window), ``kthvalue`` on the candidates
    gives it in one call of ``chunks()`` instead of two (fp32). Returns a 0-dim tensor of the
    chunks' dtype and device.
    """
    prefix = rank = None
    dtype = None
    nbits = 0
    shift = None
    candidates: list | None = [] if n else None
    window_bins = None
    collected = cap = 0
    while shift is None or shift > 0:
        counts = None
        for chunk in chunks():
            if counts is None:
                dtype, device = chunk.dtype, chunk.device
                nbits = 8 * chunk.element_size()
                if shift is None:
                    shift = nbits
                    prefix = torch.zeros((), dtype=torch.int64, device=device)
                    rank = torch.full((), k, dtype=torch.int64, device=device)
                counts = torch.zeros(65538, dtype=torch.int64, device=device)
            bits = chunk.reshape(-1).view(_INT_VIEW[chunk.element_size()])
            if bits.dtype == torch.int16:
                bits = bits.to(torch.int32)
            if shift == nbits:  # the top digit (the sign bit is 0): bins 1 .. 32768
                digit = (bits >> (shift - 16)).add_(1)
            else:
                # Only the entries whose higher digits are the prefix count: bins 1 .. 65536;
                # those below go to bin 0 and those above to bin 65537.
                digit = bits - (prefix << shift).to(bits.dtype)
                digit = digit.clamp_(-1, 1 << shift).bitwise_right_shift_(shift - 16).add_(1)
            here = torch.bincount(digit, minlength=65538)
            counts += here
            if candidates is not None:
                cap = max(cap, digit.numel())
                if window_bins is None:  # the bins around the first chunk's k/n quantile
                    cum_here = here.cumsum(0)
                    q = k / n
                    ranks = torch.tensor([max(0.0, q - window), min(1.0, q + window)],
                                         dtype=torch.float64, device=device) * digit.numel()
                    window_bins = torch.searchsorted(cum_here, ranks.ceil().clamp_min(1).to(
                        torch.int64))
                inside = (digit >= window_bins[0]) & (digit <= window_bins[1])
                found = chunk.reshape(-1)[inside]
                collected += found.numel()
                candidates.append(found)
                if collected > cap:  # ties or a poor guess crowd the window: give up
                    candidates = None
                del inside, found
            del bits, digit, here
        if counts is None:
            raise UpcycleError("kthvalue_blocked: chunks() yielded no values")
        if shift == nbits and candidates is not None:
            cum_full = counts.cumsum(0)
            if int(cum_full[-1]) < k:
                raise UpcycleError(f"kthvalue_blocked: k={k} but only {int(cum_full[-1])} "
                                   f"values")
            lo, hi = window_bins
            below = int(cum_full[lo - 1])
            if below < k <= int(cum_full[hi]):  # the k-th is a candidate
                return torch.cat(candidates).kthvalue(k - below).values
        candidates = None
        counts = counts[1:65537]
        cum = counts.cumsum(0)
        if shift == nbits and int(cum[-1]) < k:
            raise UpcycleError(f"kthvalue_blocked: k={k} but only {int(cum[-1])} values")
        value = torch.searchsorted(cum, rank.reshape(1)).reshape(())
        rank = rank - (cum[value] - counts[value])
        prefix = (prefix << 16) | value
        shift -= 16
    int_dtype = _INT_VIEW[torch.empty((), dtype=dtype).element_size()]
    return prefix.to(int_dtype).reshape(1).view(dtype).reshape(())


@torch.no_grad()
def kthvalue_in_window(windows, k: int, cap: int) -> torch.Tensor | None:
    """The k-th smallest of a set of values when it lies in a window [lo, hi], from one pass:
    ``windows()`` yields, per chunk of the values, how many are below ``lo`` and those
    inside. None when the k-th value is outside the window, or more than ``cap`` values
    are inside."""
    below = 0
    inside: list[torch.Tensor] = []
    count = 0
    for n_below, found in windows():
        below += int(n_below)
        count += found.numel()
        if count > cap:
            return None
        inside.append(found)
    if below < k <= below + count:
        return torch.cat(inside).kthvalue(k - below).values
    return None


__all__ = ["kthvalue_blocked", "kthvalue_in_window"]
