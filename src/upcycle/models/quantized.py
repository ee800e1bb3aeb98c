"""Quantized linear layers of a frozen base: recognise them, dequantize them, refuse what a
tuner cannot do with them.

Recognised (without importing the libraries, as peft does, by class name):

- bitsandbytes ``Linear4bit`` (``Params4bit`` weight, nf4/fp4, nested statistics or not) and
  ``Linear8bitLt`` (``Int8Params`` weight, one scale per output row), as
  ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` builds them;
- torchao tensor subclasses inside an ``nn.Linear`` (``Int8Tensor``,
  ``IntxUnpackedToInt8Tensor``, ...), as ``torchao.quantization.quantize_`` leaves them;
  weight-only ones (no activation quantization) are supported where gradients flow;
- anything else that looks quantized (HQQ's ``W_q``, GPTQ/AWQ's ``qweight``, an integer
  weight, a class named like a quantized layer): :func:`describe` names it, the tuners refuse
  to train or backpropagate through it.

Dequantization goes through peft's ``dequantize_module_weight`` for a whole weight; a block
of output rows (:func:`dequantized_rows`) is dequantized from the matching slice of the
packed data and its scales, never from a full-precision copy of the layer: bitsandbytes
4-bit by its 64-value blocks (the absmax statistics, tiny, are dequantized whole), 8-bit by
its per-row scales, torchao by slicing the tensor subclass (its ``aten.slice`` keeps it
quantized). The libraries are imported only when a quantized weight is dequantized.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UpcycleError

BNB_4BIT = "bitsandbytes-4bit"
BNB_8BIT = "bitsandbytes-8bit"
TORCHAO = "torchao"
OTHER = "other"
"""The kinds :func:`quant_kind` returns (None: not quantized)."""

_BNB_4BIT_CLASSES = ("Linear4bit", "LinearFP4", "LinearNF4", "Params4bit")
_BNB_8BIT_CLASSES = ("Linear8bitLt", "Int8Params")
_QUANTIZED_NAME_HINTS = ("quant", "4bit", "8bit", "int4", "int8", "gptq", "awq", "hqq", "qlinear",
                         "fp8", "marlin", "exl2")
_QUANTIZED_ATTRIBUTES = ("qweight", "W_q", "qzeros", "weight_packed", "quant_state")


def _mro_names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _weight(module: nn.Module):
    return getattr(module, "weight", None)


def _torchao_weight(weight) -> bool:
    return isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao")


def _torchao_activation_quantized(weight) -> bool:
    """A torchao weight that also quantizes the activations (not weight-only)."""
    for name in ("act_quant_kwargs", "activation_quantization", "input_quant_func"):
        if getattr(weight, name, None) is not None:
            return True
    return "Activation" in type(weight).__name__ or "Float8" in type(weight).__name__


def quant_kind(module: nn.Module) -> str | None:
    """:data:`BNB_4BIT`, :data:`BNB_8BIT`, :data:`TORCHAO`, :data:`OTHER` (looks quantized,
    unknown to upcycle) or None (a floating-point layer, or no layer with a weight)."""
    names = _mro_names(module)
    weight = _weight(module)
    weight_names = _mro_names(weight) if weight is not None else set()
    if names & set(_BNB_4BIT_CLASSES) or "Params4bit" in weight_names:
        return BNB_4BIT
    if names & set(_BNB_8BIT_CLASSES) or "Int8Params" in weight_names:
        return BNB_8BIT
    if _torchao_weight(weight):
        return TORCHAO
    if any(hasattr(module, a) for a in _QUANTIZED_ATTRIBUTES):
        return OTHER
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point() \
            and not weight.is_complex():
        return OTHER
    lowered = type(module).__name__.lower()
    if weight is not None and any(h in lowered for h in _QUANTIZED_NAME_HINTS):
        return OTHER
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer (known or not)."""
    return quant_kind(module) is not None


def describe(module: nn.Module) -> str:
    """A short name of the layer type for error messages, e.g. 'bitsandbytes Linear4bit
    (nf4)', 'torchao Int8Tensor in nn.Linear', 'nn.Linear'."""
    kind = quant_kind(module)
    cls = type(module).__name__
    weight = _weight(module)
    if kind == BNB_4BIT:
        state = getattr(weight, "quant_state", None)
        qtype = getattr(state, "quant_type", None) or getattr(weight, "quant_type", None)
        return f"bitsandbytes {cls}" + (f" ({qtype})" if qtype else "")
    if kind == BNB_8BIT:
        return f"bitsandbytes {cls} (int8)"
    if kind == TORCHAO:
        extra = "" if not _torchao_activation_quantized(weight) else ", activations quantized too"
        return f"torchao {type(weight).__name__} in {_torch_name(module)}{extra}"
    if kind == OTHER:
        detail = [a for a in _QUANTIZED_ATTRIBUTES if hasattr(module, a)]
        if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            detail.append(f"weight dtype {weight.dtype}")
        where = type(module).__module__.split(".")[0]
        return f"{where} {cls} (quantized: {', '.join(detail) or 'by its name'})"
    return _torch_name(module)


def _torch_name(module: nn.Module) -> str:
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer, quantized or not (a bitsandbytes 4-bit
    weight's own shape is its packed storage)."""
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    weight = _weight(module)
    if weight is None or weight.ndim != 2:
        raise UpcycleError(f"{describe(module)}: not a linear layer with a 2-D weight")
    return tuple(weight.shape)  # type: ignore[return-value]


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the layer computes in: bitsandbytes 4-bit's ``compute_dtype`` (else
    the dtype it was quantized from), 8-bit's bias dtype (else float16, what its matmul
    casts to), torchao's original dtype (the subclass reports it), a plain layer's weight
    dtype."""
    kind = quant_kind(module)
    weight = _weight(module)
    bias = getattr(module, "bias", None)
    if kind == BNB_4BIT:
        found = getattr(module, "compute_dtype", None)
        if found is None:
            found = getattr(getattr(weight, "quant_state", None), "dtype", None)
        return found or (bias.dtype if bias is not None else torch.float32)
    if kind == BNB_8BIT:
        if weight is not None and weight.is_floating_point():
            return weight.dtype  # not quantized yet (has_fp16_weights)
        return bias.dtype if bias is not None else torch.float16
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    raise UpcycleError(f"{describe(module)}: cannot tell its compute dtype")


def _unsupported(module: nn.Module, what: str) -> UpcycleError:
    return UpcycleError(
        f"{describe(module)}: {what} is not supported (upcycle knows bitsandbytes Linear4bit "
        f"and Linear8bitLt and torchao weight-only tensors in nn.Linear)")


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole weight (out, in) in floating point (``dtype``, default
    :func:`compute_dtype`), detached; via peft's ``dequantize_module_weight``. A plain layer's
    weight is returned as is (cast only if ``dtype`` differs)."""
    dtype = dtype or compute_dtype(module)
    kind = quant_kind(module)
    if kind is None:
        return module.weight.detach().to(dtype)
    if kind == OTHER and not hasattr(module, "W_q"):  # peft knows HQQ too
        raise _unsupported(module, "dequantizing")
    # deferred: peft is an optional, heavy import only needed for a quantized base
    from peft.utils.integrations import dequantize_module_weight

    with torch.no_grad():
        weight = dequantize_module_weight(module)
    return weight.detach().to(dtype).reshape(weight_shape(module))


def dequantized_rows(module: nn.Module, r0: int, r1: int,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """Output rows ``r0:r1`` of the weight (r1 - r0, in) in floating point, detached, from
    the matching slice of the quantized data: the layer is never dequantized whole."""
    out_features, in_features = weight_shape(module)
    if not 0 <= r0 <= r1 <= out_features:
        raise UpcycleError(f"{describe(module)}: rows {r0}:{r1} out of range "
                           f"(0..{out_features})")
    dtype = dtype or compute_dtype(module)
    kind = quant_kind(module)
    weight = module.weight
    with torch.no_grad():
        if kind is None or (kind in (BNB_4BIT, BNB_8BIT) and weight.is_floating_point()):
            # a plain layer, or a bitsandbytes one not quantized yet (still on its fp weight)
            return weight.detach().reshape(out_features, in_features)[r0:r1].to(dtype)
        if kind == BNB_4BIT:
            return _bnb4_rows(weight, in_features, r0, r1).to(dtype)
        if kind == BNB_8BIT:
            return _bnb8_rows(module, r0, r1).to(dtype)
        if kind == TORCHAO:
            return weight[r0:r1].dequantize().to(dtype)
    raise _unsupported(module, "dequantizing rows of")


def _bnb4_absmax(state) -> torch.Tensor:
    """The per-block absmax of a 4-bit weight in float32 (nested statistics dequantized)."""
    if not state.nested:
        return state.absmax.float()
    # deferred: bitsandbytes is optional
    from bitsandbytes.functional import dequantize_blockwise

    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def _bnb4_rows(weight, in_features: int, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of a packed ``Params4bit``: the covering 64-value (``blocksize``) blocks of
    the flattened weight are dequantized with their absmax, then trimmed."""
    # deferred: bitsandbytes is optional
    import bitsandbytes.functional as bf

    state = weight.quant_state
    size = state.blocksize
    first, last = r0 * in_features, r1 * in_features  # flat element range
    if first == last:
        return torch.empty(0, in_features, dtype=state.dtype, device=weight.device)
    total = state.shape.numel()
    b0, b1 = first // size, -(-last // size)
    start, stop = b0 * size, min(b1 * size, total)
    packed = weight.data.reshape(-1)[start // 2: -(-stop // 2)].reshape(-1, 1)
    part = bf.QuantState(absmax=_bnb4_absmax(state)[b0:b1].contiguous(),
                         shape=torch.Size([stop - start]), code=state.code, blocksize=size,
                         quant_type=state.quant_type, dtype=state.dtype)
    flat = bf.dequantize_4bit(packed, part).reshape(-1)
    return flat[first - start: last - start].reshape(r1 - r0, in_features)


def _bnb8_rows(module: nn.Module, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of an ``Int8Params`` weight: int8 rows times their row scale / 127."""
    weight = module.weight
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = getattr(getattr(module, "state", None), "SCB", None)
    if scale is None:
        raise _unsupported(module, "an int8 weight without its row scales (SCB)")
    rows = weight.data[r0:r1].float()
    return rows * (scale[r0:r1].to(rows.device).float().view(-1, 1) / 127.0)


# -- whole models ------------------------------------------------------------------------------

def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of every quantized layer of ``model`` (outermost only)."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(n + ".") for n, _ in out):
            continue
        if is_quantized(module):
            out.append((name, module))
    return out


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point (unquantized) parameters, which is the dtype of
    its hidden states, and so of the trainable parts a tuner adds (quantized layers return
    their input's dtype)."""
    quantized = {id(p) for _, m in quantized_layers(model) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in quantized and p.is_floating_point():
            return p.dtype
    return torch.float32


def check_quantized_base(method: str, model: nn.Module, *, trained: Iterable[str] = (),
                         grad_through: Iterable[str] = ()) -> None:
    """Refuse, before any training, what ``method`` cannot do on a quantized base: train a
    quantized layer (``trained``: dotted names of the modules whose parameters it trains), or
    backpropagate to the input of a quantized layer of a type upcycle does not know
    (``grad_through``: the frozen modules gradients flow through). Known types pass:
    bitsandbytes 4-/8-bit, torchao weight-only. The error names the module and its type."""
    modules = dict(model.named_modules())
    trained = list(trained)
    for root in trained:
        for name, sub in quantized_layers(modules[root]):
            full = f"{root}.{name}" if name else root
            raise UpcycleError(
                f"{method} trains module {full!r}, a {describe(sub)}: a quantized layer cannot "
                f"be trained. Keep the trained modules in floating point when quantizing: "
                f"BitsAndBytesConfig(..., llm_int8_skip_modules={trained!r}), or torchao "
                f"quantize_(..., filter_fn=...) leaving them out")
    for root in grad_through:
        for name, sub in quantized_layers(modules[root]):
            kind = quant_kind(sub)
            if kind in (BNB_4BIT, BNB_8BIT) or (
                    kind == TORCHAO and not _torchao_activation_quantized(sub.weight)):
                continue
            full = f"{root}.{name}" if name else root
            raise UpcycleError(
                f"{method} backpropagates through module {full!r}, a {describe(sub)}, which "
                f"upcycle does not support (supported quantized layers: bitsandbytes Linear4bit "
                f"and Linear8bitLt, torchao weight-only tensors in nn.Linear)")


__all__ = [
    "BNB_4BIT", "BNB_8BIT", "OTHER", "TORCHAO", "check_quantized_base", "compute_dtype",
    "dequantized_rows", "dequantized_weight", "describe", "float_dtype", "is_quantized",
    "quant_kind", "quantized_layers", "weight_shape",
]
