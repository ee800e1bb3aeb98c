"""LEMON: lossless model expansion (Wang et al., ICLR 2024), as specified in specs/lemon.md.

:func:`expand` turns a trained HF Transformer of any family in :mod:`upcycle.models.architectures`
(BERT/MiniLM, RoBERTa, DistilBERT, ViT, GPT-2, Llama, Mistral, Qwen2, Phi-3, GPT-NeoX, and
Llama-shaped clones), with its task head, into a wider and/or deeper model of the same
family that computes the same function in eval mode:

- width d -> D (k = D // d copies, r = D % d residue channels, eta = sqrt(k d / D)): the
  residual stream is carried as k copies plus r residue channels (their mean for LayerNorm
  models, zeros for RMSNorm models); norms get gamma* = eta [gamma.., xi], beta* = [beta.., 0],
  eps* = eta^2 eps; tensors that read a norm get column splits that sum to the original;
  heads and MLP neurons are copied and their output columns split across the copies;
- depth L -> L' (L <= L' <= 2L): each of the last L' - L source layers is followed by a new
  block whose output projections get cancelling splits (copies sum to zero), so the block
  is an identity with nonzero weights.

Every split is symmetry-breaking: copy m of unit u gets ``R_m - (sum_m' R_m' - W_u) / c_u``
with R fresh noise (std ``initializer_range``, x0.1 for BERT), seeded by ``seed``. The
same machinery, with equal splits, gives the Net2Net and bert2BERT-AKI baselines
(:mod:`upcycle.grow.baselines`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UpcycleError
from ..models.architectures import (
    Architecture,
    FusedLayout,
    Match,
    architecture_of,
    base_model,
    eps_of,
    fused_layouts,
    sizes_of,
)
from ..training.config import TrainingConfig

METHODS = ("lemon", "net2net", "aki")

POST_LN_DEPTH_NOTE = (
    "post-LN depth: the new block's attention LayerNorm and the preceding layer's output "
    "LayerNorm pass the normalised stream through (gamma=1, beta=0) and the new block's "
    "output LayerNorm takes over the preceding layer's gamma/beta; the only error is the "
    "re-normalisation of an already normalised vector, a relative term of about "
    "eps/Var <= ~1e-12 for BERT's eps=1e-12"
)


# -- the plan -------------------------------------------------------------------------------

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


# -- splitting ------------------------------------------------------------------------------

class _Splitter:
    """The expansion rules, written once. ``symmetric`` gives equal splits (Net2Net)."""
    def __init__(self, plan: GrowthPlan, arch: Architecture, *, symmetric: bool, std: float,
                 generator: torch.Generator, dtype: torch.dtype = torch.float64):
        self.plan, self.arch = plan, arch
        self.dtype = dtype
        self.symmetric = symmetric
        self.std = std
        self.gen = generator
        self.d, self.D = plan.hidden
        self.k, self.r = plan.k, plan.r
        self.zero_residue = arch.norm == "rmsnorm"  # V_zero for RMSNorm, V_avg for LayerNorm

    def noise(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=self.dtype) * self.std

    def stream(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """A tensor that writes to the residual stream: k copies along ``axis`` + residue."""
        axis = axis % t.ndim
        parts = [t] * self.k
        if self.r:
            if self.zero_residue:
                fill = torch.zeros_like(t.narrow(axis, 0, 1))
            else:
                fill = t.mean(dim=axis, keepdim=True)
            shape = list(t.shape)
            shape[axis] = self.r
            parts.append(fill.expand(*shape))
        return torch.cat(parts, dim=axis)

    def norm(self, gamma: torch.Tensor, beta: torch.Tensor | None, scale: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        eta = self.plan.eta
        parts = [gamma] * self.k
        if self.r:
            xi = (torch.rand(self.r, generator=self.gen, dtype=self.dtype) * 2 - 1
                  if not self.symmetric else torch.ones(self.r, dtype=self.dtype))
            parts.append(xi)
        new_gamma = eta * torch.cat(parts) * scale
        new_beta = None
        if beta is not None:
            new_beta = torch.cat([beta] * self.k + [torch.zeros(self.r, dtype=beta.dtype)]) * scale
        return new_gamma, new_beta

    def split_in(self, w: torch.Tensor) -> torch.Tensor:
        """A matrix (out, d) that reads a norm -> (out, D); each original column's k copies
        sum to it, the residue columns read zeros and are arbitrary."""
        out = w.shape[0]
        kd = self.k * self.d
        if self.symmetric:
            body = (w / self.k).repeat(1, self.k)
            residue = torch.zeros(out, self.r, dtype=w.dtype)
        else:
            noise = self.noise(out, self.k, self.d)
            body = (noise - (noise.sum(1, keepdim=True) - w[:, None, :]) / self.k).reshape(out, kd)
            residue = self.noise(out, self.r)
        return torch.cat([body, residue], dim=1)

    @staticmethod
    def unit_rows(t: torch.Tensor, umap: torch.Tensor, block: int,
                  t_next: torch.Tensor | None = None, from_next: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Rows of units (heads: block = head_dim; neurons: 1): new unit j copies ``umap[j]``
        (from ``t_next`` where ``from_next[j]``: bert2BERT AKI)."""
        units = t.reshape(-1, block, *t.shape[1:])
        rows = units[umap]
        if from_next is not None:
            rows_next = t_next.reshape(-1, block, *t.shape[1:])[umap]
            mask = from_next.view(-1, *([1] * (rows.ndim - 1)))
            rows = torch.where(mask, rows_next, rows)
        return rows.reshape(-1, *t.shape[1:])

    def split_units(self, w: torch.Tensor, umap: torch.Tensor, n_src: int, block: int, *,
                    cancel: bool = False, w_next: torch.Tensor | None = None,
                    from_next: torch.Tensor | None = None) -> torch.Tensor:
        """Columns of a matrix (out, n_src*block) reading units -> (out, N*block): the copies
        of unit u sum to its column block (``cancel``: sum to zero)."""
        out = w.shape[0]
        n_new = umap.numel()
        counts = torch.bincount(umap, minlength=n_src).to(w.dtype)
        src = w.reshape(out, n_src, block)
        target = torch.zeros_like(src) if cancel else src
        tgt_copy = target[:, umap]  # (out, N, block): each copy's unit target
        if from_next is not None:
            nxt = w_next.reshape(out, n_src, block)[:, umap]
            tgt_copy = torch.where(from_next.view(1, -1, 1), nxt, tgt_copy)
        c = counts[umap].view(1, n_new, 1)
        if self.symmetric:
            cols = tgt_copy / c
        else:
            noise = self.noise(out, n_new, block)
            sums = torch.zeros(out, n_src, block, dtype=w.dtype).index_add_(1, umap, noise)
            cols = noise - (sums[:, umap] - tgt_copy) / c
        return cols.reshape(out, n_new * block)


# -- reading and writing a family's layers ---------------------------------------------------

def _get_linear(state, name, conv1d):
    w = state[name + ".weight"]
    return (w.t() if conv1d else w), state.get(name + ".bias")


def _put_linear(out, name, w, b, conv1d):
    out[name + ".weight"] = w.t().contiguous() if conv1d else w
    if b is not None:
        out[name + ".bias"] = b


def _suffixes(module: str) -> set[str]:
    return {module + ".weight", module + ".bias"}


def _read_layer(state, arch: Architecture, prefix: str, layouts: dict[str, FusedLayout],
                consumed: set) -> dict:
    """One layer's tensors in canonical form (nn.Linear orientation): q/k/v (+ ".b"), o,
    "up" = [(w, b) per MLP input: fc1, or gate and up], down, and the norms "an"/"mn"."""
    P: dict = {}
    att, mlp, conv = arch.attention, arch.mlp, arch.conv1d
    if att.qkv:
        name = prefix + att.qkv.module
        w, b = _get_linear(state, name, conv)
        layout = layouts[att.qkv.module]
        ws = layout.split(w)
        bs = layout.split(b) if b is not None else [None] * 3
        for part, wp, bp in zip(layout.parts, ws, bs):
            P[part], P[part + ".b"] = wp, bp
        consumed.update(_suffixes(name))
    else:
        for part in ("q", "k", "v"):
            name = prefix + getattr(att, part)
            P[part], P[part + ".b"] = _get_linear(state, name, conv)
            consumed.update(_suffixes(name))
    P["o"], P["o.b"] = _get_linear(state, prefix + att.o, conv)
    if mlp.fused:
        w, b = _get_linear(state, prefix + mlp.fused.module, conv)
        layout = layouts[mlp.fused.module]
        ws = layout.split(w)
        bs = layout.split(b) if b is not None else [None] * len(ws)
        P["up"] = list(zip(ws, bs))
    else:
        P["up"] = [_get_linear(state, prefix + m, conv) for m in mlp.inputs]
    P["down"], P["down.b"] = _get_linear(state, prefix + mlp.down, conv)
    for m in arch.layer_modules():
        consumed.update(_suffixes(prefix + m))
    for key, mod in (("an", arch.attn_norm), ("mn", arch.mlp_norm)):
        P[key] = (state[prefix + mod + ".weight"], state.get(prefix + mod + ".bias"))
        consumed.update(_suffixes(prefix + mod))
    return P


def _write_layer(out: dict, G: dict, arch: Architecture, prefix: str,
                 layouts: dict[str, FusedLayout]) -> None:
    att, mlp, conv = arch.attention, arch.mlp, arch.conv1d
    if att.qkv:
        layout = layouts[att.qkv.module]
        w = layout.join([G[p] for p in layout.parts])
        b = layout.join([G[p + ".b"] for p in layout.parts]) if G["q.b"] is not None else None
        _put_linear(out, prefix + att.qkv.module, w, b, conv)
    else:
        for part in ("q", "k", "v"):
            _put_linear(out, prefix + getattr(att, part), G[part], G[part + ".b"], conv)
    _put_linear(out, prefix + att.o, G["o"], G["o.b"], conv)
    if mlp.fused:
        layout = layouts[mlp.fused.module]
        w = layout.join([w for w, _ in G["up"]])
        b = layout.join([b for _, b in G["up"]]) if G["up"][0][1] is not None else None
        _put_linear(out, prefix + mlp.fused.module, w, b, conv)
    else:
        for m, (w, b) in zip(mlp.inputs, G["up"]):
            _put_linear(out, prefix + m, w, b, conv)
    _put_linear(out, prefix + mlp.down, G["down"], G["down.b"], conv)
    for key, mod in (("an", arch.attn_norm), ("mn", arch.mlp_norm)):
        gamma, beta = G[key]
        out[prefix + mod + ".weight"] = gamma
        if beta is not None:
            out[prefix + mod + ".bias"] = beta


# -- unit maps ------------------------------------------------------------------------------

def _regular_maps(plan: GrowthPlan) -> dict[str, torch.Tensor]:
    (h, H), (kv, KV), (f, F) = plan.heads, plan.kv_heads, plan.intermediate
    return {"q": torch.arange(H) % h, "kv": torch.arange(KV) % kv, "f": torch.arange(F) % f}


def _new_block_maps(plan: GrowthPlan) -> dict[str, torch.Tensor] | None:
    """Unit maps for an identity block: every unit used has >= 2 copies, so cancelling
    splits (copies sum to zero) leave nonzero weights. None when that is impossible (1 head)."""
    (h, H), (kv, KV), (f, F) = plan.heads, plan.kv_heads, plan.intermediate
    g = h // kv
    m_kv = min(kv, KV // 2)
    if m_kv >= 1:
        kvmap = torch.arange(KV) % m_kv
        qmap = kvmap[torch.arange(H) // g] * g + torch.arange(H) % g
    elif H >= 2:  # a single key/value head shared by all queries: pair the query heads
        kvmap = torch.zeros(KV, dtype=torch.long)
        qmap = torch.arange(H) % min(h, H // 2)
    else:
        return None
    if F < 2:
        return None
    return {"q": qmap, "kv": kvmap, "f": torch.arange(F) % min(f, F // 2)}


def _grow_layer(P: dict, sp: _Splitter, maps: dict, *, identity: bool,
                P_next: dict | None = None, aki: bool = False) -> dict:
    plan = sp.plan
    hd = plan.head_dim
    (h, H), (kv, KV), (f, F) = plan.heads, plan.kv_heads, plan.intermediate
    nxt = P_next if aki else None
    q_next = (torch.arange(H) >= h) if aki else None
    kv_next = (torch.arange(KV) >= kv) if aki else None
    f_next = (torch.arange(F) >= f) if aki else None
    G: dict = {}
    for name, umap, mask in (("q", maps["q"], q_next), ("k", maps["kv"], kv_next),
                             ("v", maps["kv"], kv_next)):
        rows = sp.unit_rows(P[name], umap, hd, nxt[name] if aki else None, mask)
        G[name] = sp.split_in(rows)
        b = P[name + ".b"]
        G[name + ".b"] = None if b is None else sp.unit_rows(
            b, umap, hd, nxt[name + ".b"] if aki else None, mask)
    o_rows = sp.stream(P["o"], 0)
    o_next = sp.stream(nxt["o"], 0) if aki else None
    G["o"] = sp.split_units(o_rows, maps["q"], h, hd, cancel=identity, w_next=o_next,
                            from_next=q_next)
    if P["o.b"] is not None:
        G["o.b"] = torch.zeros(plan.hidden[1], dtype=P["o.b"].dtype) if identity else \
            sp.stream(P["o.b"], 0)
    else:
        G["o.b"] = None
    G["up"] = []
    for i, (w, b) in enumerate(P["up"]):
        wn, bn = nxt["up"][i] if aki else (None, None)
        rows = sp.unit_rows(w, maps["f"], 1, wn, f_next)
        G["up"].append((sp.split_in(rows),
                        None if b is None else sp.unit_rows(b, maps["f"], 1, bn, f_next)))
    d_rows = sp.stream(P["down"], 0)
    d_next = sp.stream(nxt["down"], 0) if aki else None
    G["down"] = sp.split_units(d_rows, maps["f"], f, 1, cancel=identity, w_next=d_next,
                               from_next=f_next)
    if P["down.b"] is not None:
        G["down.b"] = torch.zeros(plan.hidden[1], dtype=P["down.b"].dtype) if identity else \
            sp.stream(P["down.b"], 0)
    else:
        G["down.b"] = None
    for key in ("an", "mn"):
        G[key] = sp.norm(*P[key])
    return G


# -- the public API -------------------------------------------------------------------------

def _tied_reader(model: nn.Module) -> str | None:
    """The module name of the output embedding when it shares the input embedding's weight."""
    try:
        out_emb = model.get_output_embeddings()
        in_emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return None
    return next((name for name, m in model.named_modules() if m is out_emb), None)


def _new_model(model: nn.Module, config, seed: int, match: Match) -> nn.Module:
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        import contextlib

        no_init_weights = contextlib.nullcontext
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with no_init_weights():
            new = type(model)(config)
    # modules the source was built without (a BertModel without pooler) are left out too
    src_base, new_base = base_model(model, match), base_model(new, match)
    for name in match.arch.optional:
        if getattr(src_base, name, None) is None and getattr(new_base, name, None) is not None:
            setattr(new_base, name, None)
    return new


def _grown_config(config, arch: Architecture, plan: GrowthPlan):
    dims = arch.dims
    new = copy.deepcopy(config)
    setattr(new, dims.hidden, plan.hidden[1])
    setattr(new, dims.layers, plan.layers[1])
    setattr(new, dims.heads, plan.heads[1])
    if dims.kv_heads:
        setattr(new, dims.kv_heads, plan.kv_heads[1])
    setattr(new, dims.intermediate, plan.intermediate[1])
    if dims.head_dim:
        setattr(new, dims.head_dim, plan.head_dim)
    eps = eps_of(config, arch)
    if eps is not None:
        setattr(new, dims.eps, eps * plan.eta ** 2)
    for key in dims.per_layer:
        value = getattr(config, key, None)
        if value is None:
            continue
        if len(value) != plan.layers[0]:
            raise UpcycleError(f"model: config.{key} has {len(value)} entries, expected one per "
                               f"layer ({plan.layers[0]})")
        setattr(new, key, [value[src] for src, _ in plan.layer_map])
    return new


def expand(model: nn.Module, *, hidden_size: int | None = None, num_layers: int | None = None,
           num_heads: int | None = None, intermediate_size: int | None = None, seed: int = 0,
           noise_std: float | None = None, method: str = "lemon") -> nn.Module:
    """Return a wider and/or deeper model of the same family computing the same function.

    ``hidden_size``/``num_layers``/``num_heads``/``intermediate_size`` default to the
    source's (heads default to hidden_size / head_dim; the MLP width scales with the hidden
    size). ``seed`` makes the symmetry-breaking noise reproducible; ``noise_std`` overrides
    its scale (default ``initializer_range``, x0.1 for BERT). ``method`` "net2net" / "aki"
    give the baselines (see :mod:`upcycle.grow.baselines`). The source is not modified; the
    result is in eval mode, in the source's dtype, on the source's device. A model matched to
    a family by its tensor layout only (unknown model_type) is checked to be lossless on a
    few inputs, or refused.
    """
    plan = plan_expansion(model, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, intermediate_size=intermediate_size, method=method)
    match = architecture_of(model, method="LEMON")
    arch, prefix = match.arch, match.prefix
    config = model.config
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
    # the rules are computed in float64 for float64 models and in float32 otherwise (the
    # splits then sum to the original up to float32 rounding, far below the 1e-5 tolerance)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    state = {k: v.detach().to("cpu", work) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    tied = _tied_reader(model)
    std = noise_std if noise_std is not None else float(
        getattr(config, "initializer_range", 0.02)) * arch.noise_scale
    gen = torch.Generator().manual_seed(int(seed))
    sp = _Splitter(plan, arch, symmetric=method != "lemon", std=std, generator=gen,
                   dtype=work)
    d, D = plan.hidden
    L = plan.layers[0]

    new_config = _grown_config(config, arch, plan)
    new = _new_model(model, new_config, seed, match)
    new_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    src_sizes = sizes_of(config, arch)
    src_layouts = fused_layouts(arch, src_sizes)
    new_layouts = fused_layouts(arch, sizes_of(new_config, arch))

    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for name, axis in arch.writers:
        key = prefix + name
        if key in state:
            out[key] = sp.stream(state[key], axis)
            consumed.add(key)

    # heads: which norm feeds a tied output embedding (its logits become k x E y: scale 1/k)
    head_keys = {h.path: (prefix if h.base else "") + h.path for h in arch.heads}
    tied_norm = None
    if tied is not None:
        reader = next((h for h in arch.heads if head_keys[h.path] == tied), None)
        if reader is None:
            raise UpcycleError(f"model: the output embedding {tied!r} is tied to the input "
                               f"embedding but is not a head LEMON knows in {arch.title}")
        feeder = next((h for h in arch.heads if h.path == reader.reads), None)
        norm = None
        if feeder is not None and feeder.norm:
            norm = (prefix if feeder.base else "") + feeder.norm
        elif arch.final_norm:
            norm = prefix + arch.final_norm
        if norm is None:
            raise UpcycleError(f"model: the tied output embedding {tied!r} reads no norm; "
                               f"LEMON cannot undo the k copies of its input")
        tied_norm = norm

    norms = [prefix + n for n in (arch.embedding_norm, arch.final_norm) if n]
    for key in norms:
        if key + ".weight" not in state:
            continue
        scale = 1.0 / plan.k if key == tied_norm else 1.0
        gamma, beta = sp.norm(state[key + ".weight"], state.get(key + ".bias"), scale)
        out[key + ".weight"] = gamma
        consumed.add(key + ".weight")
        if beta is not None:
            out[key + ".bias"] = beta
            consumed.add(key + ".bias")

    for head in arch.heads:
        key = head_keys[head.path]
        if key + ".weight" not in state or state[key + ".weight"].ndim != 2 \
                or state[key + ".weight"].shape[1] != d:
            continue  # absent, or it does not read a hidden-size vector (left to the check)
        w, b = state[key + ".weight"], state.get(key + ".bias")
        consumed.update(_suffixes(key))
        if head.kind == "dense":  # output grows: k copies + zero rows (f(0) = 0 after it)
            if w.shape[0] != d:
                raise UpcycleError(f"model: tensor {key + '.weight'!r} {tuple(w.shape)}: "
                                   f"expected a ({d}, {d}) hidden -> hidden projection")
            rows = torch.cat([w] * plan.k + [torch.zeros(plan.r, d, dtype=w.dtype)])
            out[key + ".weight"] = sp.split_in(rows)
            if b is not None:
                out[key + ".bias"] = torch.cat([b] * plan.k + [torch.zeros(plan.r,
                                                                            dtype=b.dtype)])
            if head.norm:
                nkey = (prefix if head.base else "") + head.norm
                if plan.r:
                    raise UpcycleError(f"model: tensor {nkey + '.weight'!r} normalises the "
                                       f"head's hidden vector; LEMON grows it losslessly only "
                                       f"to multiples of the hidden size ({d})")
                scale = 1.0 / plan.k if nkey == tied_norm else 1.0
                gamma, beta = sp.norm(state[nkey + ".weight"], state.get(nkey + ".bias"),
                                      scale)
                out[nkey + ".weight"] = gamma
                if beta is not None:
                    out[nkey + ".bias"] = beta
                consumed.update(_suffixes(nkey))
        elif key == tied:  # the weight is the input embedding's (set below); the bias stays
            if b is not None:
                out[key + ".bias"] = b
        else:
            out[key + ".weight"] = sp.split_in(w)
            if b is not None:
                out[key + ".bias"] = b

    layer_prefix = f"{prefix}{arch.layers}."
    layers = [_read_layer(state, arch, f"{layer_prefix}{i}.", src_layouts, consumed)
              for i in range(L)]
    regular = _regular_maps(plan)
    identity_maps = _new_block_maps(plan) if method == "lemon" else regular
    grown = []
    for src, kind in plan.layer_map:
        P = layers[src]
        if kind == "new":
            maps = identity_maps or regular
            # with no way to pair copies (a single head), fall back to zero output projections
            G = _grow_layer(P, sp, maps, identity=True)
            if identity_maps is None:
                G["o"] = torch.zeros_like(G["o"])
                G["down"] = torch.zeros_like(G["down"])
            if arch.post_ln:
                prev = grown[-1]
                ones = torch.ones(D, dtype=work)
                zeros = torch.zeros(D, dtype=work)
                G["mn"] = prev["mn"]  # the new block's output norm takes over layer src's
                G["an"] = (ones, zeros)  # pass the normalised stream through
                prev["mn"] = (ones.clone(), zeros.clone())
        else:
            P_next = layers[min(src + 1, L - 1)]
            G = _grow_layer(P, sp, regular, identity=False, P_next=P_next,
                            aki=(method == "aki"))
        grown.append(G)
    for target, G in enumerate(grown):
        _write_layer(out, G, arch, f"{layer_prefix}{target}.", new_layouts)
    if tied is not None:
        out[tied + ".weight"] = out[prefix + arch.token_embedding + ".weight"]
        consumed.add(tied + ".weight")

    # everything else must keep its shape (e.g. a classifier bias), or we do not know it
    for key, value in state.items():
        if key in consumed or key in out:
            continue
        if key.startswith(layer_prefix):
            raise UpcycleError(f"model: tensor {key!r} in a {arch.title} layer is not one LEMON "
                               f"knows how to expand")
        if new_shapes.get(key) != tuple(value.shape):
            raise UpcycleError(f"model: tensor {key!r} {tuple(value.shape)} depends on the "
                               f"model size but is not one LEMON knows how to expand "
                               f"({arch.title}: a head or module missing from its entry in "
                               f"upcycle.models.architectures)")
        out[key] = value
    for key, value in out.items():
        if new_shapes.get(key) != tuple(value.shape):
            raise UpcycleError(f"internal: expanded {key!r} has shape {tuple(value.shape)}, the "
                               f"new model expects {new_shapes.get(key)}")
    new.to(dtype)
    missing, unexpected = new.load_state_dict(out, strict=False)
    shared: dict[int, list[str]] = {}  # tied parameters: one name loaded is all of them
    named = dict(new.named_parameters(remove_duplicate=False))
    for name, param in named.items():
        shared.setdefault(id(param), []).append(name)
    missing = [m for m in missing if m not in out and not any(
        alias in out for alias in shared.get(id(named.get(m)), []))]
    if missing or unexpected:
        raise UpcycleError(f"internal: expanded state does not fit the new model: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    if tied is not None and hasattr(new, "tie_weights"):
        new.tie_weights()
    new.to(device)
    new.eval()
    new.growth_plan = plan  # for reports
    if match.by_structure:
        _check_clone(model, new, config)
    return new


def _check_clone(source: nn.Module, grown: nn.Module, config) -> None:
    """A family recognised by its layout only: its forward may still differ (an embedding
    scale, a norm offset). Refuse unless the grown model is lossless on a few inputs."""
    was_training = source.training
    source.eval()
    try:
        worst = max(max_output_difference(source, grown, example_inputs(source, seed=s))["max_rel"]
                    for s in range(2))
    finally:
        source.train(was_training)
    bound = 1e-8 if next(source.parameters()).dtype == torch.float64 else 1e-4
    if not worst <= bound:
        raise UpcycleError(f"model: model_type {config.model_type!r} has the tensor layout of "
                           f"{grown.growth_plan.family} but computes something else (the grown "
                           f"model differs by {worst:.2e}); not supported")


# -- checking losslessness --------------------------------------------------------------------

def _has_active_dropout(model: nn.Module) -> bool:
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "attention_dropout", 0) or 0)


def _outputs(output) -> dict[str, torch.Tensor]:
    """The tensors of a model output (logits, start/end logits, hidden states, pooled)."""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    items = output.items() if hasattr(output, "items") else enumerate(output)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor) and k != "loss"}


@torch.no_grad()
def max_output_difference(source: nn.Module, grown: nn.Module, inputs: dict) -> dict:
    """Run both models on ``inputs`` (a dict of model inputs) and compare their outputs.

    Compares every tensor output: logits (and QA start/end logits) as they are, hidden states
    and pooled outputs on their first channels (the grown stream holds k copies of the
    source's). Returns max_abs, max_rel (max_abs / max(1, max |output|)) and argmax_equal (of
    the logits, or of the compared tensors when there are none). Refuses models in train mode
    with active dropout: losslessness holds in eval mode only.
    """
    for label, model in (("source", source), ("grown", grown)):
        if model.training and _has_active_dropout(model):
            raise UpcycleError(f"{label} model: in train mode with dropout; LEMON is lossless "
                               f"only in eval mode (or with dropout p=0): call model.eval() first")
    a_out, b_out = _outputs(source(**inputs)), _outputs(grown(**inputs))
    if not a_out:
        raise UpcycleError("source model: its output holds no tensor to compare")
    diff, scale, argmax = 0.0, 1.0, True
    logit_keys = [k for k in a_out if k.endswith("logits")] or list(a_out)
    for key, a in a_out.items():
        if key not in b_out:
            raise UpcycleError(f"grown model: its output has no {key!r} (the source's has)")
        a = a.double()
        b = b_out[key].double()[..., : a.shape[-1]]
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
        if key in logit_keys:
            argmax = argmax and bool((a.argmax(-1) == b.argmax(-1)).all())
    return {"max_abs": diff, "max_rel": diff / scale, "argmax_equal": argmax}


def example_inputs(model: nn.Module, *, batch: int = 2, length: int = 16, seed: int = 0) -> dict:
    """A few seeded inputs for ``model`` on its device (token ids, with a padded row for
    encoders, or random images)."""
    arch = architecture_of(model).arch
    config = model.config
    first = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    if arch.embed == "vit":
        size = config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return {"pixel_values": torch.randn(batch, config.num_channels, *size, generator=gen,
                                            dtype=first.dtype).to(first.device)}
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 512)
    length = min(length, int(limit) - 2)  # RoBERTa's positions start after the padding index
    ids = torch.randint(3, int(config.vocab_size), (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and arch.call.mask == "padding":
        mask[-1, length // 2:] = 0
    return {"input_ids": ids.to(first.device), "attention_mask": mask.to(first.device)}


# -- the learning-rate recipe -----------------------------------------------------------------

SCHEDULES = ("cosine", "linear")
"""How the learning rate decays after the warm-up, to ``min_lr_ratio`` x peak at the last step."""


def _check_recipe(peak_lr: float, warmup_steps: int, total_steps: int, decay: str,
                  min_lr_ratio: float, where: str) -> None:
    if decay not in SCHEDULES:
        raise UpcycleError(f"{where}: decay must be one of {', '.join(SCHEDULES)}, got {decay!r}")
    if not peak_lr > 0 or total_steps < 1 or warmup_steps < 0:
        raise UpcycleError(f"{where}: expected peak_lr > 0, total_steps >= 1 and "
                           f"warmup_steps >= 0, got {peak_lr}, {total_steps}, {warmup_steps}")
    if not 0 <= min_lr_ratio < 1:
        raise UpcycleError(f"{where}: min_lr_ratio must be in [0, 1), got {min_lr_ratio}")


def lemon_schedule(optimizer: torch.optim.Optimizer, *, peak_lr: float, warmup_steps: int,
                   total_steps: int, decay: str = "cosine", min_lr_ratio: float = 0.0,
                   fresh_state: bool = True) -> torch.optim.lr_scheduler.LambdaLR:
    """LEMON's recipe on ``optimizer``: the from-scratch peak learning rate and warm-up
    (explicit inputs: pass what the large model would use from scratch), then a ``decay``
    ("cosine" or "linear") that ends at ``total_steps``, the reduced budget (about 0.45-0.65
    of the from-scratch steps), so it decays fully. Sets every group's lr to ``peak_lr`` and,
    with ``fresh_state``, clears the optimizer's state (moments): the paper starts the grown
    model on a fresh optimizer."""
    _check_recipe(peak_lr, warmup_steps, total_steps, decay, min_lr_ratio, "lemon_schedule")
    if fresh_state:
        optimizer.state.clear()
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group["initial_lr"] = peak_lr
    warmup = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LemonRecipe:
    """The grown model's training budget and schedule (see :func:`lemon_train_config`)."""
    max_steps: int
    lr: float
    warmup_steps: int
    decay: str = "cosine"
    min_lr_ratio: float = 0.0
    extra: dict = field(default_factory=dict)

    def scheduler(self, optimizer: torch.optim.Optimizer, *, fresh_state: bool = True):
        """:func:`lemon_schedule` with this recipe."""
        return lemon_schedule(optimizer, peak_lr=self.lr, warmup_steps=self.warmup_steps,
                              total_steps=self.max_steps, decay=self.decay,
                              min_lr_ratio=self.min_lr_ratio, fresh_state=fresh_state)

    def training_arguments(self) -> dict:
        """Keyword arguments for ``transformers.TrainingArguments`` giving the same schedule
        (HF's "cosine"/"linear" decay to 0 at max_steps; "cosine_with_min_lr" otherwise)."""
        kwargs = {"max_steps": self.max_steps, "learning_rate": self.lr,
                  "warmup_steps": self.warmup_steps, "lr_scheduler_type": self.decay}
        if self.min_lr_ratio:
            if self.decay != "cosine":
                raise UpcycleError("a linear decay to a nonzero min_lr_ratio has no "
                                   "transformers scheduler; pass the recipe's scheduler()")
            kwargs["lr_scheduler_type"] = "cosine_with_min_lr"
            kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": self.min_lr_ratio}
        return kwargs

    def train_config(self):
        """An :class:`upcycle.training.TrainingConfig` with this budget, peak and warm-up (pass
        ``schedule=lambda opt, total: recipe.scheduler(opt)`` to :func:`upcycle.training.fit`
        for the decay; its default is the cosine)."""

        return TrainingConfig(max_steps=self.max_steps, lr=self.lr,
                              warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                              **self.extra)


def lemon_train_config(scratch_steps: int, *, peak_lr: float, warmup_steps: int,
                       budget: float = 0.55, decay: str = "cosine", min_lr_ratio: float = 0.0,
                       **kwargs) -> LemonRecipe:
    """The grown model's recipe: the from-scratch ``peak_lr`` and ``warmup_steps`` (required:
    they are the large model's from-scratch values, not defaults), ``budget`` x
    ``scratch_steps`` steps with the ``decay`` ("cosine" or "linear") ending at the last one.
    ``kwargs`` go to :meth:`LemonRecipe.train_config`."""
    if not 0 < budget <= 1:
        raise UpcycleError(f"budget: expected a fraction in (0, 1], got {budget}")
    if scratch_steps < 1:
        raise UpcycleError(f"scratch_steps: expected a positive number, got {scratch_steps}")
    steps = max(1, round(scratch_steps * budget))
    _check_recipe(peak_lr, warmup_steps, steps, decay, min_lr_ratio, "lemon_train_config")
    return LemonRecipe(max_steps=steps, lr=peak_lr, warmup_steps=min(warmup_steps, steps),
                       decay=decay, min_lr_ratio=min_lr_ratio, extra=dict(kwargs))
