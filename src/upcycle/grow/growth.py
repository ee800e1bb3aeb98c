"""What one expansion needs besides the tensors (:class:`Growth`), worked out from a model that
may be empty (parameters on the meta device): the plan, the family, the grown config and the
grown model's shapes, the tied output embedding, and which source tensors the rules consume.
Everything here reads shapes and names only, so a bad layout is refused before any tensor is
read or written. :func:`upcycle.grow.lemon.grow_pieces` computes the tensors."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UpcycleError
from ..models.backbone import base_model
from ..models.families import Architecture
from ..models.matching import Match, architecture_of, eps_of
from .plan import GrowthPlan, plan_expansion


@dataclass
class Growth:
    """One expansion, before any tensor is computed."""
    plan: GrowthPlan
    match: Match
    config: object
    """The source's config."""
    new_config: object
    new_model: nn.Module
    """The grown model (empty, on the meta device, when streamed)."""
    new_shapes: dict[str, tuple[int, ...]]
    tied: str | None
    """The module name of an output embedding sharing the input embedding's weight."""
    tied_norm: str | None
    """The norm feeding the tied output embedding (its gamma/beta are scaled by 1/k)."""
    std: float
    seed: int
    method: str
    work: torch.dtype
    """The dtype the rules compute in (float64 for float64 models, else float32)."""

    @property
    def arch(self) -> Architecture:
        return self.match.arch

    @property
    def prefix(self) -> str:
        return self.match.prefix

    def head_key(self, head) -> str:
        return (self.prefix if head.base else "") + head.path


def _suffixes(module: str) -> set[str]:
    return {module + ".weight", module + ".bias"}


def tied_reader(model: nn.Module) -> str | None:
    """The module name of the output embedding when it shares the input embedding's weight."""
    try:
        out_emb = model.get_output_embeddings()
        in_emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return None
    return next((name for name, m in model.named_modules() if m is out_emb), None)


def _tied_norm(arch: Architecture, prefix: str, tied: str | None) -> str | None:
    """Which norm feeds a tied output embedding (its logits become k x E y: scale 1/k)."""
    if tied is None:
        return None
    head_keys = {h.path: (prefix if h.base else "") + h.path for h in arch.heads}
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
    return norm


def empty_weights():
    """A context in which models are built with their parameters on the meta device (no
    memory) and their buffers (rotary frequencies) real: accelerate's
    ``init_empty_weights(include_buffers=False)``."""
    # deferred: accelerate (with transformers) loads only when a model is built
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def new_model(model: nn.Module, config, seed: int, match: Match, *, empty: bool = False
              ) -> nn.Module:
    """The grown model of ``model``'s class built from ``config`` (weights left
    uninitialised; ``empty``: on the meta device)."""
    try:  # deferred: transformers is heavy, and only building a model needs this
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with no_init_weights(), (empty_weights() if empty else contextlib.nullcontext()):
            new = type(model)(config)
    # modules the source was built without (a BertModel without pooler) are left out too
    src_base, new_base = base_model(model, match), base_model(new, match)
    for name in match.arch.optional:
        if getattr(src_base, name, None) is None and getattr(new_base, name, None) is not None:
            setattr(new_base, name, None)
    if empty and hasattr(new, "tie_weights"):  # its tied names are read from the tensors' ids
        new.tie_weights()
    return new


def grown_config(config, arch: Architecture, plan: GrowthPlan):
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


def prepare_growth(model: nn.Module, *, hidden_size: int | None = None,
                   num_layers: int | None = None, num_heads: int | None = None,
                   intermediate_size: int | None = None, seed: int = 0,
                   noise_std: float | None = None, method: str = "lemon",
                   dtype: torch.dtype | None = None, empty: bool = False) -> Growth:
    """Plan the expansion of ``model`` (whose parameters may be on the meta device) and build
    the grown model (``empty``: on the meta device). ``dtype``: the source's weights' dtype
    (default: its first parameter's)."""
    plan = plan_expansion(model, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, intermediate_size=intermediate_size, method=method)
    match = architecture_of(model, method="LEMON")
    arch = match.arch
    config = model.config
    dtype = dtype or next(model.parameters()).dtype
    tied = tied_reader(model)
    tied_norm = _tied_norm(arch, match.prefix, tied)
    std = noise_std if noise_std is not None else float(
        getattr(config, "initializer_range", 0.02)) * arch.noise_scale
    new_config = grown_config(config, arch, plan)
    new = new_model(model, new_config, seed, match, empty=empty)
    return Growth(plan=plan, match=match, config=config, new_config=new_config, new_model=new,
                  new_shapes={k: tuple(v.shape) for k, v in new.state_dict().items()},
                  tied=tied, tied_norm=tied_norm, std=std, seed=int(seed), method=method,
                  work=torch.float64 if dtype == torch.float64 else torch.float32)


def consumed_keys(g: Growth, shapes: Mapping[str, tuple[int, ...]]) -> set[str]:
    """The source tensors the rules expand (``shapes``: the source's name -> shape)."""
    arch, prefix = g.arch, g.prefix
    d = g.plan.hidden[0]
    keys: set[str] = {prefix + name for name, _ in arch.writers if prefix + name in shapes}
    for norm in (arch.embedding_norm, arch.final_norm):
        if norm and prefix + norm + ".weight" in shapes:
            keys |= _suffixes(prefix + norm)
    for head in arch.heads:
        key = g.head_key(head)
        shape = shapes.get(key + ".weight")
        if shape is None or len(shape) != 2 or shape[1] != d:
            continue
        keys |= _suffixes(key)
        if head.kind == "dense" and head.norm:
            keys |= _suffixes((prefix if head.base else "") + head.norm)
    for i in range(g.plan.layers[0]):
        for module in (*arch.layer_modules(), *arch.layer_norms()):
            keys |= _suffixes(f"{prefix}{arch.layers}.{i}.{module}")
    if g.tied is not None:
        keys.add(g.tied + ".weight")
    return keys


def check_layout(g: Growth, shapes: Mapping[str, tuple[int, ...]]) -> set[str]:
    """Refuse a dense head that is not hidden -> hidden (or normalised, at a width that is not
    a multiple), a source tensor the rules do not expand that lies in a layer or whose shape
    the growth changes (nothing has been read or written yet); returns the tensors the rules
    expand (the others are copied as they are)."""
    consumed = consumed_keys(g, shapes)
    d = g.plan.hidden[0]
    for head in g.arch.heads:
        key = g.head_key(head)
        shape = shapes.get(key + ".weight")
        if head.kind != "dense" or shape is None or len(shape) != 2 or shape[1] != d:
            continue
        if shape[0] != d:
            raise UpcycleError(f"model: tensor {key + '.weight'!r} {tuple(shape)}: expected a "
                               f"({d}, {d}) hidden -> hidden projection")
        if head.norm and g.plan.r:
            nkey = (g.prefix if head.base else "") + head.norm
            raise UpcycleError(f"model: tensor {nkey + '.weight'!r} normalises the head's "
                               f"hidden vector; LEMON grows it losslessly only to multiples "
                               f"of the hidden size ({d})")
    layer_prefix = f"{g.prefix}{g.arch.layers}."
    title = g.arch.title
    for key, shape in shapes.items():
        if key in consumed:
            continue
        if key.startswith(layer_prefix):
            raise UpcycleError(f"model: tensor {key!r} in a {title} layer is not one LEMON "
                               f"knows how to expand")
        if g.new_shapes.get(key) != tuple(shape):
            raise UpcycleError(f"model: tensor {key!r} {tuple(shape)} depends on the "
                               f"model size but is not one LEMON knows how to expand "
                               f"({title}: a head or module missing from its entry in "
                               f"upcycle.models.families)")
    return consumed


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a source with a NaN or Inf weight, naming the tensor: growing it would spread
    the value and the lossless check could not vouch for the result."""
    for key, value in state.items():
        check_finite_tensor(key, value)


def check_finite_tensor(key: str, value: torch.Tensor, label: str = "model") -> None:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = "NaN" if bool(torch.isnan(value).any()) else "Inf"
        raise UpcycleError(f"{label}: tensor {key!r} contains {bad} values; a model with "
                           f"non-finite weights cannot be grown")
