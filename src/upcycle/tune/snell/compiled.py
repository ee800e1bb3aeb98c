"""SNELL's ``compile=True`` path: every elementwise step of one pass over a block of delta_W's
rows (the kernel, |K|, the mask, ``W0 + delta``, the gradient's mask and its division by the
distances) written as one expression, :func:`_fused_block`, that ``torch.compile`` turns
into one loop over the block's entries; :func:`_fused_rows` runs it on rows o0:o1, eagerly
under a TorchDispatchMode, and names a compiler's failure."""

from __future__ import annotations

import torch

from ...errors import UpcycleError


def _kernel_tile(b_pads: list[torch.Tensor], a_pads_t: list[torch.Tensor],
                 coeffs: torch.Tensor):
    """Rows of K^T and their per-piece distances, written as one expression over the entries
    for ``torch.compile``: ``d_p = sqrt(max(B_pad_p . A_pad_p, 1e-30))`` (the matrix product
    as a sum over its r/P + 2 columns) and ``K = sum_p c_p d_p``."""
    K, dists = None, []
    for p, (b, a) in enumerate(zip(b_pads, a_pads_t)):
        d = (b.unsqueeze(2) * a.unsqueeze(0)).sum(1).clamp_min(1e-30).sqrt()
        dists.append(d)
        K = d * coeffs[p] if K is None else K + d * coeffs[p]
    return K, dists


def _fused_block(b_pads, a_pads_t, coeffs, tau, weight, grad, mode: str, want: str,
                 need_w: bool, need_h: bool, need_c: bool, out_dtype: torch.dtype | None):
    """Every elementwise step of one pass over a block of rows, as one expression for
    ``torch.compile`` (one loop over the entries, nothing of the block written but the
    outputs), from :func:`_kernel_tile`'s K and distances:

    - ``'kernel'``: K; ``'distances'``: (K, the per-piece distances);
    - ``'magnitude'``: |K| (the threshold's passes);
    - ``'delta'``: ``[weight +] K * factor`` in ``out_dtype`` (forward, merge), where factor
      is the competition term of ``mode`` given the rows' threshold ``tau`` (None: no
      sparsification, delta = K);
    - ``'backward'``: ``(w, H, gc)`` given ``grad``, the gradient of delta's rows: w =
      ``delta [+ weight]`` in out_dtype for the input's gradient (``need_w``), per piece
      ``H_p = grad * factor / d_p`` (``need_h``) and ``gc_p = sum(grad * factor * d_p)``
      (``need_c``), from which :func:`_kernel_grads_from_h` and the caller form the factors'
      and coefficients' gradients."""
    K, dists = _kernel_tile(b_pads, a_pads_t, coeffs)
    if want == "kernel":
        return K
    if want == "distances":
        return K, dists
    if want == "magnitude":
        return K.abs()
    factor = None
    if tau is not None:
        m = K.abs()
        factor = m * (m > tau) if mode == "reference" else (m - tau.clamp_min(0)).clamp_min(0)
    delta = K if factor is None else K * factor
    if want == "delta":
        return (delta if weight is None else weight.to(K.dtype) + delta).to(out_dtype)
    w = H = gc = None
    if need_w:
        w = delta.to(out_dtype)
        if weight is not None:
            w = w + weight.to(out_dtype)
    if need_h or need_c:
        gf = grad if factor is None else grad * factor  # the magnitude term is detached
        if need_h:
            H = [gf / d for d in dists]
        if need_c:
            gc = [(gf * d).sum() for d in dists]
    return w, H, gc


_COMPILED_FUSED = None
RECOMPILE_LIMIT = 64
"""torch._dynamo's recompile limit is raised to at least this when SNELL first compiles:
each pass kind, layer width, dtype and threshold layout is a graph of its own (the rows are
dynamic), and dynamo's default of 8 would silently run the rest eagerly."""


def _compiled_fused():
    global _COMPILED_FUSED
    if _COMPILED_FUSED is None:
        import torch._dynamo

        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        # The number of rows is dynamic (one graph serves every block of a layer), the width
        # static (the inner loop is vectorised for it); a row's values do not depend on the
        # block it is computed in, so every pass builds bit-identical rows.
        _COMPILED_FUSED = torch.compile(_fused_block, dynamic=None)
    return _COMPILED_FUSED


def _dispatch_mode_active() -> bool:
    from torch.utils import _python_dispatch

    on_stack = getattr(_python_dispatch, "any_torch_dispatch_mode_on_stack", None)
    return on_stack() if on_stack is not None else torch._C._len_torch_dispatch_stack() > 0


def _fused_rows(pads, coeffs: torch.Tensor, o0: int, o1: int, want: str, *,
                tau: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                grad: torch.Tensor | None = None, mode: str = "reference",
                need_w: bool = False, need_h: bool = False, need_c: bool = False,
                out_dtype: torch.dtype | None = None):
    """:func:`_fused_block` (compiled) on rows o0:o1 of delta_W; ``weight``, ``grad`` and a
    per-row ``tau`` are those rows' slices."""
    import torch._dynamo

    b_pads = [b[o0:o1] for b, _ in pads]
    rowwise = [*b_pads, weight, grad, tau if tau is not None and tau.dim() else None]
    for t in rowwise:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    # Under a TorchDispatchMode (a FLOP counter, upcycle.runtime.memory.LiveTensorBytes...) dynamo
    # does not compile, and it would mark the function to be skipped for good: run it as
    # plain torch operations there (the same values to rounding, every pass alike).
    fn = _fused_block if _dispatch_mode_active() else _compiled_fused()
    try:
        return fn(b_pads, [a for _, a in pads], coeffs, tau, weight, grad, mode, want,
                  need_w, need_h, need_c, out_dtype)
    except UpcycleError:
        raise
    except Exception as err:  # inductor's errors (no compiler, no triton) have many types
        raise UpcycleError(
            f"SNELL compile=True: torch.compile failed on this machine ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); it needs a C++ "
            f"compiler on a CPU and triton on CUDA. Set compile=False (the eager kernel; "
            f"an adapter trained with compile=True then differs in the last bits)") from err


__all__ = ["RECOMPILE_LIMIT"]
