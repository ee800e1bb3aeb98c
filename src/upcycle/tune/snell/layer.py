"""The SNELL layer: a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus the sparsified kernel
update, ``y = W0 x + b + DropPath(delta_W_s @ Dropout(x))``, computed by the blocked path
(:mod:`.autograd`) or one of the two unblocked ones kept to compare against; merging and
unmerging a block of rows at a time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...errors import UpcycleError
from .autograd import _SnellLinear
from .compiled import _fused_rows
from .config import DEFAULT_BLOCK_MB, SnellConfig
from .kernel import _kernel_rows, _padded_factors, _tile_rows, snell_kernel
from .mask import _sparsify_rows, sparsify
from .parts import _block_tau, _row_blocks, row_parts
from .threshold import ThresholdHint, snell_thresholds


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def adaptable_types() -> tuple[type, ...]:
    conv1d = _conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def _block_rows(block_mb: float | None, d_in: int, device: torch.device | str = "cpu") -> int:
    """Rows of delta_W per block: ``block_mb`` MiB of them (4-byte values; None: the
    device's ``DEFAULT_BLOCK_MB``), a multiple of the kernel's tile on ``device`` (so that
    blocks use whole tiles), at least one tile."""
    device = torch.device(device)
    if block_mb is None:
        block_mb = DEFAULT_BLOCK_MB.get(device.type, DEFAULT_BLOCK_MB["cpu"])
    tile = _tile_rows(device)
    rows = int(block_mb * 2**20) // max(1, d_in * 4)
    return max(tile, rows - rows % tile)


class SnellLayer(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a SNELL branch:
    ``y = W0 x + b + DropPath(delta_W_s @ Dropout(x))``.

    ``parts``: the parts of a fused projection's output rows, each sparsified with its own
    threshold (row indices per part, as ``FusedLayout.indices()`` gives them; or a number of
    equal stacked slices); ``num_slices`` is the older spelling of an int ``parts``."""

    def __init__(self, base_layer: nn.Module, config: SnellConfig, *, num_slices: int = 1,
                 parts=None, name: str = ""):
        super().__init__()
        conv1d = _conv1d_type()
        self.transposed = conv1d is not None and isinstance(base_layer, conv1d)
        if not (isinstance(base_layer, nn.Linear) or self.transposed):
            raise UpcycleError(f"module {name!r} is a {type(base_layer).__name__}; SNELL adapts "
                               f"only nn.Linear and GPT-2's Conv1D")
        weight = base_layer.weight
        d_out, d_in = (weight.shape[1], weight.shape[0]) if self.transposed else weight.shape
        self.parts = row_parts(num_slices if parts is None else parts, int(d_out),
                               name=f"module {name!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.num_slices = self.parts.count
        # the part of each row, for the per-row threshold of a block (None: one part)
        self.register_buffer("snell_row_part", self.parts.row_part(weight.device)
                             if self.parts.count > 1 else None, persistent=False)
        self.sparsity = float(config.sparsity)
        self.sparsify_mode = config.sparsify_mode
        self.dropout_p = float(config.dropout)
        self.drop_path_p = float(config.drop_path)
        self.recompute = config.recompute
        self.block_mb = None if config.block_mb is None else float(config.block_mb)
        self.compile = bool(config.compile)
        self._block_rows: int | None = None  # set to override block_mb (tests)
        self.threshold_hint = ThresholdHint()  # where the next thresholds are expected
        self.merged = False
        P, q = config.num_pieces, config.r // config.num_pieces
        factory = {"device": weight.device,
                   "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32}
        if factory["dtype"] in (torch.float16, torch.bfloat16):
            factory["dtype"] = torch.float32  # the kernel and its threshold want fp32
        self.snell_A = nn.Parameter(torch.empty(P, self.in_features, q, **factory))
        self.snell_B = nn.Parameter(torch.empty(P, self.out_features, q, **factory))
        nn.init.kaiming_uniform_(self.snell_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.snell_B, a=math.sqrt(5))
        coeffs = torch.tensor(config.piece_coeffs, **factory)
        if config.learnable_coeffs:
            self.snell_coeffs = nn.Parameter(coeffs)
        else:
            self.register_buffer("snell_coeffs", coeffs)

    @property
    def block_rows(self) -> int:
        """Rows of delta_W built at once (from block_mb and the layer's current device)."""
        if self._block_rows is not None:
            return self._block_rows
        return _block_rows(self.block_mb, self.in_features, self.snell_A.device)

    @block_rows.setter
    def block_rows(self, rows: int) -> None:
        self._block_rows = int(rows)

    # the update ------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The sparsified update delta_W_s, (d_out x d_in), in nn.Linear's orientation."""
        return sparsify(snell_kernel(self.snell_A, self.snell_B, self.snell_coeffs,
                                     self.compile),
                        self.sparsity, self.sparsify_mode, parts=self.parts)

    def _weight_oi(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def _fused(self, x: torch.Tensor, A, B, coeffs) -> torch.Tensor:
        delta = sparsify(snell_kernel(A, B, coeffs, self.compile), self.sparsity,
                         self.sparsify_mode, parts=self.parts)
        weight = self._weight_oi()
        return F.linear(x, weight + delta.to(weight.dtype), self.base_layer.bias)

    def _branch(self, x: torch.Tensor, A, B, coeffs) -> torch.Tensor:
        delta = sparsify(snell_kernel(A, B, coeffs, self.compile), self.sparsity,
                         self.sparsify_mode, parts=self.parts)
        return F.linear(x, delta.to(x.dtype))

    def _product(self, x: torch.Tensor, with_base: bool) -> torch.Tensor:
        """``x @ (W0 + delta_W_s)^T + b`` (with_base) or ``x @ delta_W_s^T``."""
        params = (self.snell_A, self.snell_B, self.snell_coeffs)
        if self.recompute == "none" or (self.recompute == "checkpoint"
                                        and not torch.is_grad_enabled()):
            return (self._fused if with_base else self._branch)(x, *params)
        if self.recompute == "checkpoint":
            return checkpoint(self._fused if with_base else self._branch, x, *params,
                              use_reentrant=False)
        weight = self._weight_oi() if with_base else None
        bias = self.base_layer.bias if with_base else None
        return _SnellLinear.apply(x, weight, bias, *params, self.sparsity, self.sparsify_mode,
                                  self.parts, self.snell_row_part, self.block_rows,
                                  self.compile, self.threshold_hint)

    @torch.no_grad()
    def _delta_blocks(self):
        """``(first row, end row, rows of delta_W_s)`` block by block (no autograd)."""
        A, B = self.snell_A.detach(), self.snell_B.detach()
        coeffs = self.snell_coeffs.detach().to(A.dtype)
        tau = snell_thresholds(A, B, coeffs, self.sparsity, self.parts, self.block_rows,
                               compiled=self.compile, hint=self.threshold_hint)
        pads = _padded_factors(A, B, self.compile)
        for o0, o1 in _row_blocks(self.out_features, self.block_rows):
            if self.compile:
                yield o0, o1, _fused_rows(
                    pads, coeffs, o0, o1, "delta", mode=self.sparsify_mode,
                    tau=_block_tau(tau, self.snell_row_part, o0, o1) if self.sparsity > 0
                    else None, out_dtype=A.dtype)
                continue
            K = _kernel_rows(pads, coeffs, o0, o1)
            delta, _ = _sparsify_rows(
                K, _block_tau(tau, self.snell_row_part, o0, o1) if self.sparsity > 0 else None,
                self.sparsify_mode)
            yield o0, o1, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        regularised = self.training and (self.dropout_p > 0 or self.drop_path_p > 0)
        if not regularised:
            # One matmul with W0 + delta_W_s: also what the merged layer computes.
            return self._product(x, with_base=True)
        x_drop = F.dropout(x, self.dropout_p, training=True)
        update = self._product(x_drop, with_base=False)
        return self.base_layer(x) + _drop_path(update, self.drop_path_p, True)

    # merging ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W0 += delta_W_s, a block of rows at a time."""
        if self.merged:
            return
        weight = self._weight_oi()
        for o0, o1, delta in self._delta_blocks():
            weight[o0:o1] += delta.to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._weight_oi()
        for o0, o1, delta in self._delta_blocks():
            weight[o0:o1] -= delta.to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        rank = self.snell_A.shape[0] * self.snell_A.shape[2]
        return (f"in={self.in_features}, out={self.out_features}, r={rank}, "
                f"sparsity={self.sparsity}, mode={self.sparsify_mode}, "
                f"parts={list(self.parts.sizes)}, merged={self.merged}")


__all__ = ["SnellLayer", "adaptable_types"]
