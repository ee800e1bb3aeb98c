"""SHERL: memory-efficient transfer with an early and a late route (Diao et al., ECCV 2024).

The backbone's early layers run under ``no_grad``; their outputs (the *taps*) are fused by one
Multi-Tiered Sensing Adapter (MTSA) with an anti-redundancy weighting, and the fused feature
goes through the last ``late_layers`` pretrained layers, the final norm and the model's own
classification head. Gradients flow head -> late layers -> MTSA and stop there, so training
keeps the taps and one or two layers' activations instead of every layer's internals.

Usage::

    from upcycle.tune.sherl import SherlConfig, get_sherl_model, SherlModel

    model = get_sherl_model(hf_classifier, SherlConfig(late_layers=1, reduction=4))
    model.print_trainable_parameters()
    logits = model(input_ids=ids, attention_mask=mask).logits   # same call as the HF model
    model.save_pretrained("sherl-out")                          # trainable part only
    again = SherlModel.from_pretrained(fresh_hf_classifier, "sherl-out")

Backbone families (BERT/MiniLM-style encoders, RoBERTa, ViT, GPT-2) are described declaratively by a
:class:`BackboneFamily` (where the embeddings, the layer list, the final norm and the head
live; how a layer takes its mask). One wrapper serves them all; :func:`register_family` adds
another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UpcycleError
from .common import check_tensor_shapes, load_adapter, save_adapter, trainable_report

METHOD = "sherl"
GATE_TEMPERATURE = 0.1
"""The skip gate is ``tanh(gamma / GATE_TEMPERATURE)`` (spec: 0.1)."""
WEIGHT_EPS = 1e-6
"""The L1 normaliser of the tap weights: ``alpha_i = a_i / (sum_k |a_k| + WEIGHT_EPS)``."""
IGNORED_ARGUMENTS = frozenset({"use_cache"})
"""Keyword arguments that change nothing for a classifier (no key/value cache is returned)."""


# ---------------------------------------------------------------------------------------------
# Backbone families: where things live in a HF classification model
# ---------------------------------------------------------------------------------------------
def _get(model: nn.Module, path: str | None):
    if path is None:
        return None
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _embed_bert(model: nn.Module, inputs: dict) -> torch.Tensor:
    """BERT-style encoders (BERT, RoBERTa): the backbone's ``embeddings`` module."""
    return model.base_model.embeddings(input_ids=inputs.get("input_ids"),
                                 token_type_ids=inputs.get("token_type_ids"),
                                 position_ids=inputs.get("position_ids"),
                                 inputs_embeds=inputs.get("inputs_embeds"))


def _embed_vit(model: nn.Module, inputs: dict) -> torch.Tensor:
    pixels = inputs["pixel_values"]
    weight = model.vit.embeddings.patch_embeddings.projection.weight
    return model.vit.embeddings(pixels.to(weight.dtype),
                                interpolate_pos_encoding=bool(inputs.get("interpolate_pos_encoding")))


def _embed_gpt2(model: nn.Module, inputs: dict) -> torch.Tensor:
    tr = model.transformer
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        embeds = tr.wte(inputs["input_ids"])
    positions = inputs.get("position_ids")
    if positions is None:
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    hidden = embeds + tr.wpe(positions)
    if inputs.get("token_type_ids") is not None:
        hidden = hidden + tr.wte(inputs["token_type_ids"])
    return tr.drop(hidden)


def _head_bert(model: nn.Module, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
    return model.classifier(model.dropout(model.bert.pooler(hidden)))


def _head_sequence(model: nn.Module, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Heads that take the whole sequence (RoBERTa's classification head pools <s> itself)."""
    return model.classifier(hidden)


def _head_cls(model: nn.Module, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
    return model.classifier(hidden[:, 0, :])


def _head_last_token(model: nn.Module, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
    """GPT-2: the score of the last real token (by the attention mask, else by pad_token_id,
    else the last position)."""
    logits = model.score(hidden)
    batch, length = logits.shape[:2]
    positions = torch.arange(length, device=logits.device)
    mask = inputs.get("attention_mask")
    ids, pad = inputs.get("input_ids"), model.config.pad_token_id
    if mask is not None:
        last = (positions * mask.to(logits.device).long()).argmax(-1)
    elif ids is not None and pad is not None:
        last = (positions * (ids != pad).to(logits.device).long()).argmax(-1)
    else:
        last = torch.full((batch,), length - 1, device=logits.device, dtype=torch.long)
    return logits[torch.arange(batch, device=logits.device), last]


@dataclass(frozen=True)
class BackboneFamily:
    """Where a family's parts live inside its HF classification model.

    Adding a family means filling one of these in and passing it to :func:`register_family`:
    dotted attribute paths for the layer list, the final norm and the head modules, a function
    that turns the model inputs into the embedding output, one that applies the head to the
    final hidden states, and how a layer takes its attention mask.
    """

    name: str
    """Human name used in messages and saved configs ('bert', 'vit', 'gpt2')."""
    model_types: tuple[str, ...]
    """``config.model_type`` values this description covers."""
    inputs: str
    """'text' (input_ids/attention_mask) or 'image' (pixel_values)."""
    embed: Callable[[nn.Module, dict], torch.Tensor]
    """``embed(model, inputs) -> hidden (B, T, d)``: the embedding output (tap 0)."""
    layers: str
    """Dotted path of the ``nn.ModuleList`` of Transformer layers."""
    final_norm: str | None
    """Dotted path of the norm applied after the last layer (None: post-LN models like BERT)."""
    head_modules: tuple[str, ...]
    """Dotted paths of the head's modules (trained with the MTSA)."""
    head: Callable[[nn.Module, torch.Tensor, dict], torch.Tensor]
    """``head(model, hidden, inputs) -> logits`` on the final-normed hidden states."""
    mask: str | None = "padding"
    """The attention mask layers get: 'padding' (B,1,1,T), 'causal' (B,1,T,T), None (no mask)."""
    mask_argument: str | None = "attention_mask"
    """Keyword through which a layer takes its mask (None: the layer takes no mask)."""
    hidden_size_attr: str = "hidden_size"
    num_layers_attr: str = "num_hidden_layers"


FAMILIES: dict[str, BackboneFamily] = {}


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Make a backbone family available to SHERL (and LST) by its ``model_types``."""
    FAMILIES[family.name] = family
    return family


register_family(BackboneFamily(
    name="bert", model_types=("bert",), inputs="text", embed=_embed_bert,
    layers="bert.encoder.layer", final_norm=None, head_modules=("bert.pooler", "classifier"),
    head=_head_bert, mask="padding"))
register_family(BackboneFamily(
    name="roberta", model_types=("roberta", "xlm-roberta"), inputs="text", embed=_embed_bert,
    layers="roberta.encoder.layer", final_norm=None, head_modules=("classifier",),
    head=_head_sequence, mask="padding"))
register_family(BackboneFamily(
    name="vit", model_types=("vit",), inputs="image", embed=_embed_vit,
    layers="vit.encoder.layer", final_norm="vit.layernorm", head_modules=("classifier",),
    head=_head_cls, mask=None, mask_argument=None))
register_family(BackboneFamily(
    name="gpt2", model_types=("gpt2",), inputs="text", embed=_embed_gpt2,
    layers="transformer.h", final_norm="transformer.ln_f", head_modules=("score",),
    head=_head_last_token, mask="causal"))


def family_of(model: nn.Module) -> BackboneFamily:
    """The registered family of a HF classification model; a clear error when unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            try:
                _get(model, family.layers)
                for path in family.head_modules:
                    _get(model, path)
            except AttributeError as exc:
                raise UpcycleError(
                    f"model {type(model).__name__}: a {family.name} backbone, but not the "
                    f"classification model expected ({exc}); load it with "
                    f"upcycle.tasks.ClassificationTask.load_model() or AutoModelFor*Classification"
                ) from exc
            return family
    supported = ", ".join(f"{f.name} (model_type {'/'.join(f.model_types)})"
                          for f in FAMILIES.values())
    raise UpcycleError(
        f"model {type(model).__name__} (model_type {model_type!r}): unsupported backbone for "
        f"SHERL; supported families: {supported}. To add one, describe it with "
        f"upcycle.tune.sherl.BackboneFamily (where its embeddings, layer list, final norm and "
        f"head live, and how a layer takes its mask) and call register_family()")


class Backbone:
    """A HF classification model seen through its family description: embed, run one layer,
    finish (final norm + head). Shared by SHERL and LST."""

    def __init__(self, model: nn.Module, family: BackboneFamily | None = None):
        self.model = model
        self.family = family or family_of(model)
        self.layers: nn.ModuleList = _get(model, self.family.layers)
        self.final_norm: nn.Module | None = _get(model, self.family.final_norm)
        config = model.config
        self.hidden_size = int(getattr(config, self.family.hidden_size_attr))
        self.num_layers = len(self.layers)
        self.num_labels = int(getattr(config, "num_labels", 0) or 0)

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for path in self.family.head_modules:
            for name, p in _get(self.model, path).named_parameters():
                out.append((f"{path}.{name}", p))
        return out

    def check_inputs(self, inputs: dict) -> None:
        if self.family.inputs == "image":
            if inputs.get("pixel_values") is None:
                raise UpcycleError(f"a {self.family.name} model needs pixel_values")
        elif inputs.get("input_ids") is None and inputs.get("inputs_embeds") is None:
            raise UpcycleError(f"a {self.family.name} model needs input_ids (or inputs_embeds)")

    def token_mask(self, inputs: dict, hidden: torch.Tensor) -> torch.Tensor | None:
        """(B, T) bool, True at real tokens; None when every token is real."""
        mask = inputs.get("attention_mask") if self.family.inputs == "text" else None
        if mask is None:
            return None
        if mask.shape != hidden.shape[:2]:
            raise UpcycleError(f"attention_mask has shape {tuple(mask.shape)}, expected "
                               f"{tuple(hidden.shape[:2])} (batch, tokens)")
        mask = mask.to(hidden.device).bool()
        return None if bool(mask.all()) else mask

    def layer_mask(self, token_mask: torch.Tensor | None, hidden: torch.Tensor):
        """The additive mask the family's layers expect (None: no masking needed)."""
        kind = self.family.mask
        if kind is None or token_mask is None:
            return None  # causal models apply causality themselves when no mask is given
        neg = torch.finfo(hidden.dtype).min
        if kind == "padding":
            allowed = token_mask[:, None, None, :]
        elif kind == "causal":
            length = hidden.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
            diag = torch.eye(length, dtype=torch.bool, device=hidden.device)
            # a token may always see itself, so rows of padded queries never go all -inf
            allowed = (causal[None] & token_mask[:, None, :]) | diag[None]
            allowed = allowed[:, None]
        else:
            raise UpcycleError(f"backbone family {self.family.name}: unknown mask kind {kind!r}")
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~allowed, neg)

    def frozen_route(self, inputs: dict, num_layers: int, taps: Sequence[int]):
        """Embed and run the first ``num_layers`` layers under ``no_grad``.

        Returns (the hidden states at ``taps`` (0 = embedding output, i = output of layer i),
        detached; the output of layer ``num_layers``; the (B, T) token mask or None; the
        layers' attention mask or None). No autograd graph is built.
        """
        wanted = set(taps)
        with torch.no_grad():
            hidden = self.family.embed(self.model, inputs)
            token_mask = self.token_mask(inputs, hidden)
            mask = self.layer_mask(token_mask, hidden)
            kept = [hidden] if 0 in wanted else []
            for i in range(num_layers):
                hidden = self.run_layer(i, hidden, mask)
                if i + 1 in wanted:
                    kept.append(hidden)
        return [t.detach() for t in kept], hidden.detach(), token_mask, mask

    def run_layer(self, index: int, hidden: torch.Tensor, mask) -> torch.Tensor:
        layer = self.layers[index]
        arg = self.family.mask_argument
        out = layer(hidden) if arg is None else layer(hidden, **{arg: mask})
        return out[0] if isinstance(out, (tuple, list)) else out

    def finish(self, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return self.family.head(self.model, hidden, inputs)


def classifier_output(logits: torch.Tensor, labels: torch.Tensor | None, num_labels: int,
                      num_items_in_batch=None):
    """A HF-style output object with ``.logits`` (and ``.loss`` when labels are given).

    The loss is the mean over the batch, or, given ``num_items_in_batch`` (what
    ``transformers.Trainer`` passes under gradient accumulation), the sum divided by it, as
    HF models do, so that accumulated micro-batches add up to the mean of the whole batch.
    """
    from transformers.modeling_outputs import SequenceClassifierOutput

    loss = None
    if labels is not None:
        labels = labels.to(logits.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        if num_labels == 1 and labels.is_floating_point():
            loss = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction=reduction)
        else:
            loss = F.cross_entropy(logits.float(), labels.long(), reduction=reduction)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
    return SequenceClassifierOutput(loss=loss, logits=logits)


# ---------------------------------------------------------------------------------------------
# The Multi-Tiered Sensing Adapter
# ---------------------------------------------------------------------------------------------
class MTSA(nn.Module):
    """Fuses K+1 detached taps into the input of the first late layer.

    Per tap i: ``u_i = ReLU(W1_i h_i + b1_i)`` (d -> d'), ``z_i = (W2_i u_i + b2_i + u_i) *
    sigmoid(W3_i u_i + b3_i)``. Guide ``g = z_K`` (deepest tap), shallow set ``S`` = the others.
    Per token: redundancy ``rho_i = sum_{j in S} ReLU(cos(z_i, z_j))``, guided score ``s_i =
    w.(z_i * g) + b``, ``a_i = ReLU(s_i) / rho_i``, ``alpha_i = a_i / (sum_k |a_k| + 1e-6)``,
    ``e = sum_S alpha_i z_i + g`` and ``x = W_o ReLU(e) + b_o + tanh(gamma / 0.1) * h_last``.
    Padded tokens get zero weights (``e = g`` there).
    """

    def __init__(self, hidden_size: int, num_taps: int, reduction: int, init_std: float = 0.02):
        super().__init__()
        if num_taps < 1:
            raise UpcycleError(f"MTSA needs at least one tap, got {num_taps}")
        if reduction < 1 or hidden_size % reduction:
            raise UpcycleError(f"reduction {reduction} does not divide the hidden size "
                               f"{hidden_size} (d' = d / reduction must be an integer)")
        inner = hidden_size // reduction
        self.hidden_size, self.inner_size, self.num_taps = hidden_size, inner, num_taps
        self.down = nn.ModuleList(nn.Linear(hidden_size, inner) for _ in range(num_taps))  # W1
        self.mix = nn.ModuleList(nn.Linear(inner, inner) for _ in range(num_taps))  # W2
        self.gate = nn.ModuleList(nn.Linear(inner, inner) for _ in range(num_taps))  # W3
        # the guided score exists only when there is a shallow tap to weigh
        self.score = nn.Linear(inner, 1) if num_taps > 1 else None  # w, b
        self.up = nn.Linear(inner, hidden_size)  # W_o
        self.skip_gate = nn.Parameter(torch.zeros(()))  # gamma
        self.init_std = init_std
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, self.init_std)
                module.bias.zero_()
        self.skip_gate.zero_()

    def project(self, index: int, tap: torch.Tensor) -> torch.Tensor:
        """``z_i``: the gated residual MLP of tap ``index`` (d -> d')."""
        u = F.relu(self.down[index](tap))
        return (self.mix[index](u) + u) * torch.sigmoid(self.gate[index](u))

    def weights(self, shallow: torch.Tensor, guide: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """alpha (S, B, T) from shallow z's (S, B, T, d') and the guide (B, T, d')."""
        unit = F.normalize(shallow, dim=-1, eps=1e-8)
        cosine = torch.einsum("ibtd,jbtd->ibtj", unit, unit)  # (S, B, T, S)
        redundancy = F.relu(cosine).sum(-1).clamp_min(1e-6)  # rho_i, includes j = i
        scores = self.score(shallow * guide).squeeze(-1)  # s_i
        raw = F.relu(scores) / redundancy  # a_i
        if token_mask is not None:
            raw = raw * token_mask.to(raw.dtype)  # padded tokens: no weight (e = g)
        return raw / (raw.abs().sum(0, keepdim=True) + WEIGHT_EPS)

    def forward(self, taps: Sequence[torch.Tensor], h_last: torch.Tensor,
                token_mask: torch.Tensor | None = None, return_weights: bool = False):
        if len(taps) != self.num_taps:
            raise UpcycleError(f"MTSA built for {self.num_taps} taps, got {len(taps)}")
        zs = [self.project(i, tap) for i, tap in enumerate(taps)]
        guide = zs[-1]
        alpha = None
        if len(zs) > 1:
            shallow = torch.stack(zs[:-1])
            alpha = self.weights(shallow, guide, token_mask)
            fused = (alpha.unsqueeze(-1) * shallow).sum(0) + guide
        else:
            fused = guide
        x = self.up(F.relu(fused)) + torch.tanh(self.skip_gate / GATE_TEMPERATURE) * h_last
        return (x, alpha) if return_weights else x


# ---------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------
@dataclass
class SherlConfig:
    late_layers: int = field(default=1, metadata={"help": (
        "M: how many of the last pretrained layers form the late route (1 <= M < layers).")})
    taps: list[int] | None = field(default=None, metadata={"help": (
        "Which hidden states feed the MTSA: 0 = the embedding output, i = the output of early "
        "layer i (1..layers-M). Default: all of them. The deepest chosen tap is the guide.")})
    reduction: int = field(default=4, metadata={"help": (
        "d' = hidden size / reduction: the MTSA's inner width (must divide the hidden size).")})
    train_late_layers: bool = field(default=False, metadata={"help": (
        "Also train the late pretrained layers (the reference keeps them frozen).")})
    init_std: float = field(default=0.02, metadata={"help": (
        "Standard deviation of the MTSA linears' normal init (biases start at 0).")})

    @classmethod
    def from_dict(cls, data: dict, source: str = "SHERL config") -> SherlConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UpcycleError(f"{source}: unknown field {unknown[0]!r} (known: {sorted(known)})")
        return cls(**data)


def _resolve_taps(config: SherlConfig, num_layers: int) -> list[int]:
    if not isinstance(config.late_layers, int) or isinstance(config.late_layers, bool) \
            or not 1 <= config.late_layers < num_layers:
        raise UpcycleError(f"late_layers must be an integer with 1 <= late_layers < {num_layers} "
                           f"(the backbone's number of layers), got {config.late_layers!r}")
    early = num_layers - config.late_layers
    if config.taps is None:
        return list(range(early + 1))
    taps = [int(t) for t in config.taps]
    if not taps:
        raise UpcycleError("taps: expected at least one tap index")
    bad = [t for t in taps if not 0 <= t <= early]
    if bad:
        raise UpcycleError(f"taps: index {bad[0]} is out of range; with {num_layers} layers and "
                           f"late_layers={config.late_layers} the taps are 0 (embedding output) "
                           f"to {early} (output of the last early layer)")
    if len(set(taps)) != len(taps):
        raise UpcycleError(f"taps: duplicate index in {taps}")
    return sorted(taps)


class SherlModel(nn.Module):
    """A HF classification model with SHERL's early route, MTSA and late route.

    Call it like the wrapped model (``input_ids``/``attention_mask``/``token_type_ids`` or
    ``pixel_values``); it returns an object with ``.logits`` (and ``.loss`` given ``labels``).
    """

    def __init__(self, model: nn.Module, config: SherlConfig):
        super().__init__()
        if not isinstance(config, SherlConfig):
            raise UpcycleError(f"config: expected a SherlConfig, got {type(config).__name__}")
        backbone = Backbone(model, family_of(model))
        if config.reduction is None or int(config.reduction) < 1 \
                or backbone.hidden_size % int(config.reduction):
            raise UpcycleError(f"reduction {config.reduction!r} does not divide the hidden size "
                               f"{backbone.hidden_size} (d' = d / reduction must be an integer)")
        self.tap_indices = _resolve_taps(config, backbone.num_layers)
        self.config = config
        self.base = model
        self._backbone = backbone
        self.num_early = backbone.num_layers - config.late_layers
        self.mtsa = MTSA(backbone.hidden_size, len(self.tap_indices), int(config.reduction),
                         config.init_std)
        param = next(model.parameters())
        self.mtsa.to(device=param.device, dtype=param.dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in self.trainable_base_parameters():
            p.requires_grad_(True)

    # -- structure ----------------------------------------------------------------------------
    @property
    def family(self) -> BackboneFamily:
        return self._backbone.family

    def trainable_base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name in ``self.base``, parameter) of the head and, if trained, the late layers."""
        out = self._backbone.head_parameters()
        if self.config.train_late_layers:
            for i in range(self.num_early, self._backbone.num_layers):
                for name, p in self._backbone.layers[i].named_parameters():
                    out.append((f"{self.family.layers}.{i}.{name}", p))
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What save_pretrained writes: the MTSA, the head (and late layers when trained)."""
        state = {f"mtsa.{k}": v for k, v in self.mtsa.state_dict().items()}
        state.update({f"base.{name}": p for name, p in self.trainable_base_parameters()})
        return state

    def print_trainable_parameters(self) -> None:
        print(trainable_report(self))

    def describe(self) -> dict:
        b = self._backbone
        return {"family": b.family.name, "model_type": b.model.config.model_type,
                "hidden_size": b.hidden_size, "num_layers": b.num_layers,
                "num_labels": b.num_labels}

    # -- forward ------------------------------------------------------------------------------
    def early_route(self, inputs: dict):
        """(taps, h_last, token_mask, layer_mask), all computed without autograd."""
        return self._backbone.frozen_route(inputs, self.num_early, self.tap_indices)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                pixel_values=None, inputs_embeds=None, labels=None, return_dict=None,
                interpolate_pos_encoding=None, num_items_in_batch=None, **unused):
        """The wrapped model's call: ``.logits`` (and ``.loss`` given ``labels``).
        ``num_items_in_batch`` (passed by ``transformers.Trainer``) normalises the loss."""
        rest = {k: v for k, v in unused.items()
                if v is not None and v is not False and k not in IGNORED_ARGUMENTS}
        if rest:
            raise UpcycleError(f"SherlModel.forward: unsupported argument {min(rest)!r}")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "token_type_ids": token_type_ids, "position_ids": position_ids,
                  "pixel_values": pixel_values, "inputs_embeds": inputs_embeds,
                  "interpolate_pos_encoding": interpolate_pos_encoding}
        b = self._backbone
        b.check_inputs(inputs)
        taps, h_last, token_mask, mask = self.early_route(inputs)
        hidden = self.mtsa(taps, h_last, token_mask)
        for i in range(self.num_early, b.num_layers):
            hidden = b.run_layer(i, hidden, mask)
        logits = b.finish(hidden, inputs)
        return classifier_output(logits, labels, b.num_labels, num_items_in_batch)

    # -- save / load --------------------------------------------------------------------------
    def save_pretrained(self, out, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (trainable part only)."""
        config = {**asdict(self.config), "taps": list(self.tap_indices), "base": self.describe()}
        return save_adapter(out, METHOD, config, self.trainable_state_dict(), overwrite=overwrite,
                            base_model=self.base)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, folder) -> SherlModel:
        """Rebuild a SHERL model on ``base_model`` from a folder written by save_pretrained."""
        raw, tensors = load_adapter(folder, METHOD)
        saved_base = raw.pop("base", None)
        source = f"SHERL weights in {folder}"
        config = SherlConfig.from_dict(raw, source=f"{folder}/adapter_config.json")
        family = family_of(base_model)
        here = Backbone(base_model, family)
        if saved_base is not None:
            mismatch = [(k, saved_base.get(k), v) for k, v in
                        (("family", family.name), ("hidden_size", here.hidden_size),
                         ("num_layers", here.num_layers), ("num_labels", here.num_labels))
                        if saved_base.get(k) != v]
            if mismatch:
                what = ", ".join(f"{k} {saved!r} (base model: {now!r})"
                                 for k, saved, now in mismatch)
                raise UpcycleError(f"{source} were trained on another backbone: {what}")
        model = cls(base_model, config)
        expected = model.trainable_state_dict()
        check_tensor_shapes(expected, tensors, source)
        with torch.no_grad():
            for name, target in expected.items():
                target.copy_(tensors[name].to(target.dtype))
        return model


def get_sherl_model(model: nn.Module, config: SherlConfig | None = None) -> SherlModel:
    """Wrap a HF classification model (BERT/MiniLM, ViT, GPT-2) for SHERL training.

    Freezes every backbone parameter except the head (and the late layers when
    ``config.train_late_layers``); the new MTSA is trainable.
    """
    return SherlModel(model, config or SherlConfig())


def config_help() -> dict[str, str]:
    """Field name -> help text (for CLIs)."""
    return {f.name: f.metadata.get("help", "") for f in fields(SherlConfig)}


__all__ = [
    "FAMILIES",
    "GATE_TEMPERATURE",
    "MTSA",
    "Backbone",
    "BackboneFamily",
    "SherlConfig",
    "SherlModel",
    "config_help",
    "family_of",
    "get_sherl_model",
    "register_family",
]
