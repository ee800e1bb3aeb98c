"""The SNELL layer, a peft tuner layer: a frozen ``nn.Linear`` (GPT-2 ``Conv1D``, or their
bitsandbytes/torchao/HQQ quantized forms) plus one sparsified kernel update per adapter,
``y = W0 x + b + sum_a DropPath(delta_W_s,a @ Dropout(x))``, computed by the blocked path
(:mod:`.autograd`) or one of the two unblocked ones kept to compare against; merging and
unmerging a block of rows at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import (
    BaseTunerLayer,
    _get_in_out_features,
    check_adapters_to_merge,
)
from peft.utils import resolve_quantization_backend
from peft.utils.quantization_utils import TorchaoBackend
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...errors import UpcycleError
from .autograd import _SnellLinear
from .compiled import _fused_rows
from .config import DEFAULT_BLOCK_MB, SnellConfig
from .kernel import _kernel_rows, _padded_factors, _tile_rows, snell_kernel
from .mask import _sparsify_rows, sparsify
from .parts import RowParts, _block_tau, _row_blocks, row_parts
from .threshold import ThresholdHint, snell_thresholds

ADAPTED = "nn.Linear, GPT-2's Conv1D and their bitsandbytes, torchao and HQQ quantized forms"
"""What SNELL adapts, for error messages."""


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
    """The unquantized layer types SNELL adapts."""
    conv1d = _conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def quantization_backend(module: nn.Module, **kwargs):
    """peft's quantization backend of a quantized linear layer (None: not quantized)."""
    try:
        return resolve_quantization_backend(module, **kwargs)
    except ValueError:  # torchao without the model's quantizer: forward works, merge does not
        backend = TorchaoBackend(None)
        backend.supports_merge = False
        return backend


def check_adaptable(module: nn.Module, name: str, **quantization_kwargs):
    """peft's quantization backend of ``module`` (None: not quantized), or an error naming
    the module and its type when SNELL cannot wrap it."""
    backend = quantization_backend(module, **quantization_kwargs)  # bnb's are nn.Linear too
    if backend is not None and backend.layer_type == "linear":
        return backend
    if backend is None and isinstance(module, adaptable_types()):
        return None
    raise UpcycleError(f"SNELL target_modules matched {name!r}, a {type(module).__name__}; "
                       f"SNELL adapts {ADAPTED} (narrow target_modules or add it to "
                       f"exclude_modules)")


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


@dataclass
class _Settings:
    """One adapter's settings in a layer (from its SnellConfig; tests change them)."""

    sparsity: float
    mode: str
    dropout: float
    drop_path: float
    recompute: str
    block_mb: float | None
    compile: bool
    parts: RowParts

    @property
    def regularised(self) -> bool:
        return self.dropout > 0 or self.drop_path > 0


class SnellLayer(nn.Module, BaseTunerLayer):
    """A frozen linear layer plus one SNELL branch per adapter (peft's ``BaseTunerLayer``:
    ``snell_A``/``snell_B``/``snell_coeffs`` are dicts keyed by adapter name; ``set_adapter``,
    ``disable_adapters``, ``merge``/``unmerge`` and ``delete_adapter`` work as for LoRA).

    ``parts``: the parts of a fused projection's output rows, each sparsified with its own
    threshold (row indices per part, as ``FusedLayout.indices()`` gives them; or a number of
    equal stacked slices); ``num_slices`` is the older spelling of an int ``parts``."""

    adapter_layer_names = ("snell_A", "snell_B", "snell_coeffs")
    other_param_names = ("snell_fixed_coeffs", "snell_settings", "snell_row_part",
                         "threshold_hint")

    def __init__(self, base_layer: nn.Module, config: SnellConfig | None = None,
                 adapter_name: str = "default", *, num_slices: int = 1, parts=None,
                 name: str = "", **quantization_kwargs):
        super().__init__()
        backend = check_adaptable(base_layer, name or type(base_layer).__name__,
                                  **quantization_kwargs)
        conv1d = _conv1d_type()
        self.base_layer = base_layer
        self.transposed = conv1d is not None and isinstance(base_layer, conv1d)
        self.quantization_backend = backend
        d_in, d_out = base_layer.weight.shape if self.transposed else _get_in_out_features(base_layer)
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.name = name
        self.snell_A = nn.ParameterDict()
        self.snell_B = nn.ParameterDict()
        self.snell_coeffs = nn.ParameterDict()  # learnable piece coefficients
        self.snell_fixed_coeffs = BufferDict(persistent=False)  # fixed ones (not saved)
        self.snell_settings: dict[str, _Settings] = {}
        self.snell_row_part = BufferDict(persistent=False)
        # where the next thresholds are expected, per adapter (not state: never saved)
        self.threshold_hint: dict[str, ThresholdHint] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._block_rows: int | None = None  # set to override block_mb (tests)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config or SnellConfig(),
                          parts=num_slices if parts is None else parts)

    # adapters --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: SnellConfig, *, parts=1,
                     inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name`` (its factors initialised as in the paper's code)."""
        parts = row_parts(parts, self.out_features, name=f"module {self.name!r}")
        P, q = config.num_pieces, config.r // config.num_pieces
        weight = self.base_layer.weight
        device, dtype = weight.device, weight.dtype
        if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # the kernel and its threshold want fp32 (or fp64)
        factory = {"device": device, "dtype": dtype}
        A = nn.Parameter(torch.empty(P, self.in_features, q, **factory))
        B = nn.Parameter(torch.empty(P, self.out_features, q, **factory))
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.snell_A[adapter_name], self.snell_B[adapter_name] = A, B
        coeffs = torch.tensor(config.piece_coeffs, **factory)
        if config.learnable_coeffs:  # the paper
            self.snell_coeffs[adapter_name] = nn.Parameter(coeffs)
        else:  # fixed (the released code): part of the config, never trained nor saved
            self.snell_fixed_coeffs[adapter_name] = coeffs
        self.snell_settings[adapter_name] = _Settings(
            float(config.sparsity), config.sparsify_mode, float(config.dropout),
            float(config.drop_path), config.recompute,
            None if config.block_mb is None else float(config.block_mb), bool(config.compile),
            parts)
        if parts.count > 1:  # the part of each row, for the per-row threshold of a block
            self.snell_row_part[adapter_name] = parts.row_part(device)
        self.threshold_hint[adapter_name] = ThresholdHint()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _row_part(self, adapter: str) -> torch.Tensor | None:
        return self.snell_row_part[adapter] if adapter in self.snell_row_part else None

    def settings(self, adapter: str | None = None) -> _Settings:
        return self.snell_settings[adapter or self._first_adapter()]

    def _first_adapter(self) -> str:
        active = [a for a in self.active_adapters if a in self.snell_A]
        return active[0] if active else next(iter(self.snell_A))

    @property
    def parts(self) -> RowParts:
        """The row parts of the (first) active adapter."""
        return self.settings().parts

    @property
    def num_slices(self) -> int:
        """The number of row parts of the (first) active adapter."""
        return self.parts.count

    def block_rows_of(self, adapter: str) -> int:
        """Rows of delta_W built at once (from block_mb and the layer's current device)."""
        if self._block_rows is not None:
            return self._block_rows
        return _block_rows(self.snell_settings[adapter].block_mb, self.in_features,
                           self.snell_A[adapter].device)

    @property
    def block_rows(self) -> int:
        return self.block_rows_of(self._first_adapter())

    @block_rows.setter
    def block_rows(self, rows: int) -> None:
        self._block_rows = int(rows)

    # the update ------------------------------------------------------------------------
    def coeffs(self, adapter: str | None = None) -> torch.Tensor:
        """The piece coefficients of ``adapter`` (a parameter when learnable)."""
        adapter = adapter or self._first_adapter()
        if adapter in self.snell_coeffs:
            return self.snell_coeffs[adapter]
        return self.snell_fixed_coeffs[adapter]

    def _params(self, adapter: str):
        return self.snell_A[adapter], self.snell_B[adapter], self.coeffs(adapter)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The sparsified update delta_W_s of ``adapter``, (d_out x d_in), in nn.Linear's
        orientation, whole (for inspection; training and merging build it block by block)."""
        s = self.snell_settings[adapter]
        return sparsify(snell_kernel(*self._params(adapter), s.compile), s.sparsity, s.mode,
                        parts=s.parts)

    def delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        return self.get_delta_weight(adapter or self._first_adapter())

    def _weight_oi(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def _dense(self, x: torch.Tensor, A, B, coeffs, *, adapter: str, with_base: bool):
        s = self.snell_settings[adapter]
        delta = sparsify(snell_kernel(A, B, coeffs, s.compile), s.sparsity, s.mode,
                         parts=s.parts)
        if not with_base:
            return F.linear(x, delta.to(x.dtype))
        weight = self._weight_oi()
        return F.linear(x, weight + delta.to(weight.dtype), self.base_layer.bias)

    def _product(self, x: torch.Tensor, adapter: str, with_base: bool) -> torch.Tensor:
        """``x @ (W0 + delta_W_s)^T + b`` (with_base) or ``x @ delta_W_s^T``."""
        s = self.snell_settings[adapter]
        params = self._params(adapter)
        if s.recompute == "none" or (s.recompute == "checkpoint"
                                     and not torch.is_grad_enabled()):
            return self._dense(x, *params, adapter=adapter, with_base=with_base)
        if s.recompute == "checkpoint":
            return checkpoint(self._dense, x, *params, adapter=adapter, with_base=with_base,
                              use_reentrant=False)
        weight = self._weight_oi() if with_base else None
        bias = self.base_layer.bias if with_base else None
        return _SnellLinear.apply(x, weight, bias, *params, s.sparsity, s.mode, s.parts,
                                  self._row_part(adapter), self.block_rows_of(adapter),
                                  s.compile, self.threshold_hint[adapter])

    @torch.no_grad()
    def _delta_blocks(self, adapter: str | None = None):
        """``(first row, end row, rows of delta_W_s)`` block by block (no autograd)."""
        adapter = adapter or self._first_adapter()
        s = self.snell_settings[adapter]
        A, B, coeffs = (p.detach() for p in self._params(adapter))
        coeffs = coeffs.to(A.dtype)
        rows, row_part = self.block_rows_of(adapter), self._row_part(adapter)
        tau = snell_thresholds(A, B, coeffs, s.sparsity, s.parts, rows, compiled=s.compile,
                               hint=self.threshold_hint[adapter])
        pads = _padded_factors(A, B, s.compile)
        for o0, o1 in _row_blocks(self.out_features, rows):
            block_tau = _block_tau(tau, row_part, o0, o1) if s.sparsity > 0 else None
            if s.compile:
                yield o0, o1, _fused_rows(pads, coeffs, o0, o1, "delta", mode=s.mode,
                                          tau=block_tau, out_dtype=A.dtype)
                continue
            delta, _ = _sparsify_rows(_kernel_rows(pads, coeffs, o0, o1), block_tau, s.mode)
            yield o0, o1, delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.snell_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        first = self.snell_settings[active[0]]
        if (len(active) == 1 and self.quantization_backend is None
                and not (self.training and first.regularised)):
            # One matmul with W0 + delta_W_s: also what the merged layer computes.
            return self._product(x, active[0], with_base=True)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter in active:
            s = self.snell_settings[adapter]
            x_in = F.dropout(x, s.dropout, training=True) if self.training and s.dropout \
                else x
            update = self._product(x_in, adapter, with_base=False)
            result = result + _drop_path(update, s.drop_path, self.training).to(result.dtype)
        return result

    # merging ---------------------------------------------------------------------------
    def _add_delta(self, adapter: str, sign: float, *, safe_merge: bool = False) -> None:
        backend = self.quantization_backend
        if backend is not None and not backend.supports_merge:
            raise UpcycleError(f"module {self.name!r}: a {backend.backend_name} quantized "
                               f"{type(self.base_layer).__name__} cannot be merged into (peft "
                               f"cannot write its weight back); keep the adapter separate")
        if backend is None and not safe_merge:
            weight = self._weight_oi()
            for o0, o1, delta in self._delta_blocks(adapter):
                weight[o0:o1] += sign * delta.to(weight.dtype)
            return
        # a quantized weight is dequantized whole (as peft does), updated and written back
        weight = backend.get_base_weight(self.base_layer) if backend is not None \
            else self.base_layer.weight.detach().clone()
        view = weight.t() if self.transposed else weight
        for o0, o1, delta in self._delta_blocks(adapter):
            view[o0:o1] += sign * delta.to(weight.dtype)
        if not torch.isfinite(weight).all():
            raise UpcycleError(f"module {self.name!r}: merging adapter {adapter!r} gives "
                               f"non-finite weights (a broken adapter?); nothing was merged")
        if backend is not None:
            backend.set_base_weight(self, weight)
        else:
            self.base_layer.weight.data.copy_(weight)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W0 += delta_W_s of each adapter (default: the active ones), a block of rows at a
        time; ``safe_merge``: on a copy, checked for non-finite values first."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.snell_A:
                self._add_delta(adapter, 1.0, safe_merge=safe_merge)
                self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.snell_A:
                self._add_delta(adapter, -1.0)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False  # delta_W_s is sparse and generally full rank

    def extra_repr(self) -> str:
        adapters = []
        for adapter, s in self.snell_settings.items():
            A = self.snell_A[adapter]
            adapters.append(f"{adapter}: r={A.shape[0] * A.shape[2]}, sparsity={s.sparsity}, "
                            f"mode={s.mode}, parts={list(s.parts.sizes)}")
        backend = self.quantization_backend
        return (f"in={self.in_features}, out={self.out_features}, {'; '.join(adapters)}, "
                f"merged={self.merged}"
                + (f", quantization_backend={backend.backend_name!r}" if backend else ""))

    def __repr__(self) -> str:
        return "snell." + super().__repr__()


__all__ = ["ADAPTED", "SnellLayer", "adaptable_types", "check_adaptable", "quantization_backend"]
