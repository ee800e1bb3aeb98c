"""THE map of model families: where a HuggingFace Transformer keeps each of its parts.

One :class:`Architecture` entry per family says, as data: the embeddings (which tensors write
to the residual stream, the embedding norm, how positions are handled), the layer list, each
layer's attention (q, k, v separate or fused, with the fused layout, and the output
projection), the MLP (plain or gated, fused or not), the norms (LayerNorm/RMSNorm, pre/post),
the final norm, the task heads and poolers, and the config fields that change when the model
grows in width and depth (including per-layer lists such as ``layer_types``).

Every method reads this one map: LEMON (:mod:`upcycle.grow.lemon`) expands the tensors it
names, SNELL takes its default target modules and fused slice layouts from
:func:`upcycle.models.matching.snell_target_modules` / :func:`~upcycle.models.matching.fused_layouts`,
SHERL and LST run the backbone piecewise with :mod:`upcycle.models.backbone`. Adding a family is
one entry in :data:`ARCHITECTURES` (see :func:`register`) plus its tests.

Families are found by ``config.model_type``; a model whose type is unknown but whose tensors
have exactly the layout of a family marked ``clone_match`` (Llama-shaped decoders, say) is
matched by that structure (:func:`upcycle.models.matching.architecture_of`), and the caller is
told so (``Match.by_structure``) so it can verify the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    # transformers 5: an additive mask as BERT's, under every attention (4.x: attn_mask, and
    # the (B, T) 0/1 mask under eager)
    call=LayerCall(mask="padding", mask_argument="attention_mask"),
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
    # transformers 5's layout (its files keep 4.x's encoder.layer.N.attention.attention.query...:
    # save_pretrained/from_pretrained rename them)
    layers="layers",
    attention=Attention(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                        o="attention.o_proj"),
    mlp=MLP(inputs=("mlp.fc1",), down="mlp.fc2"),
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
    heads=(Head("lm_head"), *_COMMON_READERS),  # transformers 4: embed_out
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



__all__ = [
    "ARCHITECTURES", "Architecture", "Attention", "BERT", "DISTILBERT", "Dims", "Fused",
    "GPT2", "GPT_NEOX", "Head", "LLAMA", "LayerCall", "MISTRAL", "MLP", "PHI3", "QWEN2",
    "ROBERTA", "VIT", "register", "supported",
]
