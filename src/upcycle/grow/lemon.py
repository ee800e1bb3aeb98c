"""LEMON: lossless model expansion (Wang et al., ICLR 2024), as specified in specs/lemon.md.

:func:`expand` turns a trained HF Transformer (BERT/MiniLM, ViT, GPT-2, Llama) into a wider
and/or deeper model of the same family that computes the same function in eval mode:

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
from ..train import cosine_with_warmup
from .families import (
    Family,
    base_prefix,
    eps_of,
    family_of,
    head_dim_of,
    intermediate_of,
    kv_heads_of,
)

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
        return (f"{self.family}: hidden {h[0]}->{h[1]} (k={self.k}, r={self.r}), layers "
                f"{l[0]}->{l[1]}, heads {a[0]}->{a[1]} (head_dim {self.head_dim}), "
                f"intermediate {f[0]}->{f[1]}")


def plan_expansion(model: nn.Module, *, hidden_size: int | None = None,
                   num_layers: int | None = None, num_heads: int | None = None,
                   intermediate_size: int | None = None, method: str = "lemon") -> GrowthPlan:
    """Check the target dimensions against the model and return the plan (or UpcycleError)."""
    if method not in METHODS:
        raise UpcycleError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    fam = family_of(model)
    config = model.config
    d = int(getattr(config, fam.hidden_key))
    L = int(getattr(config, fam.layers_key))
    h = int(getattr(config, fam.heads_key))
    kv = kv_heads_of(config, fam)
    f = intermediate_of(config, fam)
    hd = head_dim_of(config, fam)
    if hd * h != d:
        raise UpcycleError(f"model: head_dim {hd} x {h} heads != hidden size {d}; LEMON keeps "
                           f"head_dim fixed and needs hidden = heads x head_dim")
    if fam.name == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UpcycleError("model: GPT-2 with scale_attn_by_inverse_layer_idx=True scales each "
                           "layer by its index, which depth expansion changes; not supported")

    D = d if hidden_size is None else int(hidden_size)
    for arg, value, source in (("hidden_size", D, d), ("num_layers", num_layers, L),
                               ("num_heads", num_heads, h),
                               ("intermediate_size", intermediate_size, f)):
        if value is not None and int(value) < source:
            raise UpcycleError(f"{arg}: target {value} is smaller than the source's {source}; "
                               f"LEMON only grows models")
    if D % hd:
        raise UpcycleError(f"hidden_size: {D} is not a multiple of head_dim {hd} (head_dim is "
                           f"kept fixed, so hidden_size must be num_heads x {hd})")
    H = D // hd if num_heads is None else int(num_heads)
    if H * hd != D:
        raise UpcycleError(f"num_heads: {H} heads x head_dim {hd} = {H * hd}, but hidden_size is "
                           f"{D}; pass num_heads={D // hd} (head_dim is kept fixed)")
    g = h // kv
    if h % kv:
        raise UpcycleError(f"model: {h} query heads are not a multiple of {kv} key/value heads")
    if H % g:
        raise UpcycleError(f"num_heads: {H} is not a multiple of the query-group size {g} "
                           f"({h} query heads share {kv} key/value heads)")
    KV = H // g
    F = int(intermediate_size) if intermediate_size is not None else (
        f if D == d else round(f * D / d))
    L2 = L if num_layers is None else int(num_layers)
    if L2 > 2 * L:
        raise UpcycleError(f"num_layers: {L2} is more than twice the source's {L} layers; LEMON "
                           f"grows depth at most 2x per expansion: expand to {2 * L} first, then "
                           f"call expand again (stages)")
    if fam.post_ln and D % d:
        raise UpcycleError(f"hidden_size: {D} is not a multiple of {d}; post-LN models "
                           f"({fam.name}) expand losslessly only to multiples of the hidden size "
                           f"(e.g. {2 * d} or {3 * d})")
    n_new = L2 - L
    if method == "aki":
        layer_map = [(i, "orig") for i in range(L)] + [(i, "stack") for i in range(n_new)]
    else:
        layer_map = [(i, "orig") for i in range(L - n_new)]
        for i in range(L - n_new, L):
            layer_map += [(i, "orig"), (i, "new")]
    return GrowthPlan(family=fam.name, hidden=(d, D), layers=(L, L2), heads=(h, H),
                      kv_heads=(kv, KV), intermediate=(f, F), head_dim=hd, layer_map=layer_map)


# -- splitting ------------------------------------------------------------------------------

class _Splitter:
    """The expansion rules, written once. ``symmetric`` gives equal splits (Net2Net)."""

    def __init__(self, plan: GrowthPlan, fam: Family, *, symmetric: bool, std: float,
                 generator: torch.Generator, dtype: torch.dtype = torch.float64):
        self.plan, self.fam = plan, fam
        self.dtype = dtype
        self.symmetric = symmetric
        self.std = std
        self.gen = generator
        self.d, self.D = plan.hidden
        self.k, self.r = plan.k, plan.r
        self.zero_residue = fam.norm == "rmsnorm"  # V_zero for RMSNorm, V_avg for LayerNorm

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


def _read_layer(state, fam: Family, prefix: str, plan: GrowthPlan, consumed: set) -> dict:
    P: dict = {}
    if "qkv" in fam.attn:
        w, b = _get_linear(state, prefix + fam.attn["qkv"], fam.conv1d)
        d_q = plan.heads[0] * plan.head_dim
        d_kv = plan.kv_heads[0] * plan.head_dim
        P["q"], P["k"], P["v"] = (list(w.split([d_q, d_kv, d_kv], dim=0)))
        bs = list(b.split([d_q, d_kv, d_kv])) if b is not None else [None] * 3
        P["q.b"], P["k.b"], P["v.b"] = bs
        consumed.update({prefix + fam.attn["qkv"] + s for s in (".weight", ".bias")})
    else:
        for name in ("q", "k", "v"):
            P[name], P[name + ".b"] = _get_linear(state, prefix + fam.attn[name], fam.conv1d)
            consumed.update({prefix + fam.attn[name] + s for s in (".weight", ".bias")})
    P["o"], P["o.b"] = _get_linear(state, prefix + fam.attn["o"], fam.conv1d)
    P["up"] = [_get_linear(state, prefix + m, fam.conv1d) for m in fam.mlp_in]
    P["down"], P["down.b"] = _get_linear(state, prefix + fam.mlp_out, fam.conv1d)
    for m in (fam.attn["o"], *fam.mlp_in, fam.mlp_out):
        consumed.update({prefix + m + s for s in (".weight", ".bias")})
    for key, mod in (("an", fam.attn_norm), ("mn", fam.mlp_norm)):
        P[key] = (state[prefix + mod + ".weight"], state.get(prefix + mod + ".bias"))
        consumed.update({prefix + mod + s for s in (".weight", ".bias")})
    return P


def _write_layer(out: dict, G: dict, fam: Family, prefix: str) -> None:
    if "qkv" in fam.attn:
        w = torch.cat([G["q"], G["k"], G["v"]], dim=0)
        b = torch.cat([G["q.b"], G["k.b"], G["v.b"]]) if G["q.b"] is not None else None
        _put_linear(out, prefix + fam.attn["qkv"], w, b, fam.conv1d)
    else:
        for name in ("q", "k", "v"):
            _put_linear(out, prefix + fam.attn[name], G[name], G[name + ".b"], fam.conv1d)
    _put_linear(out, prefix + fam.attn["o"], G["o"], G["o.b"], fam.conv1d)
    for m, (w, b) in zip(fam.mlp_in, G["up"]):
        _put_linear(out, prefix + m, w, b, fam.conv1d)
    _put_linear(out, prefix + fam.mlp_out, G["down"], G["down.b"], fam.conv1d)
    for key, mod in (("an", fam.attn_norm), ("mn", fam.mlp_norm)):
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

def _tied_head(model: nn.Module) -> bool:
    try:
        out_emb = model.get_output_embeddings()
        in_emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight


def _new_model(model: nn.Module, config, seed: int) -> nn.Module:
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        import contextlib

        no_init_weights = contextlib.nullcontext
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with no_init_weights():
            new = type(model)(config)
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
    result is in eval mode, in the source's dtype.
    """
    plan = plan_expansion(model, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, intermediate_size=intermediate_size, method=method)
    fam = family_of(model)
    config = model.config
    dtype = next(model.parameters()).dtype
    # the rules are computed in float64 for float64 models and in float32 otherwise (the
    # splits then sum to the original up to float32 rounding, far below the 1e-5 tolerance)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    state = {k: v.detach().to("cpu", work) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    prefix = base_prefix(state, fam)
    tied = _tied_head(model)
    std = noise_std if noise_std is not None else float(
        getattr(config, "initializer_range", 0.02)) * fam.noise_scale
    gen = torch.Generator().manual_seed(int(seed))
    sp = _Splitter(plan, fam, symmetric=method != "lemon", std=std, generator=gen,
                   dtype=work)
    D, (L, L2) = plan.hidden[1], plan.layers

    new_config = copy.deepcopy(config)
    setattr(new_config, fam.hidden_key, D)
    setattr(new_config, fam.layers_key, L2)
    setattr(new_config, fam.heads_key, plan.heads[1])
    if fam.kv_heads_key:
        setattr(new_config, fam.kv_heads_key, plan.kv_heads[1])
    setattr(new_config, fam.intermediate_key, plan.intermediate[1])
    if fam.name == "llama":
        new_config.head_dim = plan.head_dim
    setattr(new_config, fam.eps_key, eps_of(config, fam) * plan.eta ** 2)
    new = _new_model(model, new_config, seed)
    new_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}

    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for name, axis in fam.writers:
        key = prefix + name
        if key in state:
            out[key] = sp.stream(state[key], axis)
            consumed.add(key)
    for norm in fam.stream_norms:
        key = prefix + norm
        if key + ".weight" not in state:
            continue
        scale = 1.0 / plan.k if (tied and norm == fam.final_norm) else 1.0
        gamma, beta = sp.norm(state[key + ".weight"], state.get(key + ".bias"), scale)
        out[key + ".weight"] = gamma
        consumed.add(key + ".weight")
        if beta is not None:
            out[key + ".bias"] = beta
            consumed.add(key + ".bias")
    if fam.pooler and prefix + fam.pooler + ".weight" in state:
        key = prefix + fam.pooler
        w = state[key + ".weight"]
        zero_rows = torch.zeros(plan.r, w.shape[1], dtype=w.dtype)
        rows = torch.cat([w] * plan.k + [zero_rows])  # pooled output: k copies + zeros
        out[key + ".weight"] = sp.split_in(rows)
        b = state[key + ".bias"]
        out[key + ".bias"] = torch.cat([b] * plan.k + [torch.zeros(plan.r, dtype=b.dtype)])
        consumed.update({key + ".weight", key + ".bias"})
    for reader in fam.readers:
        key = reader + ".weight"
        if key not in state:
            continue
        consumed.add(key)
        if tied and reader == "lm_head":
            continue  # tied to the input embeddings (set below)
        out[key] = sp.split_in(state[key])
        if reader + ".bias" in state:
            out[reader + ".bias"] = state[reader + ".bias"]
            consumed.add(reader + ".bias")

    layer_prefix = f"{prefix}{fam.layers}."
    layers = [_read_layer(state, fam, f"{layer_prefix}{i}.", plan, consumed) for i in range(L)]
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
            if fam.post_ln:
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
        _write_layer(out, G, fam, f"{layer_prefix}{target}.")
    if tied:
        head = next(k for k in state if k.endswith(fam.writers[0][0]))
        for reader in fam.readers:
            if reader + ".weight" in state:
                out[reader + ".weight"] = out[head]

    # everything else must keep its shape (e.g. a classifier bias), or we do not know it
    for key, value in state.items():
        if key in consumed or key in out:
            continue
        if key.startswith(layer_prefix):
            raise UpcycleError(f"model: tensor {key!r} in a {fam.name} layer is not one LEMON "
                               f"knows how to expand")
        if new_shapes.get(key) != tuple(value.shape):
            raise UpcycleError(f"model: tensor {key!r} {tuple(value.shape)} depends on the "
                               f"model size but is not one LEMON knows how to expand "
                               f"({fam.name} family)")
        out[key] = value
    for key, value in out.items():
        if new_shapes.get(key) != tuple(value.shape):
            raise UpcycleError(f"internal: expanded {key!r} has shape {tuple(value.shape)}, the "
                               f"new model expects {new_shapes.get(key)}")
    new.to(dtype)
    missing, unexpected = new.load_state_dict(out, strict=False)
    missing = [m for m in missing if m not in out]
    if missing or unexpected:
        raise UpcycleError(f"internal: expanded state does not fit the new model: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")
    if tied and hasattr(new, "tie_weights"):
        new.tie_weights()
    new.eval()
    new.growth_plan = plan  # for reports
    return new


# -- checking losslessness --------------------------------------------------------------------

def _has_active_dropout(model: nn.Module) -> bool:
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "attention_dropout", 0) or 0)


def _comparable(output, d: int) -> torch.Tensor:
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return hidden[..., :d]  # the grown stream carries k copies: compare the first one


@torch.no_grad()
def max_output_difference(source: nn.Module, grown: nn.Module, inputs: dict) -> dict:
    """Run both models on ``inputs`` (a dict of model inputs) and compare their outputs.

    Compares logits when the model has a head, otherwise the last hidden state's first
    ``d`` channels (the grown stream holds k copies of the source's). Returns max_abs,
    max_rel (max_abs / max(1, max |output|)) and argmax_equal. Refuses models in train mode
    with active dropout: losslessness holds in eval mode only.
    """
    for label, model in (("source", source), ("grown", grown)):
        if model.training and _has_active_dropout(model):
            raise UpcycleError(f"{label} model: in train mode with dropout; LEMON is lossless "
                               f"only in eval mode (or with dropout p=0): call model.eval() first")
    fam = family_of(source)
    d = int(getattr(source.config, fam.hidden_key))
    a = _comparable(source(**inputs), d).double()
    b = _comparable(grown(**inputs), d).double()
    diff = (a - b).abs().max().item()
    scale = max(1.0, a.abs().max().item())
    return {"max_abs": diff, "max_rel": diff / scale,
            "argmax_equal": bool((a.argmax(-1) == b.argmax(-1)).all())}


def example_inputs(model: nn.Module, *, batch: int = 2, length: int = 16, seed: int = 0) -> dict:
    """A few seeded inputs for ``model`` (token ids with a padded row, or random images)."""
    fam = family_of(model)
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    if fam.name == "vit":
        size = config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        dtype = next(model.parameters()).dtype
        return {"pixel_values": torch.randn(batch, config.num_channels, *size, generator=gen,
                                            dtype=dtype)}
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 512)
    length = min(length, int(limit))
    ids = torch.randint(0, int(config.vocab_size), (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and fam.name == "bert":
        mask[-1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# -- the learning-rate recipe -----------------------------------------------------------------

def lemon_schedule(optimizer: torch.optim.Optimizer, *, peak_lr: float, warmup_steps: int,
                   total_steps: int, min_lr_ratio: float = 0.0
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """LEMON's recipe: the from-scratch peak learning rate and warm-up, and a cosine decay that
    ends at ``total_steps`` of the reduced budget (about 0.45-0.65 of the from-scratch
    steps), on a fresh optimizer. Sets every group's lr to ``peak_lr``."""
    if peak_lr <= 0 or total_steps < 1 or warmup_steps < 0:
        raise UpcycleError(f"lemon_schedule: expected peak_lr > 0, total_steps >= 1 and "
                           f"warmup_steps >= 0, got {peak_lr}, {total_steps}, {warmup_steps}")
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group["initial_lr"] = peak_lr
    return cosine_with_warmup(optimizer, warmup_steps, total_steps, min_lr_ratio)


def lemon_train_config(scratch_steps: int, *, peak_lr: float, warmup_steps: int,
                       budget: float = 0.55, **kwargs):
    """A :class:`upcycle.training.TrainingConfig` for the grown model: same peak and warm-up as
    from scratch, ``budget`` x ``scratch_steps`` steps with the cosine decayed fully."""
    if not 0 < budget <= 1:
        raise UpcycleError(f"budget: expected a fraction in (0, 1], got {budget}")
    from ..training import TrainingConfig

    steps = max(1, round(scratch_steps * budget))
    return TrainingConfig(max_steps=steps, lr=peak_lr, warmup_steps=min(warmup_steps, steps),
                       **kwargs)
