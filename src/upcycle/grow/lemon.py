"""LEMON: lossless model expansion (Wang et al., ICLR 2024), as specified in specs/lemon.md.

:func:`expand` turns a trained HF Transformer of any family in :mod:`upcycle.models.families`
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

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..errors import UpcycleError
from ..models.families import Architecture
from ..models.matching import FusedLayout, fused_layouts, sizes_of
from .check import check_clone
from .growth import Growth, check_finite, check_layout, prepare_growth
from .plan import GrowthPlan

POST_LN_DEPTH_NOTE = (
    "post-LN depth: the new block's attention LayerNorm and the preceding layer's output "
    "LayerNorm pass the normalised stream through (gamma=1, beta=0) and the new block's "
    "output LayerNorm takes over the preceding layer's gamma/beta; the only error is the "
    "re-normalisation of an already normalised vector, a relative term of about "
    "eps/Var <= ~1e-12 for BERT's eps=1e-12"
)


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
        return torch.randn(*shape, generator=self.gen, dtype=self.dtype).mul_(self.std)

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
            # noise - (sum - w) / k, in place (the same values, a third of the memory)
            excess = noise.sum(1, keepdim=True).sub_(w[:, None, :]).div_(self.k)
            body = noise.sub_(excess).reshape(out, kd)
            del excess
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
            excess = sums[:, umap].sub_(tgt_copy).div_(c)  # in place, as in split_in
            del sums, tgt_copy
            cols = noise.sub_(excess)
        return cols.reshape(out, n_new * block)


# -- reading and writing a family's layers ---------------------------------------------------

def _get_linear(state, name, conv1d):
    w = state[name + ".weight"]
    return (w.t() if conv1d else w), state.get(name + ".bias")


def _put_linear(out, name, w, b, conv1d):
    out[name + ".weight"] = w.t().contiguous() if conv1d else w
    if b is not None:
        out[name + ".bias"] = b


def _read_layer(state, arch: Architecture, prefix: str, layouts: dict[str, FusedLayout]
                ) -> dict:
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
    else:
        for part in ("q", "k", "v"):
            name = prefix + getattr(att, part)
            P[part], P[part + ".b"] = _get_linear(state, name, conv)
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
    for key, mod in (("an", arch.attn_norm), ("mn", arch.mlp_norm)):
        P[key] = (state[prefix + mod + ".weight"], state.get(prefix + mod + ".bias"))
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


# -- the expansion, one piece at a time -------------------------------------------------------

def _global_pieces(state: Mapping[str, torch.Tensor], g: Growth, sp: _Splitter,
                   shapes: Mapping[str, tuple[int, ...]]) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors outside the layers, one module at a time: the writers, the embedding and
    final norms, the heads (their layout was checked by :func:`check_layout`)."""
    arch, prefix, plan = g.arch, g.prefix, g.plan
    d = plan.hidden[0]
    for name, axis in arch.writers:
        key = prefix + name
        if key in shapes:
            yield {key: sp.stream(state[key], axis)}
    for key in [prefix + n for n in (arch.embedding_norm, arch.final_norm) if n]:
        if key + ".weight" in shapes:
            yield _norm_piece(state, sp, key, 1.0 / plan.k if key == g.tied_norm else 1.0)
    for head in arch.heads:
        key = g.head_key(head)
        shape = shapes.get(key + ".weight")
        if shape is None or len(shape) != 2 or shape[1] != d:
            continue  # absent, or it does not read a hidden-size vector (left to the check)
        w, b = state[key + ".weight"], state.get(key + ".bias")
        out: dict[str, torch.Tensor] = {}
        if head.kind == "dense":  # output grows: k copies + zero rows (f(0) = 0 after it)
            rows = torch.cat([w] * plan.k + [torch.zeros(plan.r, d, dtype=w.dtype)])
            out[key + ".weight"] = sp.split_in(rows)
            if b is not None:
                out[key + ".bias"] = torch.cat([b] * plan.k + [torch.zeros(plan.r,
                                                                            dtype=b.dtype)])
            if head.norm:
                nkey = (prefix if head.base else "") + head.norm
                out.update(_norm_piece(state, sp, nkey,
                                       1.0 / plan.k if nkey == g.tied_norm else 1.0))
        elif key == g.tied:  # the weight is the input embedding's; the bias stays
            if b is not None:
                out[key + ".bias"] = b
        else:
            out[key + ".weight"] = sp.split_in(w)
            if b is not None:
                out[key + ".bias"] = b
        del w, b
        yield out


def _norm_piece(state, sp: _Splitter, key: str, scale: float) -> dict[str, torch.Tensor]:
    gamma, beta = sp.norm(state[key + ".weight"], state.get(key + ".bias"), scale)
    return {key + ".weight": gamma} if beta is None else {key + ".weight": gamma,
                                                          key + ".bias": beta}


def grow_pieces(state: Mapping[str, torch.Tensor], g: Growth,
                shapes: Mapping[str, tuple[int, ...]]) -> Iterator[dict[str, torch.Tensor]]:
    """The grown model's tensors (work dtype; a tied output embedding left out), one piece at
    a time: each module outside the layers, then the target layers grown from each source
    layer, then the source tensors copied as they are. ``state`` maps the source's names to
    its tensors in ``g.work`` (a dict, or a mapping reading each from disk when asked);
    ``shapes``: their shapes. One source layer (two for AKI, which reads the next one) and
    one target layer are held at a time. The symmetry-breaking noise is
    drawn in one order, so the pieces are the same however they are consumed."""
    arch, prefix, plan = g.arch, g.prefix, g.plan
    consumed = check_layout(g, shapes)
    gen = torch.Generator().manual_seed(g.seed)
    sp = _Splitter(plan, arch, symmetric=g.method != "lemon", std=g.std, generator=gen,
                   dtype=g.work)
    D, L = plan.hidden[1], plan.layers[0]
    src_layouts = fused_layouts(arch, sizes_of(g.config, arch))
    new_layouts = fused_layouts(arch, sizes_of(g.new_config, arch))

    def check(piece: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key, value in piece.items():
            if g.new_shapes.get(key) != tuple(value.shape):
                raise UpcycleError(f"internal: expanded {key!r} has shape "
                                   f"{tuple(value.shape)}, the new model expects "
                                   f"{g.new_shapes.get(key)}")
        return piece

    for piece in _global_pieces(state, g, sp, shapes):
        yield check(piece)
    layer_prefix = f"{prefix}{arch.layers}."
    aki = g.method == "aki"
    cache: dict[int, dict] = {}

    def layer(i: int) -> dict:
        if i not in cache:
            while len(cache) >= (2 if aki else 1):  # AKI reads the next layer too
                cache.pop(next(iter(cache)))
            cache[i] = _read_layer(state, arch, f"{layer_prefix}{i}.", src_layouts)
        return cache[i]

    regular = _regular_maps(plan)
    identity_maps = _new_block_maps(plan) if g.method == "lemon" else regular
    ones, zeros = torch.ones(D, dtype=g.work), torch.zeros(D, dtype=g.work)
    handed_over = None  # post-LN: the output norm a new block takes over from its layer
    for target, (src, kind) in enumerate(plan.layer_map):
        P = layer(src)
        if kind == "new":
            maps = identity_maps or regular
            # with no way to pair copies (a single head), fall back to zero output projections
            G = _grow_layer(P, sp, maps, identity=True)
            if identity_maps is None:
                G["o"] = torch.zeros_like(G["o"])
                G["down"] = torch.zeros_like(G["down"])
            if arch.post_ln:
                G["mn"] = handed_over  # the new block's output norm takes over layer src's
                G["an"] = (ones, zeros)  # pass the normalised stream through
        else:
            G = _grow_layer(P, sp, regular, identity=False,
                            P_next=layer(min(src + 1, L - 1)) if aki else None, aki=aki)
            following = plan.layer_map[target + 1] if target + 1 < len(plan.layer_map) else None
            if arch.post_ln and following == (src, "new"):
                handed_over, G["mn"] = G["mn"], (ones.clone(), zeros.clone())
        piece: dict[str, torch.Tensor] = {}
        _write_layer(piece, G, arch, f"{layer_prefix}{target}.", new_layouts)
        del G
        yield check(piece)
        del piece
    yield check({key: state[key] for key in shapes if key not in consumed})


# -- the public API -------------------------------------------------------------------------

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
    few inputs, or refused. The whole source and grown model are held in memory: a model
    folder too large for that is grown by :func:`upcycle.grow.expand_folder`, which streams
    the same tensors.
    """
    g = prepare_growth(model, hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=num_heads, intermediate_size=intermediate_size, seed=seed,
                       noise_std=noise_std, method=method)
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
    # the rules are computed in float64 for float64 models and in float32 otherwise (the
    # splits then sum to the original up to float32 rounding, far below the 1e-5 tolerance)
    state = {k: v.detach().to("cpu", g.work) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    check_finite(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for piece in grow_pieces(state, g, shapes):
        out.update(piece)
    new = g.new_model
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
    if g.tied is not None and hasattr(new, "tie_weights"):
        new.tie_weights()
    new.to(device)
    new.eval()
    new.growth_plan = g.plan  # for reports
    if g.match.by_structure:
        check_clone(model, new, g.config)
    return new
