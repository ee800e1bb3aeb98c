"""Matching a model to its family in the map (:mod:`upcycle.models.families`): by
``config.model_type``, else by an exact tensor layout (:func:`architecture_of`); then its sizes
(:func:`sizes_of`, :func:`eps_of`), the row layouts of its fused projections
(:class:`FusedLayout`) and SNELL's default targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UpcycleError
from .families import ARCHITECTURES, Architecture, supported


def module_at(root: nn.Module, path: str | None):
    """The submodule (or attribute) at dotted ``path`` below ``root`` ("" is ``root``; None:
    None)."""
    if path is None:
        return None
    obj = root
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


# -- finding a model's family ------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    arch: Architecture
    prefix: str
    """Where the base model sits in the state dict ('' for BertModel, 'bert.', 'model.')."""
    by_structure: bool = False
    """True when model_type was unknown and the tensor layout decided."""


def _model_type(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def base_prefix(keys, arch: Architecture) -> str | None:
    hits = [k[: -len(arch.anchor)] for k in keys if k.endswith(arch.anchor)]
    hits = [h for h in hits if h == "" or h.endswith(".")]
    return min(hits, key=len) if hits else None


def _layer_tensors(keys, prefix: str, arch: Architecture, index: int = 0) -> set[str]:
    start = f"{prefix}{arch.layers}.{index}."
    return {k[len(start):] for k in keys if k.startswith(start)}


def _structure_fits(model: nn.Module, arch: Architecture) -> str | None:
    """The base prefix when ``model``'s tensors are exactly ``arch``'s layout, else None."""
    keys = list(model.state_dict().keys())
    prefix = base_prefix(keys, arch)
    if prefix is None:
        return None
    config = model.config
    for key in (arch.dims.hidden, arch.dims.layers, arch.dims.heads, arch.dims.intermediate):
        if getattr(config, key, None) is None:
            return None
    found = _layer_tensors(keys, prefix, arch)
    expected_weights = {m + ".weight" for m in (*arch.layer_modules(), *arch.layer_norms())}
    if not expected_weights <= found:
        return None
    allowed = expected_weights | {m + ".bias" for m in (*arch.layer_modules(),
                                                        *arch.layer_norms())}
    if found - allowed:
        return None  # extra tensors (q_norm, k_norm, ...): not this layout
    if arch.final_norm and prefix + arch.final_norm + ".weight" not in keys:
        return None
    # the norm must compute the family's formula (Gemma's (1 + w) RMSNorm is not Llama's)
    norm = module_at(module_at(model, prefix + arch.layers)[0], arch.attn_norm)
    if not _norm_matches(norm, arch.norm):
        return None
    return prefix


@torch.no_grad()
def _norm_matches(norm: nn.Module, kind: str) -> bool:
    weight = getattr(norm, "weight", None)
    if weight is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, weight.shape[0], generator=gen).to(weight.dtype).to(weight.device) * 3 + 1
    try:
        y = norm(x).double()
    except Exception:  # noqa: BLE001 - a module we cannot call is not a match
        return False
    xd, w = x.double(), weight.double()
    eps = 1e-5
    if kind == "rmsnorm":
        ref = w * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    else:
        bias = getattr(norm, "bias", None)
        ref = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False,
                                                                 keepdim=True) + eps) * w
        ref = ref + (bias.double() if bias is not None else 0)
    return bool(((y - ref).abs().max() <= 1e-2 * max(1.0, ref.abs().max().item())).item())


def architecture_of(model: nn.Module, *, method: str = "upcycle") -> Match:
    """The family of a HuggingFace model: by ``config.model_type``, else (for an unknown type)
    by a tensor layout exactly that of a ``clone_match`` family; otherwise an UpcycleError
    naming the supported families."""
    model_type = _model_type(model)
    keys = list(model.state_dict().keys()) if isinstance(model, nn.Module) else []
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            prefix = base_prefix(keys, arch)
            if prefix is None:
                raise UpcycleError(f"model: a {arch.title} model ({model_type}) without the "
                                   f"tensor {arch.anchor!r}; is it really {arch.title}?")
            return Match(arch, prefix)
    if model_type is not None and isinstance(model, nn.Module):
        for arch in ARCHITECTURES.values():
            if arch.clone_match:
                prefix = _structure_fits(model, arch)
                if prefix is not None:
                    return Match(arch, prefix, by_structure=True)
    raise UpcycleError(
        f"model: unsupported family {model_type or type(model).__name__!r}; {method} supports "
        f"{supported()}, and models whose tensors are laid out exactly like "
        f"{', '.join(a.title for a in ARCHITECTURES.values() if a.clone_match)}. To add a "
        f"family, describe it in upcycle.models.families (one Architecture entry)")


# -- dimensions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int


def sizes_of(config, arch: Architecture) -> Sizes:
    d = arch.dims
    hidden = int(getattr(config, d.hidden))
    heads = int(getattr(config, d.heads))
    kv = getattr(config, d.kv_heads, None) if d.kv_heads else None
    inter = getattr(config, d.intermediate, None)
    if inter is None:  # GPT-2: n_inner None means 4 x n_embd
        inter = 4 * hidden
    head_dim = getattr(config, d.head_dim, None) if d.head_dim else None
    return Sizes(hidden=hidden, layers=int(getattr(config, d.layers)), heads=heads,
                 kv_heads=heads if kv is None else int(kv), intermediate=int(inter),
                 head_dim=int(head_dim) if head_dim else hidden // heads)


def eps_of(config, arch: Architecture) -> float | None:
    return float(getattr(config, arch.dims.eps)) if arch.dims.eps else None


# -- fused projections ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedLayout:
    """Which output rows (nn.Linear orientation) of a fused projection belong to each part."""

    module: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    layout: str
    block: int = 0
    """interleaved: rows per head and part (head_dim)."""

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    def indices(self) -> list[torch.Tensor]:
        """One LongTensor of output-row indices per part, in ``parts`` order."""
        if self.layout == "stacked":
            out, start = [], 0
            for size in self.sizes:
                out.append(torch.arange(start, start + size))
                start += size
            return out
        n = len(self.parts)
        heads = self.sizes[0] // self.block
        grid = torch.arange(self.rows).view(heads, n, self.block)
        return [grid[:, i].reshape(-1) for i in range(n)]

    def split(self, t: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
        if t.shape[dim] != self.rows:
            raise UpcycleError(f"tensor {self.module!r}: {t.shape[dim]} output rows, expected "
                               f"{' + '.join(map(str, self.sizes))} = {self.rows} for its parts "
                               f"{'/'.join(self.parts)} ({self.layout})")
        return [t.index_select(dim, idx.to(t.device)) for idx in self.indices()]

    def join(self, parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        if self.layout == "stacked":
            return torch.cat(parts, dim=dim)
        heads = parts[0].shape[dim] // self.block
        moved = [p.movedim(dim, 0).reshape(heads, self.block, *p.movedim(dim, 0).shape[1:])
                 for p in parts]
        joined = torch.stack(moved, dim=1).reshape(-1, *moved[0].shape[2:])
        return joined.movedim(0, dim)


def fused_layouts(arch: Architecture, sizes: Sizes) -> dict[str, FusedLayout]:
    """Layer-relative module path -> its :class:`FusedLayout`, for the fused projections of
    ``arch`` at these sizes (``sizes_of(model.config, arch)``)."""
    out = {}
    hd = sizes.head_dim
    if arch.attention.qkv:
        f = arch.attention.qkv
        out[f.module] = FusedLayout(f.module, f.parts, (sizes.heads * hd, sizes.kv_heads * hd,
                                                        sizes.kv_heads * hd), f.layout, hd)
    if arch.mlp.fused:
        f = arch.mlp.fused
        out[f.module] = FusedLayout(f.module, f.parts, (sizes.intermediate,) * len(f.parts),
                                    f.layout, 0)
    return out


# -- what SNELL reads --------------------------------------------------------------------------


def snell_target_modules(arch: Architecture) -> list[str]:
    """SNELL's default targets: q, k, v (or the fused qkv), the attention output and the MLP
    matrices of every layer, as layer-relative paths (they match a module whose dotted name
    ends with them)."""
    return list(arch.layer_modules())


def model_fused_layouts(model: nn.Module) -> dict[str, FusedLayout]:
    """Full module name -> :class:`FusedLayout` for every fused projection of ``model``."""
    match = architecture_of(model)
    layouts = fused_layouts(match.arch, sizes_of(model.config, match.arch))
    out = {}
    for name, _ in model.named_modules():
        for rel, layout in layouts.items():
            if name.endswith("." + rel):
                out[name] = layout
    return out



__all__ = [
    "FusedLayout", "Match", "Sizes", "architecture_of", "base_prefix", "eps_of",
    "fused_layouts", "model_fused_layouts", "module_at", "sizes_of", "snell_target_modules",
]
