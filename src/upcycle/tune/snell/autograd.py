"""SNELL's blocked autograd Function: ``y = x (W0 + delta_W_s)^T + b`` with delta_W_s built a
block of rows at a time in forward and rebuilt from A and B in backward, so that nothing of
size ``d_out x d_in`` is stored for backward and no more than a block of it exists at once.

Eagerly it is an ``autograd.Function``; under ``torch.compile`` the same two passes are two
custom operators (``upcycle::snell_linear`` and its backward), opaque to the compiler: the
threshold search is data-dependent Python (``.tolist()``, a hint of plain floats updated
every step) that dynamo would otherwise break the graph on and guard on, recompiling every
step. The operators take only tensors, numbers and strings fixed for a layer's life (the
hint by its ``handle``), so a compiled model is traced once."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import _fused_rows
from .kernel import (
    _a_ones_t,
    _kernel_grads_from_h,
    _kernel_grads_rows,
    _kernel_rows,
    _padded_factors,
    _Scratch,
)
from .mask import _sparsify_rows
from .parts import RowParts, _block_tau, _row_blocks
from .threshold import ThresholdHint, snell_thresholds


def _snell_forward(x, weight, bias, A, B, coeffs, sparsity, mode, parts, row_part, block_rows,
                   compiled, hint):
    """``(y, tau)``: the layer's output and the thresholds of its parts."""
    coeffs_c = coeffs.to(A.dtype).detach()
    scratch = _Scratch()
    tau = snell_thresholds(A, B, coeffs_c, sparsity, parts, block_rows, scratch=scratch,
                           compiled=compiled, hint=hint)
    x2d = x.reshape(-1, x.shape[-1])
    d_out, d_in = B.shape[1], A.shape[1]
    y = x2d.new_empty((x2d.shape[0], d_out))
    pads = _padded_factors(A.detach(), B.detach(), compiled)
    for o0, o1 in _row_blocks(d_out, block_rows):
        if compiled:  # W0 + delta in the kernel's own loop
            w_block = _fused_rows(
                pads, coeffs_c, o0, o1, "delta", mode=mode,
                tau=_block_tau(tau, row_part, o0, o1) if sparsity > 0 else None,
                weight=None if weight is None else weight[o0:o1],
                out_dtype=x.dtype if weight is None else weight.dtype)
            y[:, o0:o1] = F.linear(x2d, w_block, None if bias is None else bias[o0:o1])
            del w_block
            continue
        K = _kernel_rows(pads, coeffs_c, o0, o1, scratch=scratch)
        w_block = scratch.get("w", o1 - o0, d_in, K, x.dtype if weight is None
                              else weight.dtype)
        if sparsity > 0:
            _, factor = _sparsify_rows(K, _block_tau(tau, row_part, o0, o1), mode,
                                       keep_factor=True, scratch=scratch, in_place=False)
            if weight is None:  # delta = K * factor
                torch.mul(K, factor, out=w_block)
            else:  # W0 + K * factor in one pass
                torch.addcmul(weight[o0:o1].to(K.dtype), K, factor, out=w_block)
            del factor
        elif weight is None:
            w_block.copy_(K)
        else:
            torch.add(weight[o0:o1], K.to(weight.dtype), out=w_block)
        del K
        y[:, o0:o1] = F.linear(x2d, w_block, None if bias is None else bias[o0:o1])
        del w_block
    del scratch
    return y.reshape(*x.shape[:-1], d_out), tau


def _snell_backward(grad_y, x, weight, A, B, coeffs, tau, row_part, sparsity, mode, block_rows,
                    compiled, needs):
    """The gradients of x, weight, bias, A, B and coeffs (``needs``: which; None for the
    others), a block of delta_W's rows at a time."""
    need_x, need_w, need_b, need_a, need_bb, need_c = needs
    d_out, d_in = B.shape[1], A.shape[1]
    gy = grad_y.reshape(-1, d_out)
    x2d = x.reshape(-1, d_in)
    gy_c, x_c = gy.to(A.dtype), x2d.to(A.dtype)
    coeffs_c = coeffs.to(A.dtype)
    grad_x = torch.zeros_like(x2d, dtype=grad_y.dtype) if need_x else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_A = torch.zeros_like(A) if need_a else None
    grad_B = torch.zeros_like(B) if need_bb else None
    grad_c = torch.zeros_like(coeffs_c) if need_c else None
    need_kernel_grad = need_a or need_bb or need_c
    pads = _padded_factors(A, B, compiled)
    a_ones_t = _a_ones_t(A) if need_kernel_grad else None
    scratch = _Scratch()
    for o0, o1 in _row_blocks(d_out, block_rows):
        if compiled:  # the block's gradient, then the rest in one compiled loop
            grad_delta = None
            if need_w or need_kernel_grad:
                grad_delta = torch.mm(gy_c[:, o0:o1].t(), x_c,
                                      out=scratch.get("g", o1 - o0, d_in, x_c))
                if need_w:
                    grad_w[o0:o1] = grad_delta
            w_block, H, gc = _fused_rows(
                pads, coeffs_c, o0, o1, "backward", mode=mode,
                tau=_block_tau(tau, row_part, o0, o1) if sparsity > 0 else None,
                weight=None if weight is None else weight[o0:o1],
                grad=grad_delta if need_kernel_grad else None, need_w=need_x,
                need_h=need_a or need_bb, need_c=need_c, out_dtype=grad_y.dtype)
            del grad_delta
            if need_x:
                grad_x.addmm_(gy[:, o0:o1], w_block)
            del w_block
            if need_c:
                grad_c += torch.stack(gc)
            if H is not None:
                _kernel_grads_from_h(A, B, coeffs_c, H, o0, o1, grad_A, grad_B, a_ones_t)
            continue
        dists: list | None = [] if need_kernel_grad else None
        K = _kernel_rows(pads, coeffs_c, o0, o1, dists, scratch=scratch)
        _, factor = _sparsify_rows(
            K, _block_tau(tau, row_part, o0, o1) if sparsity > 0 else None, mode,
            keep_factor=True, scratch=scratch, in_place=False)
        if need_x:
            w_block = scratch.get("w", o1 - o0, d_in, K)
            if factor is None:
                w_block.copy_(K)
            else:
                torch.mul(K, factor, out=w_block)
            w_block = w_block.to(grad_y.dtype)
            if weight is not None:
                w_block = w_block.add_(weight[o0:o1].to(grad_y.dtype))
            grad_x.addmm_(gy[:, o0:o1], w_block)
            del w_block
        del K
        if need_w or need_kernel_grad:
            # (rows x d_in), this block only
            grad_delta = torch.mm(gy_c[:, o0:o1].t(), x_c,
                                  out=scratch.get("g", o1 - o0, d_in, x_c))
            if need_w:
                grad_w[o0:o1] = grad_delta
            if need_kernel_grad:
                if factor is not None:
                    grad_delta.mul_(factor)  # the magnitude term is detached
                del factor
                _kernel_grads_rows(A, B, coeffs_c, dists, grad_delta, o0, o1, grad_A,
                                   grad_B, grad_c, a_ones_t)
            del grad_delta
    del scratch
    grad_b = gy.sum(0) if need_b else None
    if grad_x is not None:
        grad_x = grad_x.reshape(x.shape)
    if grad_c is not None:
        grad_c = grad_c.to(coeffs.dtype)
    return grad_x, grad_w, grad_b, grad_A, grad_B, grad_c


class _SnellLinearFunction(torch.autograd.Function):
    """``y = x (W0 + delta_W_s)^T + b`` with delta_W_s built ``block_rows`` rows at a time,
    in forward and in backward, so no more than a block of it (and of its kernel, mask and
    gradient) exists at once. Saves x, A, B, the coefficients and the thresholds (one scalar
    per part of the rows, ``parts`` a :class:`RowParts`; ``row_part`` the part of each row,
    None for one part); W0 is a parameter, saved by reference. ``weight``/``bias`` may be
    None (the update alone)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, coeffs, sparsity, mode, parts, row_part,
                block_rows, compiled, hint):
        y, tau = _snell_forward(x, weight, bias, A, B, coeffs, sparsity, mode, parts, row_part,
                                block_rows, compiled, hint)
        ctx.args = (row_part, sparsity, mode, block_rows, compiled)
        ctx.save_for_backward(x, weight, A, B, coeffs, tau)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, A, B, coeffs, tau = ctx.saved_tensors
        grads = _snell_backward(grad_y, x, weight, A, B, coeffs, tau, *ctx.args,
                                ctx.needs_input_grad[:6])
        return (*grads, None, None, None, None, None, None, None)


# -- the same passes as custom operators, for torch.compile --------------------------------

def _encode_parts(parts) -> list[int]:
    """``parts`` (a :class:`RowParts` or a number of equal slices) as the ints an operator
    takes: ``[-slices]``, or ``[count, runs of part 0, start, end, ..., runs of part 1, ...]``."""
    if isinstance(parts, int):
        return [-parts]
    out = [parts.count]
    for runs in parts.runs:
        out.append(len(runs))
        for s, e in runs:
            out += [s, e]
    return out


@functools.lru_cache(maxsize=1024)
def _decode_parts(code: tuple[int, ...], rows: int):
    if code[0] < 0:
        return -code[0]
    runs, i = [], 1
    for _ in range(code[0]):
        n = code[i]
        runs.append(tuple((code[i + 1 + 2 * j], code[i + 2 + 2 * j]) for j in range(n)))
        i += 1 + 2 * n
    return RowParts(tuple(runs), rows)


def _count_parts(code: list[int]) -> int:
    return -code[0] if code[0] < 0 else code[0]


@torch.library.custom_op("upcycle::snell_linear", mutates_args=())
def _snell_linear_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, A: Tensor,
                     B: Tensor, coeffs: Tensor, row_part: Tensor | None, sparsity: float,
                     mode: str, parts: list[int], block_rows: int, compiled: bool,
                     hint: int) -> tuple[Tensor, Tensor]:
    """:func:`_snell_forward`; ``parts`` from :func:`_encode_parts`, ``hint`` a
    :class:`ThresholdHint`'s handle (-1: none)."""
    return _snell_forward(x, weight, bias, A, B, coeffs, sparsity, mode,
                          _decode_parts(tuple(parts), B.shape[1]), row_part, block_rows,
                          compiled, ThresholdHint.find(hint))


@_snell_linear_op.register_fake
def _(x, weight, bias, A, B, coeffs, row_part, sparsity, mode, parts, block_rows, compiled,
      hint):
    return (x.new_empty((*x.shape[:-1], B.shape[1])),
            A.new_empty((_count_parts(parts),)))


@torch.library.custom_op("upcycle::snell_linear_backward", mutates_args=())
def _snell_linear_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor | None, A: Tensor,
                              B: Tensor, coeffs: Tensor, tau: Tensor,
                              row_part: Tensor | None, sparsity: float, mode: str,
                              block_rows: int, compiled: bool, needs: list[bool]
                              ) -> list[Tensor]:
    """:func:`_snell_backward`: the gradients asked for in ``needs``, in order."""
    grads = _snell_backward(grad_y, x, weight, A, B, coeffs, tau, row_part, sparsity, mode,
                            block_rows, compiled, needs)
    return [g for g in grads if g is not None]


@_snell_linear_backward_op.register_fake
def _(grad_y, x, weight, A, B, coeffs, tau, row_part, sparsity, mode, block_rows, compiled,
      needs):
    likes = (x.new_empty(x.shape, dtype=grad_y.dtype),
             None if weight is None else torch.empty_like(weight),
             grad_y.new_empty((B.shape[1],)), torch.empty_like(A), torch.empty_like(B),
             torch.empty_like(coeffs))
    return [t for t, need in zip(likes, needs) if need]


def _setup_context(ctx, inputs, output):
    x, weight, _, A, B, coeffs, row_part, sparsity, mode, _, block_rows, compiled, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, A, B, coeffs, output[1], row_part)
    ctx.args = (sparsity, mode, block_rows, compiled)


def _op_backward(ctx, grad_y, _grad_tau):
    x, weight, A, B, coeffs, tau, row_part = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    grads = iter(_snell_linear_backward_op(grad_y, x, weight, A, B, coeffs, tau, row_part,
                                           *ctx.args, needs))
    return (*(next(grads) if n else None for n in needs),
            None, None, None, None, None, None, None)


_snell_linear_op.register_autograd(_op_backward, setup_context=_setup_context)

TRACED_ROUTE = "custom_op"
"""How a compiled model runs the Function: ``'custom_op'`` (one graph around the
operators) or ``'disable'`` (``torch.compiler.disable``: a graph break at every SNELL layer,
kept to measure against, ``benchmarks/snell_compile.py``)."""


@torch.compiler.disable
def _apply_outside_graph(*args):
    return _SnellLinearFunction.apply(*args)


class _SnellLinear:
    """``_SnellLinear.apply(x, weight, bias, A, B, coeffs, sparsity, mode, parts, row_part,
    block_rows, compiled, hint)``: :class:`_SnellLinearFunction` eagerly, its custom
    operators under ``torch.compile`` (``hint``, a :class:`ThresholdHint` or None, passed
    by handle)."""

    @staticmethod
    def apply(x, weight, bias, A, B, coeffs, sparsity, mode, parts, row_part, block_rows,
              compiled, hint):
        args = (x, weight, bias, A, B, coeffs, sparsity, mode, parts, row_part, block_rows,
                compiled, hint)
        if not torch.compiler.is_compiling():
            return _SnellLinearFunction.apply(*args)
        if TRACED_ROUTE == "disable":
            return _apply_outside_graph(*args)
        y, _ = _snell_linear_op(x, weight, bias, A, B, coeffs, row_part, float(sparsity), mode,
                                _encode_parts(parts), int(block_rows), bool(compiled),
                                -1 if hint is None else hint.handle)
        return y
