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

Every family of :mod:`upcycle.architectures` is supported (BERT/MiniLM, RoBERTa, DistilBERT,
ViT, GPT-2, Llama, Mistral, Qwen2, Phi-3, GPT-NeoX, and models laid out exactly like Llama):
the map says where the embeddings, layers, final norm and head live and how a layer is called
(masks, rotary position embeddings, sliding windows). A new family is one entry there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import (
    Architecture,
    Match,
    architecture_of,
    call_layer,
    classification_logits,
    classifier_modules,
    embed,
    final_norm_module,
    layer_kwargs,
    layer_list,
    layer_mask,
    layer_windows,
    sizes_of,
    supported,
)
from ..errors import UpcycleError
from .common import (
    TunerConfig,
    check_tensor_shapes,
    load_adapter,
    save_adapter,
    trainable_report,
)

METHOD = "sherl"
GATE_TEMPERATURE = 0.1
"""The skip gate is ``tanh(gamma / GATE_TEMPERATURE)`` (spec: 0.1)."""
WEIGHT_EPS = 1e-6
"""The L1 normaliser of the tap weights: ``alpha_i = a_i / (sum_k |a_k| + WEIGHT_EPS)``."""
IGNORED_ARGUMENTS = frozenset({"use_cache"})
"""Keyword arguments that change nothing for a classifier (no key/value cache is returned)."""


# ---------------------------------------------------------------------------------------------
# The backbone, run piecewise through the architecture map
# ---------------------------------------------------------------------------------------------
EXACT_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take the explicit additive masks SHERL builds."""


class Backbone:
    """A HF classification model run piecewise as :mod:`upcycle.architectures` describes its
    family: embed, run one layer, finish (final norm + the model's own classification head).
    Shared by SHERL and LST; every family of the map is supported (see
    :func:`upcycle.architectures.supported`), a new family is one entry there."""

    def __init__(self, model: nn.Module, match: Match | None = None, method: str = "SHERL"):
        self.model = model
        self.match = match or architecture_of(model, method=method)
        self.arch = self.match.arch
        self.classifier = classifier_modules(model, self.match)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if self.arch.call.mask is not None and impl not in (None, *EXACT_ATTENTION):
            raise UpcycleError(
                f"model {type(model).__name__}: attention implementation {impl!r}; {method} "
                f"runs the layers one by one with explicit attention masks, which needs "
                f"{' or '.join(map(repr, EXACT_ATTENTION))} (load it with "
                f"attn_implementation='sdpa')")
        self.layers: nn.ModuleList = layer_list(model, self.match)
        self.layers_path = f"{self.match.prefix}{self.arch.layers}"
        self.final_norm: nn.Module | None = final_norm_module(model, self.match)
        self.windows = layer_windows(model, self.match)
        self.hidden_size = sizes_of(model.config, self.arch).hidden
        self.num_layers = len(self.layers)
        self.num_labels = int(getattr(model.config, "num_labels", 0) or 0)
        self.image = self.arch.embed == "vit"
        if self.match.by_structure:
            self._verify_structure_match(method)

    @property
    def name(self) -> str:
        """The family's name in the map ('bert', 'llama', ...)."""
        return self.arch.name

    def head_modules(self) -> list[str]:
        """Dotted names of the family's head modules (``arch.heads``) present in the model."""
        modules = dict(self.model.named_modules())
        present = [f"{self.match.prefix}{h.path}" if h.base else h.path for h in self.arch.heads]
        present = [n for n in dict.fromkeys(present) if n in modules]
        # a head inside another (RoBERTa's classifier.dense in classifier): the outer one
        return [n for n in present if not any(n.startswith(o + ".") for o in present)]

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name in the model, parameter) of the head modules, each parameter once."""
        prefixes = tuple(name + "." for name in self.head_modules())
        return [(n, p) for n, p in self.model.named_parameters() if n.startswith(prefixes)]

    def check_inputs(self, inputs: dict) -> None:
        if self.image:
            if inputs.get("pixel_values") is None:
                raise UpcycleError(f"a {self.arch.title} model needs pixel_values")
        elif inputs.get("input_ids") is None and inputs.get("inputs_embeds") is None:
            raise UpcycleError(f"a {self.arch.title} model needs input_ids (or inputs_embeds)")
        ids = inputs.get("input_ids")
        if self.arch.classify == "last" and ids is not None and ids.ndim == 2 \
                and ids.shape[0] > 1 and getattr(self.model.config, "pad_token_id", None) is None:
            raise UpcycleError(
                f"model {type(self.model).__name__}: its head scores the last token that is not "
                f"pad_token_id, but config.pad_token_id is None and the batch has {ids.shape[0]} "
                f"rows; set model.config.pad_token_id to the tokenizer's pad token id")

    def token_mask(self, inputs: dict, hidden: torch.Tensor) -> torch.Tensor | None:
        """(B, T) bool, True at real tokens; None when every token is real."""
        mask = None if self.image else inputs.get("attention_mask")
        if mask is None:
            return None
        if mask.shape != hidden.shape[:2]:
            raise UpcycleError(f"attention_mask has shape {tuple(mask.shape)}, expected "
                               f"{tuple(hidden.shape[:2])} (batch, tokens)")
        mask = mask.to(hidden.device).bool()
        return None if bool(mask.all()) else mask

    def layer_arguments(self, hidden: torch.Tensor, token_mask: torch.Tensor | None,
                        position_ids=None) -> list[dict]:
        """The keyword arguments of every layer (its mask, rotary ``position_embeddings`` and
        ``position_ids``), built once per forward; layers with the same sliding window share
        one dict."""
        m = self.match
        kwargs = layer_kwargs(self.model, hidden, layer_mask(self.model, hidden, token_mask, m),
                              position_ids, match=m)
        argument = self.arch.call.mask_argument
        by_window: dict[int | None, dict] = {None: kwargs}
        for window in set(self.windows) - {None}:
            by_window[window] = {**kwargs, argument: layer_mask(self.model, hidden, token_mask,
                                                                m, window=window)}
        return [by_window[w] for w in self.windows]

    def frozen_route(self, inputs: dict, num_layers: int, taps: Sequence[int]):
        """Embed and run the first ``num_layers`` layers under ``no_grad``.

        Returns (the hidden states at ``taps`` (0 = embedding output, i = output of layer i),
        detached; the output of layer ``num_layers``; the (B, T) token mask or None; the
        per-layer keyword arguments of :meth:`layer_arguments`). No autograd graph is built.
        """
        wanted = set(taps)
        with torch.no_grad():
            hidden = embed(self.model, inputs, self.match)
            token_mask = self.token_mask(inputs, hidden)
            arguments = self.layer_arguments(hidden, token_mask, inputs.get("position_ids"))
            kept = [hidden] if 0 in wanted else []
            for i in range(num_layers):
                hidden = self.run_layer(i, hidden, arguments)
                if i + 1 in wanted:
                    kept.append(hidden)
        return [t.detach() for t in kept], hidden.detach(), token_mask, arguments

    def run_layer(self, index: int, hidden: torch.Tensor, arguments: list[dict]) -> torch.Tensor:
        return call_layer(self.layers[index], hidden, arguments[index])

    def finish(self, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The final norm (pre-LN families), then the model's classification head."""
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return classification_logits(self.model, hidden, inputs, self.match)

    def logits(self, inputs: dict) -> torch.Tensor:
        """The whole model, piecewise (what SHERL computes with x = h_last)."""
        _, hidden, _, _ = self.frozen_route(inputs, self.num_layers, ())
        return self.finish(hidden, inputs)

    @torch.no_grad()
    def _verify_structure_match(self, method: str) -> None:
        """A model of unknown type matched by tensor layout: its own forward must equal the
        family's piecewise route on a small input, else it is refused."""
        model, config = self.model, self.model.config
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab < 2:
            return
        ids = torch.arange(1, 8, device=next(model.parameters()).device)[None] % vocab
        pad = getattr(config, "pad_token_id", None)
        if pad is not None:
            ids = torch.where(ids == pad, (ids + 1) % vocab, ids)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        was_training = model.training
        model.eval()
        try:
            want = model(**inputs).logits
            got = self.logits(inputs)
        finally:
            model.train(was_training)
        scale = max(1.0, float(want.abs().max()))
        tolerance = 1e-4 if want.dtype in (torch.float32, torch.float64) else 5e-2
        if float((got - want).abs().max()) > tolerance * scale:
            raise UpcycleError(
                f"model: model_type {config.model_type!r} has the tensor layout of "
                f"{self.arch.title} but computes something else (max |difference| "
                f"{float((got - want).abs().max()):.3g}); {method} supports {supported()}")


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
class SherlConfig(TunerConfig):
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
        backbone = Backbone(model)
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
    def family(self) -> Architecture:
        """The backbone's entry in :mod:`upcycle.architectures`."""
        return self._backbone.arch

    def trainable_base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name in ``self.base``, parameter) of the head and, if trained, the late layers."""
        out = self._backbone.head_parameters()
        if self.config.train_late_layers:
            for i in range(self.num_early, self._backbone.num_layers):
                for name, p in self._backbone.layers[i].named_parameters():
                    out.append((f"{self._backbone.layers_path}.{i}.{name}", p))
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
        return {"family": b.name, "model_type": b.model.config.model_type,
                "hidden_size": b.hidden_size, "num_layers": b.num_layers,
                "num_labels": b.num_labels}

    # -- forward ------------------------------------------------------------------------------
    def early_route(self, inputs: dict):
        """(taps, h_last, token_mask, per-layer keyword arguments), computed without
        autograd."""
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
        taps, h_last, token_mask, arguments = self.early_route(inputs)
        hidden = self.mtsa(taps, h_last, token_mask)
        for i in range(self.num_early, b.num_layers):
            hidden = b.run_layer(i, hidden, arguments)
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
        here = Backbone(base_model)
        if saved_base is not None:
            mismatch = [(k, saved_base.get(k), v) for k, v in
                        (("family", here.name), ("hidden_size", here.hidden_size),
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
    """Wrap a HF sequence/image classification model of any family in
    :mod:`upcycle.architectures` for SHERL training.

    Freezes every backbone parameter except the head (and the late layers when
    ``config.train_late_layers``); the new MTSA is trainable.
    """
    return SherlModel(model, config or SherlConfig())


def config_help() -> dict[str, str]:
    """Field name -> help text (for CLIs)."""
    return {f.name: f.metadata.get("help", "") for f in fields(SherlConfig)}


__all__ = [
    "GATE_TEMPERATURE",
    "MTSA",
    "Backbone",
    "SherlConfig",
    "SherlModel",
    "config_help",
    "get_sherl_model",
]
