"""One small architecture map per model family: which tensors write to the residual stream,
which read a norm, where the layers are and what the config calls each dimension.

The expansion rules in :mod:`upcycle.grow.lemon` are written once against this description;
adding a family is adding one :class:`Family` entry (and, if its tensors are stored oddly,
a reader/writer pair for its attention, like GPT-2's fused ``c_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UpcycleError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    norm: str
    """"layernorm" (mean and variance) or "rmsnorm" (no mean, no bias)."""
    post_ln: bool
    """Post-LN (original BERT): the norm follows each residual addition."""
    anchor: str
    """A tensor every model of the family has, relative to the base model (finds the prefix)."""
    layers: str
    """The layer list, relative to the base model: ``{layers}.{i}.``."""
    attn: dict[str, str]
    """Canonical attention tensors -> module path in a layer: q, k, v, o (or qkv for fused)."""
    mlp_in: tuple[str, ...]
    """Modules reading the MLP input (fc1; SwiGLU: gate and up, replicated together)."""
    mlp_out: str
    attn_norm: str
    mlp_norm: str
    writers: tuple[tuple[str, int], ...]
    """Base-relative tensors that write to the stream, with the axis that holds the hidden size."""
    stream_norms: tuple[str, ...] = ()
    """Base-relative norms outside the layers (embedding norm, final norm)."""
    final_norm: str | None = None
    """The norm whose output the (possibly tied) head reads."""
    readers: tuple[str, ...] = ()
    """Model-relative linear modules reading the final stream (classifier, untied lm_head)."""
    pooler: str | None = None
    """Base-relative pooler (dense + tanh): reads the stream, output kept as copies."""
    conv1d: bool = False
    """Weights stored (in, out) as in GPT-2's Conv1D."""
    hidden_key: str = "hidden_size"
    layers_key: str = "num_hidden_layers"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = None
    intermediate_key: str = "intermediate_size"
    eps_key: str = "layer_norm_eps"
    noise_scale: float = 1.0
    """Multiplies the initializer range for the symmetry-breaking noise (BERT recipe: 0.1)."""
    dropout_keys: tuple[str, ...] = field(default_factory=tuple)


BERT = Family(
    name="bert", model_types=("bert",), norm="layernorm", post_ln=True,
    anchor="embeddings.word_embeddings.weight", layers="encoder.layer",
    attn={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "o": "attention.output.dense"},
    mlp_in=("intermediate.dense",), mlp_out="output.dense",
    attn_norm="attention.output.LayerNorm", mlp_norm="output.LayerNorm",
    writers=(("embeddings.word_embeddings.weight", 1),
             ("embeddings.position_embeddings.weight", 1),
             ("embeddings.token_type_embeddings.weight", 1)),
    stream_norms=("embeddings.LayerNorm",),
    readers=("classifier",), pooler="pooler.dense", noise_scale=0.1,
)

VIT = Family(
    name="vit", model_types=("vit",), norm="layernorm", post_ln=False,
    anchor="embeddings.cls_token", layers="encoder.layer",
    attn={"q": "attention.attention.query", "k": "attention.attention.key",
          "v": "attention.attention.value", "o": "attention.output.dense"},
    mlp_in=("intermediate.dense",), mlp_out="output.dense",
    attn_norm="layernorm_before", mlp_norm="layernorm_after",
    writers=(("embeddings.cls_token", 2), ("embeddings.mask_token", 2),
             ("embeddings.position_embeddings", 2),
             ("embeddings.patch_embeddings.projection.weight", 0),
             ("embeddings.patch_embeddings.projection.bias", 0)),
    stream_norms=("layernorm",), final_norm="layernorm", readers=("classifier",),
    pooler="pooler.dense",
)

GPT2 = Family(
    name="gpt2", model_types=("gpt2",), norm="layernorm", post_ln=False,
    anchor="wte.weight", layers="h",
    attn={"qkv": "attn.c_attn", "o": "attn.c_proj"},
    mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", attn_norm="ln_1", mlp_norm="ln_2",
    writers=(("wte.weight", 1), ("wpe.weight", 1)),
    stream_norms=("ln_f",), final_norm="ln_f", readers=("lm_head", "score"), conv1d=True,
    hidden_key="n_embd", layers_key="n_layer", heads_key="n_head", intermediate_key="n_inner",
    eps_key="layer_norm_epsilon",
)

LLAMA = Family(
    name="llama", model_types=("llama",), norm="rmsnorm", post_ln=False,
    anchor="embed_tokens.weight", layers="layers",
    attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "o": "self_attn.o_proj"},
    mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
    writers=(("embed_tokens.weight", 1),),
    stream_norms=("norm",), final_norm="norm", readers=("lm_head", "score"),
    kv_heads_key="num_key_value_heads", eps_key="rms_norm_eps",
)

FAMILIES = {f.name: f for f in (BERT, VIT, GPT2, LLAMA)}
SUPPORTED = "HF BERT/MiniLM (bert), ViT (vit), GPT-2 (gpt2), Llama (llama)"


def family_of(model: nn.Module) -> Family:
    """The family of a HuggingFace model (by ``config.model_type``), or a clear error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise UpcycleError(
        f"model: unsupported family {model_type or type(model).__name__!r}; LEMON supports "
        f"{SUPPORTED}"
    )


def base_prefix(state: dict[str, torch.Tensor], fam: Family) -> str:
    """The prefix of the base model inside a task model ('' for BertModel, 'bert.', ...)."""
    hits = [k[: -len(fam.anchor)] for k in state if k.endswith(fam.anchor)]
    hits = [h for h in hits if h == "" or h.endswith(".")]
    if not hits:
        raise UpcycleError(f"model: a {fam.name} model without {fam.anchor!r}; is it really "
                           f"{fam.name}?")
    return min(hits, key=len)


def eps_of(config, fam: Family) -> float:
    return float(getattr(config, fam.eps_key))


def intermediate_of(config, fam: Family) -> int:
    value = getattr(config, fam.intermediate_key, None)
    if value is None:  # GPT-2: n_inner None means 4 x n_embd
        value = 4 * getattr(config, fam.hidden_key)
    return int(value)


def kv_heads_of(config, fam: Family) -> int:
    heads = int(getattr(config, fam.heads_key))
    if fam.kv_heads_key is None:
        return heads
    value = getattr(config, fam.kv_heads_key, None)
    return heads if value is None else int(value)


def head_dim_of(config, fam: Family) -> int:
    explicit = getattr(config, "head_dim", None) if fam.name == "llama" else None
    if explicit:
        return int(explicit)
    return int(getattr(config, fam.hidden_key)) // int(getattr(config, fam.heads_key))
