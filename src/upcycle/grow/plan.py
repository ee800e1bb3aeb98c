"""The plan of a growth (specs/lemon.md): the target dimensions checked against the model's
family, and where each target layer comes from. :func:`upcycle.grow.lemon.expand` carries it
out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ..errors import UpcycleError
from ..models.matching import architecture_of, sizes_of

METHODS = ("lemon", "net2net", "aki", "stack")
"""LEMON and its baselines (:mod:`upcycle.grow.baselines`)."""
DEPTH_ONLY = ("stack",)
"""Methods that grow depth only (the width is the source's)."""


@dataclass
class GrowthPlan:
    """Source and target dimensions of one expansion, and where each target layer comes from."""
    family: str
    hidden: tuple[int, int]
    layers: tuple[int, int]
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    head_dim: int
    layer_map: list[tuple[int, str]] = field(default_factory=list)
    """Per target layer: (source layer, "orig" | "new" (identity block) | "stack" (copy))."""
    by_structure: bool = False
    """The family was recognised by its tensor layout, not its model_type."""
    @property
    def k(self) -> int:
        return self.hidden[1] // self.hidden[0]

    @property
    def r(self) -> int:
        return self.hidden[1] % self.hidden[0]

    @property
    def eta(self) -> float:
        return math.sqrt(self.k * self.hidden[0] / self.hidden[1])

    def describe(self) -> str:
        h, l, a, f = self.hidden, self.layers, self.heads, self.intermediate
        like = " (matched by structure)" if self.by_structure else ""
        return (f"{self.family}{like}: hidden {h[0]}->{h[1]} (k={self.k}, r={self.r}), layers "
                f"{l[0]}->{l[1]}, heads {a[0]}->{a[1]} (head_dim {self.head_dim}), "
                f"intermediate {f[0]}->{f[1]}")


def _nearest(value: int, step: int, floor: int) -> str:
    """The valid values (multiples of ``step``, at least ``floor``) nearest to ``value``."""
    below = max(floor, value // step * step)
    above = max(floor, -(-value // step) * step)
    return str(below) if below == above else f"{below} or {above}"


def plan_expansion(model: nn.Module, *, hidden_size: int | None = None,
                   num_layers: int | None = None, num_heads: int | None = None,
                   intermediate_size: int | None = None, method: str = "lemon") -> GrowthPlan:
    """Check the target dimensions against the model and return the plan (or UpcycleError,
    naming the nearest valid value when a width breaks one of the family's constraints)."""
    if method not in METHODS:
        raise UpcycleError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    match = architecture_of(model, method="LEMON")
    arch = match.arch
    config = model.config
    s = sizes_of(config, arch)
    d, L, h, kv, f, hd = s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, s.head_dim
    if hd * h != d:
        raise UpcycleError(f"model: head_dim {hd} x {h} heads != hidden size {d}; LEMON keeps "
                           f"head_dim fixed and needs hidden = heads x head_dim")
    if arch.name == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UpcycleError("model: GPT-2 with scale_attn_by_inverse_layer_idx=True scales each "
                           "layer by its index, which depth expansion changes; not supported")
    if h % kv:
        raise UpcycleError(f"model: {h} query heads are not a multiple of {kv} key/value heads")
    g = h // kv
    if arch.attention.qkv and arch.attention.qkv.layout == "interleaved" and g != 1:
        raise UpcycleError(f"model: {arch.title}'s interleaved query_key_value needs as many "
                           f"key/value heads as query heads, got {kv} and {h}")

    D = d if hidden_size is None else int(hidden_size)
    for arg, value, source in (("hidden_size", D, d), ("num_layers", num_layers, L),
                               ("num_heads", num_heads, h),
                               ("intermediate_size", intermediate_size, f)):
        if value is not None and int(value) < source:
            raise UpcycleError(f"{arg}: target {value} is smaller than the source's {source}; "
                               f"LEMON only grows models")
    if method in DEPTH_ONLY:
        changed = [f"{arg} {new} (the source's {old})" for arg, new, old in (
            ("hidden_size", D, d), ("num_heads", num_heads, h),
            ("intermediate_size", intermediate_size, f)) if new is not None and new != old]
        if changed:
            raise UpcycleError(f"{changed[0].split()[0]}: method {method!r} grows depth only "
                               f"(it repeats the trained layers, width unchanged); got "
                               f"{'; '.join(changed)}: drop the width arguments or grow the "
                               f"width with lemon first")
    step = d if arch.post_ln else g * hd  # the widths every constraint allows
    if D % hd:
        raise UpcycleError(f"hidden_size: {D} is not a multiple of head_dim {hd} (head_dim is "
                           f"kept fixed, so hidden_size must be num_heads x {hd}); nearest valid "
                           f"hidden_size: {_nearest(D, step, d)}")
    H = D // hd if num_heads is None else int(num_heads)
    if H * hd != D:
        raise UpcycleError(f"num_heads: {H} heads x head_dim {hd} = {H * hd}, but hidden_size is "
                           f"{D}; pass num_heads={D // hd} (head_dim is kept fixed)")
    if H % g:
        raise UpcycleError(f"num_heads: {H} is not a multiple of the query-group size {g} "
                           f"({h} query heads share {kv} key/value heads); nearest valid "
                           f"num_heads: {_nearest(H, g, h)} (hidden_size "
                           f"{_nearest(D, g * hd, d)})")
    KV = H // g
    F = int(intermediate_size) if intermediate_size is not None else (
        f if D == d else round(f * D / d))
    L2 = L if num_layers is None else int(num_layers)
    if method in DEPTH_ONLY:
        # G_stack (Du et al. 2024): the whole stack of trained layers, repeated in order
        return GrowthPlan(family=arch.name, hidden=(d, d), layers=(L, L2), heads=(h, h),
                          kv_heads=(kv, kv), intermediate=(f, f), head_dim=hd,
                          layer_map=[(i % L, "stack") for i in range(L2)],
                          by_structure=match.by_structure)
    if L2 > 2 * L:
        raise UpcycleError(f"num_layers: {L2} is more than twice the source's {L} layers; LEMON "
                           f"grows depth at most 2x per expansion: expand to {2 * L} first, then "
                           f"call expand again (stages)")
    if arch.post_ln and D % d:
        raise UpcycleError(f"hidden_size: {D} is not a multiple of {d}; post-LN models "
                           f"({arch.title}) expand losslessly only to multiples of the hidden "
                           f"size (nearest valid: {_nearest(D, d, d)})")
    if arch.dims.eps is None and D % d:
        raise UpcycleError(f"hidden_size: {D} is not a multiple of {d}; {arch.title} hard-codes "
                           f"its norms' epsilon, so only multiples keep it exact (nearest "
                           f"valid: {_nearest(D, d, d)})")
    n_new = L2 - L
    if method == "aki":
        layer_map = [(i, "orig") for i in range(L)] + [(i, "stack") for i in range(n_new)]
    else:
        layer_map = [(i, "orig") for i in range(L - n_new)]
        for i in range(L - n_new, L):
            layer_map += [(i, "orig"), (i, "new")]
    return GrowthPlan(family=arch.name, hidden=(d, D), layers=(L, L2), heads=(h, H),
                      kv_heads=(kv, KV), intermediate=(f, F), head_dim=hd, layer_map=layer_map,
                      by_structure=match.by_structure)

