"""THE map of model families: where a HuggingFace Transformer keeps each of its parts.

One :class:`Architecture` entry per family says, as data: the embeddings (which tensors write
to the residual stream, the embedding norm, how positions are handled), the layer list, each
layer's attention (q, k, v separate or fused, with the fused layout, and the output
projection), the MLP (plain or gated, fused or not), the norms (LayerNorm/RMSNorm, pre/post),
the final norm, the task heads and poolers, and the config fields that change when the model
grows in width and depth (including per-layer lists such as ``layer_types``).

Every method reads this one map: LEMON (:mod:`upcycle.grow.lemon`) expands the tensors it
names, SNELL takes its default target modules and fused slice layouts from
:func:`snell_target_modules` / :func:`fused_layouts`, SHERL runs the backbone piecewise with
:func:`embed`, :func:`layer_list`, :func:`call_layer` and :func:`final_norm_module`. Adding a
family is one entry in :data:`ARCHITECTURES` (see :func:`register`) plus its tests.

Families are found by ``config.model_type``; a model whose type is unknown but whose tensors
have exactly the layout of a family marked ``clone_match`` (Llama-shaped decoders, say) is
matched by that structure (:func:`architecture_of`), and the caller is told so
(``Match.by_structure``) so it can verify the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import UpcycleError

# -- the description ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fused:
    """A projection whose output rows hold several parts.

    ``layout`` "stacked": the parts one after another ([q; k; v] as GPT-2's ``c_attn`` and
    Phi-3's ``qkv_proj``, [gate; up] as Phi-3's ``gate_up_proj``); "interleaved": per head,
    the parts of that head one after another ([q_0; k_0; v_0; q_1; ...] as GPT-NeoX's
    ``query_key_value``, which has as many key/value heads as query heads).
    """

    module: str
    parts: tuple[str, ...]
    layout: str = "stacked"


@dataclass(frozen=True)
class Attention:
    """Layer-relative module paths. Either q/k/v, or ``qkv`` (a :class:`Fused`)."""

    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: Fused | None = None

    def modules(self) -> tuple[str, ...]:
        qkv = (self.qkv.module,) if self.qkv else (self.q, self.k, self.v)
        return (*qkv, self.o)


@dataclass(frozen=True)
class MLP:
    """Layer-relative module paths. ``inputs``: the modules reading the MLP input (fc1; gated:
    gate and up, in that order), or ``fused`` ([gate; up] in one projection)."""

    down: str
    inputs: tuple[str, ...] = ()
    fused: Fused | None = None
    gated: bool = False

    def modules(self) -> tuple[str, ...]:
        return (*((self.fused.module,) if self.fused else self.inputs), self.down)


@dataclass(frozen=True)
class Head:
    """A module outside the layers that reads the stream (model-relative path, or
    base-relative with ``base``).

    kind "reader": a linear whose output does not grow (classifier, score, qa_outputs, a
    language-model head, ViT's pooler with its fixed ``pooler_output_size``); "dense": a
    hidden -> hidden linear followed by an activation with f(0) = 0 (BERT's pooler, RoBERTa's
    classifier.dense, DistilBERT's pre_classifier, an MLM transform), its output grows with the
    hidden size. ``norm``: a LayerNorm after the dense (MLM transform). ``reads``: for a reader,
    the head module whose output it reads (None: the final stream).
    """

    path: str
    kind: str = "reader"
    base: bool = False
    norm: str | None = None
    reads: str | None = None


@dataclass(frozen=True)
class Dims:
    """Config field names of the dimensions (None: the family has no such field)."""

    hidden: str = "hidden_size"
    layers: str = "num_hidden_layers"
    heads: str = "num_attention_heads"
    kv_heads: str | None = None
    intermediate: str = "intermediate_size"
    eps: str | None = "layer_norm_eps"
    """The norms' epsilon (None: hard-coded in the modeling code, as DistilBERT's 1e-12)."""
    head_dim: str | None = None
    """An explicit head_dim field (Llama-style); otherwise head_dim = hidden / heads."""
    per_layer: tuple[str, ...] = ()
    """Config lists with one entry per layer (Qwen2's ``layer_types``): a grown layer takes
    the entry of the layer it comes from."""


@dataclass(frozen=True)
class LayerCall:
    """How one layer is called (what SHERL needs to run layers one by one).

    ``mask``: the attention mask a layer takes: "padding" (additive (B, 1, 1, T)), "causal"
    (additive (B, 1, T, T)), None (no mask); ``mask_argument``: the keyword it goes through
    (None: the layer takes no mask); ``rotary``: the base-relative rotary module whose
    ``(hidden, position_ids)`` call gives the ``position_embeddings`` (cos, sin) every layer
    needs; ``token_mask_eager``: the layer takes the (B, T) 0/1 mask under eager attention
    (DistilBERT). A layer returns a tensor or a tuple whose first item is the hidden states.
    """

    mask: str | None = "padding"
    mask_argument: str | None = "attention_mask"
    rotary: str | None = None
    position_ids: bool = False
    token_mask_eager: bool = False
    sliding_window: str | None = None
    """The config field of the sliding-window width (Mistral, Phi-3, Qwen2): under eager/SDPA
    attention HF applies the window through the mask alone, so :func:`layer_mask` must build
    it (see :func:`layer_windows`; a config ``layer_types`` list picks the windowed layers)."""


@dataclass(frozen=True)
class Architecture:
    """One family of HF Transformers, described as data (see the module docstring)."""

    name: str
    title: str
    """Human name for messages ("BERT/MiniLM")."""
    model_types: tuple[str, ...]
    anchor: str
    """A base-relative tensor every model of the family has (finds the base prefix)."""
    embed: str
    """How :func:`embed` builds the layer input: "module" (the base's ``embeddings`` module
    takes input_ids/token_type_ids/position_ids/inputs_embeds), "distilbert", "vit" (pixel
    values), "token+position" (GPT-2: wte + wpe + drop), "token" (rotary decoders)."""
    writers: tuple[tuple[str, int], ...]
    """Base-relative tensors that write the stream, with the axis holding the hidden size."""
    token_embedding: str | None
    """The base-relative input embedding module (a tied LM head shares its weight)."""
    positions: str
    """"absolute" (learned position embeddings among the writers), "rotary", "patch+absolute"."""
    layers: str
    """Base-relative ``nn.ModuleList`` of layers: tensors ``{layers}.{i}.``."""
    attention: Attention
    mlp: MLP
    norm: str
    """"layernorm" (mean and variance, with bias) or "rmsnorm" (no mean, no bias)."""
    post_ln: bool
    """Post-LN (original BERT): the norm follows each residual addition."""
    attn_norm: str
    """Layer-relative: pre-LN, the norm before attention; post-LN, the norm after it."""
    mlp_norm: str
    parallel_residual: str | bool = False
    """x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX); a config field name when configurable."""
    embedding_norm: str | None = None
    final_norm: str | None = None
    heads: tuple[Head, ...] = ()
    optional: tuple[str, ...] = ()
    """Base-relative modules a model may be built without (BERT's pooler)."""
    classify: str = "last"
    """How the family's *ForSequenceClassification head reads the final hidden states (see
    :func:`classification_logits`): "pooler" (BERT: the base's pooler on token 0, dropout,
    ``classifier``), "head" (RoBERTa: ``classifier`` reads the sequence), "first" (ViT:
    ``classifier`` on token 0), "pre_classifier" (DistilBERT: ``pre_classifier``, ReLU,
    dropout, ``classifier`` on token 0), "last" (decoders: ``score`` at the last token that is
    not ``pad_token_id``)."""
    dims: Dims = field(default_factory=Dims)
    call: LayerCall = field(default_factory=LayerCall)
    conv1d: bool = False
    """Linear weights stored (in, out) as in GPT-2's Conv1D."""
    noise_scale: float = 1.0
    """LEMON: multiplies initializer_range for the symmetry-breaking noise (BERT recipe 0.1)."""
    clone_match: bool = False
    """Models with an unknown model_type and exactly this tensor layout are matched to it."""

    # -- derived views ----------------------------------------------------------------------
    def layer_modules(self) -> tuple[str, ...]:
        """Layer-relative paths of the linear modules of a layer (attention, then MLP)."""
        return (*self.attention.modules(), *self.mlp.modules())

    def layer_norms(self) -> tuple[str, str]:
        return (self.attn_norm, self.mlp_norm)


# -- shared head sets -------------------------------------------------------------------------

_COMMON_READERS = (Head("classifier"), Head("score"), Head("qa_outputs"))

# -- the families ----------------------------------------------------------------------------

BERT = Architecture(
    name="bert", title="BERT/MiniLM", model_types=("bert",),
    anchor="embeddings.word_embeddings.weight", embed="module",
    writers=(("embeddings.word_embeddings.weight", 1),
             ("embeddings.position_embeddings.weight", 1),
             ("embeddings.token_type_embeddings.weight", 1)),
    token_embedding="embeddings.word_embeddings", positions="absolute",
    layers="encoder.layer",
    attention=Attention(q="attention.self.query", k="attention.self.key",
                        v="attention.self.value", o="attention.output.dense"),
    mlp=MLP(inputs=("intermediate.dense",), down="output.dense"),
    norm="layernorm", post_ln=True,
    attn_norm="attention.output.LayerNorm", mlp_norm="output.LayerNorm",
    embedding_norm="embeddings.LayerNorm",
    heads=(Head("pooler.dense", kind="dense", base=True),
           Head("cls.predictions.transform.dense", kind="dense",
                norm="cls.predictions.transform.LayerNorm"),
           Head("cls.predictions.decoder", reads="cls.predictions.transform.dense"),
           Head("cls.seq_relationship", reads="pooler.dense"),
           Head("classifier", reads="pooler.dense"), Head("qa_outputs")),
    optional=("pooler",), classify="pooler", noise_scale=0.1,
)

ROBERTA = replace(
    BERT, name="roberta", title="RoBERTa", model_types=("roberta", "xlm-roberta"),
    classify="head",
    heads=(Head("pooler.dense", kind="dense", base=True),
           Head("classifier.dense", kind="dense"),
           Head("classifier.out_proj", reads="classifier.dense"),
           Head("lm_head.dense", kind="dense", norm="lm_head.layer_norm"),
           Head("lm_head.decoder", reads="lm_head.dense"),
           Head("classifier"), Head("qa_outputs")),
)

DISTILBERT = Architecture(
    name="distilbert", title="DistilBERT", model_types=("distilbert",),
    anchor="embeddings.word_embeddings.weight", embed="distilbert",
    writers=(("embeddings.word_embeddings.weight", 1),
             ("embeddings.position_embeddings.weight", 1)),
    token_embedding="embeddings.word_embeddings", positions="absolute",
    layers="transformer.layer",
    attention=Attention(q="attention.q_lin", k="attention.k_lin", v="attention.v_lin",
                        o="attention.out_lin"),
    mlp=MLP(inputs=("ffn.lin1",), down="ffn.lin2"),
    norm="layernorm", post_ln=True, attn_norm="sa_layer_norm", mlp_norm="output_layer_norm",
    embedding_norm="embeddings.LayerNorm",
    heads=(Head("pre_classifier", kind="dense"), Head("classifier", reads="pre_classifier"),
           Head("qa_outputs"),
           Head("vocab_transform", kind="dense", norm="vocab_layer_norm"),
           Head("vocab_projector", reads="vocab_transform")),
    dims=Dims(hidden="dim", layers="n_layers", heads="n_heads", intermediate="hidden_dim",
              eps=None),
    call=LayerCall(mask="padding", mask_argument="attn_mask", token_mask_eager=True),
    classify="pre_classifier", noise_scale=0.1,
)

VIT = Architecture(
    name="vit", title="ViT", model_types=("vit",),
    anchor="embeddings.cls_token", embed="vit",
    writers=(("embeddings.cls_token", 2), ("embeddings.mask_token", 2),
             ("embeddings.position_embeddings", 2),
             ("embeddings.patch_embeddings.projection.weight", 0),
             ("embeddings.patch_embeddings.projection.bias", 0)),
    token_embedding=None, positions="patch+absolute",
    layers="encoder.layer",
    attention=Attention(q="attention.attention.query", k="attention.attention.key",
                        v="attention.attention.value", o="attention.output.dense"),
    mlp=MLP(inputs=("intermediate.dense",), down="output.dense"),
    norm="layernorm", post_ln=False, attn_norm="layernorm_before", mlp_norm="layernorm_after",
    final_norm="layernorm",
    # the pooler's output size is its own config field (pooler_output_size): it stays
    heads=(Head("pooler.dense", base=True), Head("classifier")),
    optional=("pooler",), classify="first",
    call=LayerCall(mask=None, mask_argument=None),
)

GPT2 = Architecture(
    name="gpt2", title="GPT-2", model_types=("gpt2",),
    anchor="wte.weight", embed="token+position",
    writers=(("wte.weight", 1), ("wpe.weight", 1)),
    token_embedding="wte", positions="absolute",
    layers="h",
    attention=Attention(qkv=Fused("attn.c_attn", ("q", "k", "v")), o="attn.c_proj"),
    mlp=MLP(inputs=("mlp.c_fc",), down="mlp.c_proj"),
    norm="layernorm", post_ln=False, attn_norm="ln_1", mlp_norm="ln_2", final_norm="ln_f",
    heads=(Head("lm_head"), *_COMMON_READERS),
    dims=Dims(hidden="n_embd", layers="n_layer", heads="n_head", intermediate="n_inner",
              eps="layer_norm_epsilon"),
    call=LayerCall(mask="causal"),
    conv1d=True,
)

LLAMA = Architecture(
    name="llama", title="Llama", model_types=("llama",),
    anchor="embed_tokens.weight", embed="token",
    writers=(("embed_tokens.weight", 1),),
    token_embedding="embed_tokens", positions="rotary",
    layers="layers",
    attention=Attention(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                        o="self_attn.o_proj"),
    mlp=MLP(inputs=("mlp.gate_proj", "mlp.up_proj"), down="mlp.down_proj", gated=True),
    norm="rmsnorm", post_ln=False,
    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", final_norm="norm",
    heads=(Head("lm_head"), *_COMMON_READERS),
    dims=Dims(kv_heads="num_key_value_heads", eps="rms_norm_eps", head_dim="head_dim",
              per_layer=("layer_types",)),
    call=LayerCall(mask="causal", rotary="rotary_emb", position_ids=True,
                   sliding_window="sliding_window"),
    clone_match=True,
)

MISTRAL = replace(LLAMA, name="mistral", title="Mistral", model_types=("mistral",),
                  clone_match=False)
QWEN2 = replace(LLAMA, name="qwen2", title="Qwen2", model_types=("qwen2",), clone_match=False)

PHI3 = replace(
    LLAMA, name="phi3", title="Phi-3", model_types=("phi3",),
    attention=Attention(qkv=Fused("self_attn.qkv_proj", ("q", "k", "v")), o="self_attn.o_proj"),
    mlp=MLP(fused=Fused("mlp.gate_up_proj", ("gate", "up")), down="mlp.down_proj", gated=True),
    clone_match=False,
)

GPT_NEOX = Architecture(
    name="gpt_neox", title="GPT-NeoX", model_types=("gpt_neox",),
    anchor="embed_in.weight", embed="token",
    writers=(("embed_in.weight", 1),),
    token_embedding="embed_in", positions="rotary",
    layers="layers",
    attention=Attention(qkv=Fused("attention.query_key_value", ("q", "k", "v"),
                                  layout="interleaved"), o="attention.dense"),
    mlp=MLP(inputs=("mlp.dense_h_to_4h",), down="mlp.dense_4h_to_h"),
    norm="layernorm", post_ln=False, parallel_residual="use_parallel_residual",
    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
    final_norm="final_layer_norm",
    heads=(Head("embed_out"), *_COMMON_READERS),
    call=LayerCall(mask="causal", rotary="rotary_emb", position_ids=True),
)

ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add (or replace) a family. Its model_types must not belong to another family."""
    for other in ARCHITECTURES.values():
        clash = set(other.model_types) & set(arch.model_types)
        if other.name != arch.name and clash:
            raise UpcycleError(f"architecture {arch.name!r}: model_type {sorted(clash)[0]!r} "
                               f"already belongs to {other.name!r}")
    ARCHITECTURES[arch.name] = arch
    return arch


for _arch in (BERT, ROBERTA, DISTILBERT, VIT, GPT2, LLAMA, MISTRAL, QWEN2, PHI3, GPT_NEOX):
    register(_arch)


def supported() -> str:
    """"BERT/MiniLM (bert), RoBERTa (roberta, xlm-roberta), ..." for messages."""
    return ", ".join(f"{a.title} ({', '.join(a.model_types)})" for a in ARCHITECTURES.values())


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
    norm = _get(layer_list(model, Match(arch, prefix))[0], arch.attn_norm)
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
        f"family, describe it in upcycle.models.architectures (one Architecture entry)")


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


# -- what SHERL reads: running the backbone piecewise ---------------------------------------------


def _get(root: nn.Module, path: str | None):
    if path is None:
        return None
    obj = root
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


def base_model(model: nn.Module, match: Match | None = None) -> nn.Module:
    match = match or architecture_of(model)
    return _get(model, match.prefix.rstrip(".")) if match.prefix else model


def layer_list(model: nn.Module, match: Match | None = None) -> nn.ModuleList:
    match = match or architecture_of(model)
    return _get(base_model(model, match), match.arch.layers)


def final_norm_module(model: nn.Module, match: Match | None = None) -> nn.Module | None:
    """The norm after the last layer (None for post-LN families)."""
    match = match or architecture_of(model)
    return _get(base_model(model, match), match.arch.final_norm)


def embed(model: nn.Module, inputs: dict, match: Match | None = None) -> torch.Tensor:
    """The input of the first layer, (B, T, d), as the HF model computes it."""
    match = match or architecture_of(model)
    base, kind = base_model(model, match), match.arch.embed
    if kind == "module":
        return base.embeddings(input_ids=inputs.get("input_ids"),
                               token_type_ids=inputs.get("token_type_ids"),
                               position_ids=inputs.get("position_ids"),
                               inputs_embeds=inputs.get("inputs_embeds"))
    if kind == "distilbert":
        return base.embeddings(inputs.get("input_ids"), inputs.get("inputs_embeds"))
    if kind == "vit":
        pixels = inputs["pixel_values"]
        weight = base.embeddings.patch_embeddings.projection.weight
        return base.embeddings(pixels.to(weight.dtype),
                               interpolate_pos_encoding=bool(
                                   inputs.get("interpolate_pos_encoding")))
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        embeds = _get(base, match.arch.token_embedding)(inputs["input_ids"])
    if kind == "token+position":
        positions = inputs.get("position_ids")
        if positions is None:
            positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        hidden = embeds + base.wpe(positions)
        if inputs.get("token_type_ids") is not None:
            hidden = hidden + base.wte(inputs["token_type_ids"])
        return base.drop(hidden)
    for name in ("emb_dropout", "dropout", "drop"):
        drop = getattr(base, name, None)
        if isinstance(drop, nn.Dropout):
            return drop(embeds)
    return embeds


def layer_windows(model: nn.Module, match: Match | None = None) -> list[int | None]:
    """The sliding-window width of each layer (None: full attention), as HF's own forward
    applies it: ``config.<call.sliding_window>`` for every layer, or, when the config has a
    ``layer_types`` list, only for its "sliding_attention" layers (Qwen2)."""
    match = match or architecture_of(model)
    count = len(layer_list(model, match))
    field_name = match.arch.call.sliding_window
    window = getattr(model.config, field_name, None) if field_name else None
    if window is None:
        return [None] * count
    types = getattr(model.config, "layer_types", None)
    if types is None:
        return [int(window)] * count
    return [int(window) if t == "sliding_attention" else None for t in types]


def layer_mask(model: nn.Module, hidden: torch.Tensor, token_mask: torch.Tensor | None,
               match: Match | None = None, window: int | None = None):
    """The attention mask the family's layers take, built from the (B, T) token mask
    (1 = real token; None = all real). Causal families always get an explicit causal mask
    (eager attention applies none by itself); ``window`` (from :func:`layer_windows`) limits
    it to the last ``window`` positions, as HF's sliding-window mask does."""
    match = match or architecture_of(model)
    call = match.arch.call
    if call.mask is None:
        return None
    batch, length = hidden.shape[:2]
    if call.token_mask_eager and getattr(model.config, "_attn_implementation", "eager") != "sdpa":
        if token_mask is None:
            return torch.ones(batch, length, device=hidden.device)
        return token_mask.to(hidden.device).long()
    real = (torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
            if token_mask is None else token_mask.to(hidden.device).bool())
    if call.mask == "padding":
        if token_mask is None:
            return None
        allowed = real[:, None, None, :]
    else:
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        if window is not None:  # HF: kv_idx > q_idx - sliding_window
            causal = causal & ~torch.ones_like(causal).tril(-int(window))
        diag = torch.eye(length, dtype=torch.bool, device=hidden.device)
        allowed = ((causal[None] & real[:, None, :]) | diag[None])[:, None]
    neg = torch.finfo(hidden.dtype).min
    return torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
        ~allowed, neg)


def layer_kwargs(model: nn.Module, hidden: torch.Tensor, mask, position_ids=None,
                 match: Match | None = None) -> dict:
    """Keyword arguments for calling any layer of the model on ``hidden`` (mask from
    :func:`layer_mask`; rotary families get ``position_embeddings`` and ``position_ids``).
    Compute once per forward and reuse for every layer."""
    match = match or architecture_of(model)
    call = match.arch.call
    kwargs = {}
    if call.mask_argument is not None:
        kwargs[call.mask_argument] = mask
    if call.rotary:
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        rotary = _get(base_model(model, match), call.rotary)
        kwargs["position_embeddings"] = rotary(hidden, position_ids)
    if call.position_ids:
        kwargs["position_ids"] = position_ids if position_ids is not None else \
            torch.arange(hidden.shape[1], device=hidden.device)[None]
    return kwargs


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run one layer with :func:`layer_kwargs`; returns the hidden states."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


_CLASSIFIER_PARTS = {"pooler": ("classifier", "dropout", "{base}pooler"), "head": ("classifier",),
                     "first": ("classifier",),
                     "pre_classifier": ("pre_classifier", "dropout", "classifier"),
                     "last": ("score",)}


def classifier_modules(model: nn.Module, match: Match | None = None) -> list[str]:
    """The dotted names of the modules :func:`classification_logits` reads; an UpcycleError
    when ``model`` lacks one (it is not the family's *ForSequenceClassification /
    *ForImageClassification model)."""
    match = match or architecture_of(model)
    names = [part.format(base=match.prefix) for part in _CLASSIFIER_PARTS[match.arch.classify]]
    missing = [n for n in names if not isinstance(_get_or_none(model, n), nn.Module)]
    if missing:
        kind = "image" if match.arch.embed == "vit" else "sequence"
        raise UpcycleError(
            f"model {type(model).__name__}: a {match.arch.title} model without the module "
            f"{missing[0]!r} that its {kind} classification head needs; load it with "
            f"AutoModelFor{kind.title()}Classification (or upcycle.tasks.ClassificationTask"
            f".load_model())")
    return names


def _get_or_none(root: nn.Module, path: str):
    try:
        return _get(root, path)
    except AttributeError:
        return None


def classification_logits(model: nn.Module, hidden: torch.Tensor, inputs: dict,
                          match: Match | None = None) -> torch.Tensor:
    """The logits of the model's sequence (or image) classification head from the final
    hidden states (after the final norm), as HF's *ForSequenceClassification computes them."""
    match = match or architecture_of(model)
    kind = match.arch.classify
    if kind == "pooler":
        return model.classifier(model.dropout(base_model(model, match).pooler(hidden)))
    if kind == "head":
        return model.classifier(hidden)
    if kind == "first":
        return model.classifier(hidden[:, 0, :])
    if kind == "pre_classifier":
        pooled = nn.functional.relu(model.pre_classifier(hidden[:, 0]))
        return model.classifier(model.dropout(pooled))
    logits = model.score(hidden)
    batch, length = logits.shape[:2]
    ids, pad = inputs.get("input_ids"), getattr(model.config, "pad_token_id", None)
    if ids is not None and pad is not None:
        positions = torch.arange(length, device=logits.device, dtype=torch.int32)
        last = (positions * (ids != pad).to(logits.device, torch.int32)).argmax(-1)
    else:
        last = torch.full((batch,), length - 1, device=logits.device, dtype=torch.long)
    return logits[torch.arange(batch, device=logits.device), last]


__all__ = [
    "ARCHITECTURES", "Architecture", "Attention", "Dims", "Fused", "FusedLayout", "Head",
    "LayerCall", "MLP", "Match", "Sizes", "architecture_of", "base_model", "base_prefix",
    "call_layer", "classification_logits", "classifier_modules", "embed", "eps_of", "final_norm_module", "fused_layouts", "layer_kwargs",
    "layer_list", "layer_mask", "layer_windows", "model_fused_layouts", "register", "sizes_of",
    "snell_target_modules", "supported",
]
