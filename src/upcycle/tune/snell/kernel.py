"""SNELL's kernel ``K^T[o, i] = sum_p c_p ||B_p[o] - A_p[i]||_2`` (delta_W before the mask),
built a block of rows at a time on a fixed grid of row tiles (every entry the same bits
whichever block computes it), and its gradients with respect to A, B and the coefficients;
:func:`snell_kernel` is the dense, differentiable form."""

from __future__ import annotations

import torch

from .compiled import _fused_rows

# The kernel's distances are computed in tiles of this many rows of delta_W (output
# features), aligned to row 0, whichever rows a caller asks for: every entry then comes from
# the same matrix product whether the whole matrix or a block of rows is built, so the
# blocked path and the dense reference agree bit for bit (and so do their masks). Larger
# tiles off the CPU, where each product is a kernel launch.
KERNEL_TILE_ROWS = 64
KERNEL_TILE_ROWS_ACCELERATOR = 512


def _tile_rows(device: torch.device) -> int:
    return KERNEL_TILE_ROWS if device.type == "cpu" else KERNEL_TILE_ROWS_ACCELERATOR


class _Pads(list):
    """The per-piece ``(B_pad, A_pad^T)`` of :func:`_padded_factors`, and whether the kernel
    is computed by the compiled tile function (``compiled``)."""

    compiled = False


def _padded_factors(A: torch.Tensor, B: torch.Tensor, compiled: bool = False):
    """Per piece, the factors of ``||b - a||^2 = |b|^2 - 2 b.a + |a|^2`` as one product
    (torch.cdist's matrix-product form): ``B_pad`` (d_out x r/P+2), ``A_pad^T`` (r/P+2 x d_in).
    ``compiled``: :func:`_kernel_rows` evaluates them with the compiled tile function."""
    pads = _Pads()
    pads.compiled = bool(compiled)
    for p in range(A.shape[0]):
        a, b = A[p], B[p]
        a_norm = a.pow(2).sum(-1, keepdim=True)
        b_norm = b.pow(2).sum(-1, keepdim=True)
        b_pad = torch.cat([b.mul(-2), b_norm, torch.ones_like(b_norm)], dim=-1)
        a_pad = torch.cat([a, torch.ones_like(a_norm), a_norm], dim=-1)
        pads.append((b_pad, a_pad.t().contiguous()))
    return pads


class _Scratch:
    """Buffers reused from block to block within one pass (forward, backward, threshold):
    a fresh 4 MiB tensor per elementwise op costs more than the op itself on a CPU (page
    faults and zeroing). ``get(name, rows, cols, like)`` returns a (rows x cols) view of the
    named flat buffer, grown when needed."""

    def __init__(self):
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        n = rows * cols
        buf = self.store.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = like.new_empty(n, dtype=dtype)
            self.store[name] = buf
        return buf[:n].view(rows, cols)


def _distances(pad, o0: int, o1: int, scratch: _Scratch | None = None, name: str = "d"
               ) -> torch.Tensor:
    """``||B_p[o] - A_p[i]||`` for the rows o0 <= o < o1 (o1 - o0 rows x d_in), computed tile
    by tile on the fixed row grid (see KERNEL_TILE_ROWS), into ``scratch``'s buffer ``name``
    when given."""
    b_pad, a_pad_t = pad
    d_out, T = b_pad.shape[0], _tile_rows(b_pad.device)
    t0, t1 = o0 - o0 % T, min(d_out, -(-o1 // T) * T)
    if scratch is None:
        out = b_pad.new_empty((t1 - t0, a_pad_t.shape[1]))
    else:
        out = scratch.get(name, t1 - t0, a_pad_t.shape[1], b_pad)
    for j in range(t0, t1, T):
        torch.mm(b_pad[j:j + T], a_pad_t, out=out[j - t0:j - t0 + T])
    out = out[o0 - t0:o1 - t0] if (o0, o1) != (t0, t1) else out
    return out.clamp_min_(1e-30).sqrt_()


@torch.no_grad()
def _kernel_rows(pads, coeffs: torch.Tensor, o0: int, o1: int, dists: list | None = None,
                 scratch: _Scratch | None = None) -> torch.Tensor:
    """Rows o0:o1 of ``delta_W = K^T`` (sum_p c_p * dist_p). With ``dists`` (a list), the
    per-piece distances are appended to it (for the backward); otherwise they are reused.
    With ``scratch``, everything is written into its buffers ('d0', 'd1', ..., 'K', 'm'),
    valid until the next call with the same scratch. ``pads.compiled``: by the compiled
    :func:`_fused_block`."""
    if getattr(pads, "compiled", False):
        if dists is None:
            return _fused_rows(pads, coeffs, o0, o1, "kernel")
        K, ds = _fused_rows(pads, coeffs, o0, o1, "distances")
        dists.extend(ds)
        return K
    K = None
    for p, pad in enumerate(pads):
        d = _distances(pad, o0, o1, scratch, f"d{p}")
        if dists is not None:
            dists.append(d)
            if scratch is None:
                term = d * coeffs[p]
            else:
                term = torch.mul(d, coeffs[p], out=scratch.get(
                    "K" if K is None else "m", o1 - o0, d.shape[1], d))
        else:
            term = d.mul_(coeffs[p])
        if K is None:
            K = term
        else:
            K.add_(term)  # the same two roundings as K + d * c, in every path
        del term
    return K


@torch.no_grad()
def _kernel_grads_rows(A, B, coeffs, dists, grad_K, o0: int, o1: int, grad_A, grad_B,
                       grad_c, a_ones_t=None) -> None:
    """Accumulate the gradients of ``sum(grad_K * K[o0:o1])`` into grad_A (P x d_in x q),
    grad_B (P x d_out x q) and grad_c (P,) (each may be None); consumes ``dists`` (divided
    in place). d||b - a||/db = (b - a)/||b - a|| (torch.cdist's matrix-product backward)."""
    H = []
    for p in range(A.shape[0]):
        d = dists[p]
        dists[p] = None
        if grad_c is not None:
            grad_c[p] += torch.dot(grad_K.reshape(-1), d.reshape(-1))
        if grad_A is not None or grad_B is not None:
            H.append(torch.div(grad_K, d, out=d))  # grad / dist, in place; c_p comes later
        del d
    if H:
        _kernel_grads_from_h(A, B, coeffs, H, o0, o1, grad_A, grad_B, a_ones_t)


@torch.no_grad()
def _kernel_grads_from_h(A, B, coeffs, H, o0: int, o1: int, grad_A, grad_B,
                         a_ones_t=None) -> None:
    """The factors' gradients from ``H_p = grad_K / dist_p`` (rows o0:o1, one per piece;
    consumed): ``c_p (b * sum_i H - H @ a)`` into grad_B's rows and ``c_p (a * sum_o H -
    H^T @ b)`` into grad_A, each sum as one more column of a product. ``a_ones_t``: per piece
    ``[A_p, 1]^T`` (q+1 x d_in), from :func:`_a_ones_t`."""
    if a_ones_t is None:
        a_ones_t = _a_ones_t(A)
    for p in range(A.shape[0]):
        h = H[p]
        H[p] = None
        a, b = A[p], B[p, o0:o1]
        if grad_B is not None:
            HA = torch.mm(h, a_ones_t[p].t())  # (rows x q+1); faster than H @ [a, 1]
            grad_B[p, o0:o1] += (b * HA[:, -1:] - HA[:, :-1]) * coeffs[p]
        if grad_A is not None:  # ([b, 1]^T @ H)^T: H read row by row
            b_ones_t = torch.cat([b, b.new_ones((b.shape[0], 1))], dim=1).t()
            HB = torch.mm(b_ones_t, h).t()  # (d_in x q+1)
            grad_A[p] += (a * HB[:, -1:] - HB[:, :-1]) * coeffs[p]
        del h


def _a_ones_t(A: torch.Tensor) -> list[torch.Tensor]:
    """Per piece, ``[A_p, 1]^T`` (q+1 x d_in, contiguous) for :func:`_kernel_grads_from_h`."""
    return [torch.cat([a, a.new_ones((a.shape[0], 1))], dim=1).t().contiguous() for a in A]


class _Kernel(torch.autograd.Function):
    """The dense kernel ``K^T`` with the same arithmetic as the blocked path; its backward
    recomputes the distances instead of storing them."""

    @staticmethod
    def forward(ctx, A, B, coeffs, compiled):
        ctx.save_for_backward(A, B, coeffs)
        ctx.compiled = compiled
        return _kernel_rows(_padded_factors(A, B, compiled), coeffs, 0, B.shape[1])

    @staticmethod
    def backward(ctx, grad_K):
        A, B, coeffs = ctx.saved_tensors
        need_a, need_b, need_c = ctx.needs_input_grad[:3]
        dists: list = []
        _kernel_rows(_padded_factors(A, B, ctx.compiled), coeffs, 0, B.shape[1], dists)
        grads = (torch.zeros_like(A) if need_a else None, torch.zeros_like(B) if need_b else None,
                 torch.zeros_like(coeffs) if need_c else None)
        _kernel_grads_rows(A, B, coeffs, dists, grad_K.to(A.dtype), 0, B.shape[1], *grads)
        return (*grads, None)


def snell_kernel(A: torch.Tensor, B: torch.Tensor, coeffs: torch.Tensor,
                 compiled: bool = False) -> torch.Tensor:
    """The dense update ``K^T`` (d_out x d_in) with K[i, j] = sum_p c_p ||A_p[i] - B_p[j]||_2.

    ``A``: (P, d_in, r/P); ``B``: (P, d_out, r/P); ``coeffs``: (P,). Differentiable in all
    three. Entry for entry the same values as the blocked path of :class:`SnellLayer` with
    the same ``compiled`` (``SnellConfig.compile``).
    """
    coeffs = coeffs.to(A.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (A, B, coeffs)):
        return _Kernel.apply(A, B, coeffs, compiled)
    return _kernel_rows(_padded_factors(A, B, compiled), coeffs, 0, B.shape[1])


__all__ = ["KERNEL_TILE_ROWS", "KERNEL_TILE_ROWS_ACCELERATOR", "snell_kernel"]
