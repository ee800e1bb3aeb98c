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

Every family of :mod:`upcycle.models.families` is supported (BERT/MiniLM, RoBERTa, DistilBERT,
ViT, GPT-2, Llama, Mistral, Qwen2, Phi-3, GPT-NeoX, and models laid out exactly like Llama):
the map says where the embeddings, layers, final norm and head live and how a layer is called
(masks, rotary position embeddings, sliding windows). A new family is one entry there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UpcycleError
from ..models.backbone import IGNORED_ARGUMENTS, Backbone, classifier_output, layer_list
from ..models.families import ARCHITECTURES, Architecture
from ..models.matching import Match, architecture_of, sizes_of
from ..models.quantized import check_quantized_base, float_dtype
from .adapter import (
    Checkpointing,
    TunerConfig,
    check_recorded_backbone,
    copy_saved_tensors,
    load_adapter,
    save_adapter,
    trainable_report,
)
from .sherl_lm import DecoderRoute, RoutedDecoder, is_causal_lm_model

METHOD = "sherl"
DEFAULT_LR = 3e-3
"""The peak learning rate ``upcycle tune --method sherl`` uses unless told otherwise."""
GATE_TEMPERATURE = 0.1
"""The skip gate is ``tanh(gamma / GATE_TEMPERATURE)`` (spec: 0.1)."""
OPEN_GATE = 1.0
"""gamma of an open gate: tanh(1 / 0.1) = tanh(10) is 1.0 in float32 and bfloat16."""
INITS = ("auto", "base", "paper")
WEIGHT_EPS = 1e-6
"""The L1 normaliser of the tap weights: ``alpha_i = a_i / (sum_k |a_k| + WEIGHT_EPS)``."""


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

    def __init__(self, hidden_size: int, num_taps: int, reduction: int, init_std: float = 0.02,
                 start_as_identity: bool = False):
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
        self.start_as_identity = start_as_identity
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) linears, zero biases, gate closed (the paper); with
        ``start_as_identity`` the gate starts open and W_o at zero, so ``x = h_last``."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, self.init_std)
                module.bias.zero_()
        self.skip_gate.zero_()
        if self.start_as_identity:
            self.up.weight.zero_()
            self.skip_gate.fill_(OPEN_GATE)

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
    """Configuration of a SHERL model.

    Each field's docstring opens with its ``upcycle tune`` help (the first paragraph, up to
    the first blank line), then documents the field; ``metadata`` adjusts the flag (see
    :mod:`upcycle.cli.dataclass_args`)."""

    late_layers: int = field(default=1, metadata={"metavar": "M"})
    """the last M pretrained layers form the late route (default 1)

    M: how many of the last pretrained layers form the late route (1 <= M < layers)."""
    taps: list[int] | None = field(default=None, metadata={"metavar": "I"})
    """hidden states fed to the MTSA: 0 = embedding output, i = output of early layer i
    (default: all of them)

    Which hidden states feed the MTSA: 0 = the embedding output, i = the output of early
    layer i (1..layers-M). Default: all of them. The deepest chosen tap is the guide."""
    reduction: int = 4
    """MTSA inner width = hidden size / reduction (default 4)

    d' = hidden size / reduction: the MTSA's inner width (must divide the hidden size)."""
    train_late_layers: bool = False
    """also train the late pretrained layers (default: frozen)

    Also train the late pretrained layers (the reference keeps them frozen)."""
    init: str = field(default="auto", metadata={"choices": INITS})
    """how the MTSA starts: base (the fresh model computes the base model), paper (gate
    closed), auto (default: base for causal LMs, paper for classifiers)

    "paper": every MTSA linear N(0, init_std), biases 0, skip gate closed (tanh(0) = 0), as
    the reference code; "base": the skip gate open (tanh(10) = 1) and W_o zero, so the fresh
    model's logits are the base model's (for LMs, where drifting from a good base costs
    perplexity); "auto": "base" for a causal LM, "paper" for a classifier (whose head is
    new anyway)."""
    init_std: float = field(default=0.02, metadata={"cli": False})
    """Standard deviation of the MTSA linears' normal init (biases start at 0)."""


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


def _check_sizes(config: SherlConfig, hidden: int, num_layers: int) -> list[int]:
    """The tap indices; an UpcycleError when ``config`` does not fit a backbone of
    ``num_layers`` layers of width ``hidden``."""
    if config.init not in INITS:
        raise UpcycleError(f"init {config.init!r}: expected one of {', '.join(INITS)}")
    if config.reduction is None or int(config.reduction) < 1 or hidden % int(config.reduction):
        raise UpcycleError(f"reduction {config.reduction!r} does not divide the hidden size "
                           f"{hidden} (d' = d / reduction must be an integer)")
    return _resolve_taps(config, num_layers)


def check_model_config(hf_config, config: SherlConfig) -> None:
    """Refuse from the HF config alone (before any weight loads) what :class:`SherlModel`
    would refuse: late layers, taps, reduction or init that do not fit the model. A model
    type outside :mod:`upcycle.models.families` is checked once loaded (it may be laid out
    exactly like a family)."""
    model_type = getattr(hf_config, "model_type", None)
    arch = next((a for a in ARCHITECTURES.values() if model_type in a.model_types), None)
    if arch is not None:
        sizes = sizes_of(hf_config, arch)
        _check_sizes(config, sizes.hidden, sizes.layers)


def _layout(model: nn.Module) -> tuple[Match, nn.ModuleList, int, Backbone | None]:
    """(family match, decoder/encoder layers, hidden size, the piecewise runner of a
    classifier or None for a causal LM)."""
    if is_causal_lm_model(model):
        match = architecture_of(model, method="SHERL")
        return match, layer_list(model, match), sizes_of(model.config, match.arch).hidden, None
    backbone = Backbone(model)
    return backbone.match, backbone.layers, backbone.hidden_size, backbone


def _description(model: nn.Module, match: Match, layers: nn.ModuleList, hidden: int,
                 causal_lm: bool) -> dict:
    return {"family": match.arch.name, "model_type": model.config.model_type,
            "hidden_size": hidden, "num_layers": len(layers),
            "num_labels": 0 if causal_lm else int(getattr(model.config, "num_labels", 0) or 0),
            "head": "causal-lm" if causal_lm else "classification"}


class SherlModel(Checkpointing, nn.Module):
    """A HF classification model or causal LM with SHERL's early route, MTSA and late route.

    Call it like the wrapped model. A classifier (``input_ids``/``attention_mask``/
    ``token_type_ids`` or ``pixel_values``) returns an object with ``.logits`` (and ``.loss``
    given ``labels``). A causal LM runs its own forward with the route switched in by hooks
    (:mod:`upcycle.tune.sherl_lm`): its outputs, HF's causal-LM loss (labels shifted inside),
    ``past_key_values`` and :meth:`generate` (KV cache included) are the HF model's; the LM head
    stays frozen. ``config`` is the wrapped model's config, ``sherl_config`` the SHERL settings.
    Activation checkpointing (``Trainer(gradient_checkpointing=True)``) recomputes the late
    layers in the backward pass; the early route keeps no activations anyway.
    """

    writes_adapter_folder = True
    """``transformers.Trainer.save_model(d)`` (upcycle's trainer) writes the adapter folder."""

    def __init__(self, model: nn.Module, config: SherlConfig):
        super().__init__()
        if not isinstance(config, SherlConfig):
            raise UpcycleError(f"config: expected a SherlConfig, got {type(config).__name__}")
        match, layers, hidden, backbone = _layout(model)
        self.causal_lm = backbone is None
        self.tap_indices = _check_sizes(config, hidden, len(layers))
        if config.init == "auto":
            config = replace(config, init="base" if self.causal_lm else "paper")
        self.sherl_config = config
        self.base = model
        self._backbone = backbone
        self._match = match
        self._description = _description(model, match, layers, hidden, self.causal_lm)
        self.num_early = len(layers) - config.late_layers
        layers_path = f"{match.prefix}{match.arch.layers}"
        late = [f"{layers_path}.{i}" for i in range(self.num_early, len(layers))]
        heads = backbone.head_modules() if backbone is not None else []
        check_quantized_base("SHERL", model, grad_through=late,
                             trained=heads + (late if config.train_late_layers else []))
        self.mtsa = MTSA(hidden, len(self.tap_indices), int(config.reduction), config.init_std,
                         start_as_identity=config.init == "base")
        param = next(model.parameters())
        self.mtsa.to(device=param.device, dtype=float_dtype(model))  # not a packed weight's
        self._route = DecoderRoute(model.base_model, layers, self.num_early, self.tap_indices,
                                   self.mtsa) if self.causal_lm else None
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in self.trainable_base_parameters():
            p.requires_grad_(True)

    # -- structure ----------------------------------------------------------------------------
    @property
    def config(self):
        """The wrapped model's ``transformers`` config (``model.config.id2label`` works as on
        the HF model, and ``Trainer`` and its callbacks read it); SHERL's own settings are
        :attr:`sherl_config`."""
        return self.base.config

    @property
    def _layers(self) -> nn.ModuleList:
        """The wrapped model's layers (not a submodule of this one: no second state-dict
        name)."""
        return layer_list(self.base, self._match)

    @property
    def family(self) -> Architecture:
        """The backbone's entry in :mod:`upcycle.models.families`."""
        return self._match.arch

    def trainable_base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name in ``self.base``, parameter) of a classifier's head and, if trained, the late
        layers (a causal LM's head stays frozen)."""
        out = [] if self.causal_lm else self._backbone.head_parameters()
        if self.sherl_config.train_late_layers:
            path = f"{self._match.prefix}{self._match.arch.layers}"
            for i in range(self.num_early, len(self._layers)):
                for name, p in self._layers[i].named_parameters():
                    out.append((f"{path}.{i}.{name}", p))
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What save_pretrained writes: the MTSA, the head (and late layers when trained)."""
        state = {f"mtsa.{k}": v for k, v in self.mtsa.state_dict().items()}
        state.update({f"base.{name}": p for name, p in self.trainable_base_parameters()})
        return state

    def print_trainable_parameters(self) -> None:
        print(trainable_report(self))

    def describe(self) -> dict:
        return dict(self._description)

    # -- forward ------------------------------------------------------------------------------
    def early_route(self, inputs: dict):
        """A classifier's (taps, h_last, token_mask, per-layer keyword arguments), computed
        without autograd."""
        return self._backbone.frozen_route(inputs, self.num_early, self.tap_indices)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                pixel_values=None, inputs_embeds=None, labels=None, return_dict=None,
                interpolate_pos_encoding=None, num_items_in_batch=None, **unused):
        """The wrapped model's call: ``.logits`` (and ``.loss`` given ``labels``).
        ``num_items_in_batch`` (passed by ``transformers.Trainer``) normalises the loss."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "token_type_ids": token_type_ids, "position_ids": position_ids,
                  "pixel_values": pixel_values, "inputs_embeds": inputs_embeds,
                  "interpolate_pos_encoding": interpolate_pos_encoding}
        if self.causal_lm:
            named = {**inputs, "labels": labels, "return_dict": return_dict,
                     "num_items_in_batch": num_items_in_batch}
            with self._route.active():
                return self.base(**{k: v for k, v in named.items() if v is not None}, **unused)
        rest = {k: v for k, v in unused.items()
                if v is not None and v is not False and k not in IGNORED_ARGUMENTS}
        if rest:
            raise UpcycleError(f"SherlModel.forward: unsupported argument {min(rest)!r}")
        b = self._backbone
        b.check_inputs(inputs)
        taps, h_last, token_mask, arguments = self.early_route(inputs)
        hidden = self.mtsa(taps, h_last, token_mask)
        for i in range(self.num_early, b.num_layers):
            hidden = self.checkpointed(i - self.num_early, b.run_layer, i, hidden, arguments)
        logits = b.finish(hidden, inputs)
        return classifier_output(logits, labels, b.num_labels, num_items_in_batch)

    # -- a causal LM's generation and HF hooks (TRL, Trainer) ---------------------------------
    def _lm(self, what: str) -> nn.Module:
        if not self.causal_lm:
            raise UpcycleError(f"SherlModel.{what}: the wrapped {type(self.base).__name__} is "
                               f"a classifier, not a causal LM")
        return self.base

    def generate(self, *args, **kwargs):
        """The HF model's ``generate`` (KV cache included) through the SHERL route."""
        base = self._lm("generate")
        with self._route.active():
            return base.generate(*args, **kwargs)

    @property
    def base_model(self) -> RoutedDecoder:
        """A causal LM's inner decoder (``LlamaForCausalLM.model``, ...) run through the SHERL
        route, as HF's ``base_model`` is the decoder: calling it returns the
        ``BaseModelOutputWithPast`` whose ``last_hidden_state`` the LM head reads (TRL's
        fused LM-head loss calls it)."""
        if not self.causal_lm:
            raise AttributeError("SherlModel.base_model: the wrapped model is a classifier, "
                                 "not a causal LM (its HF model is .base)")
        return RoutedDecoder(self._route)

    def can_generate(self) -> bool:
        return self.causal_lm and self.base.can_generate()

    @property
    def generation_config(self):
        return getattr(self.base, "generation_config", None)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self._lm("prepare_inputs_for_generation").prepare_inputs_for_generation(
            *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()

    def add_model_tags(self, tags) -> None:
        """Passed to the HF model (TRL tags the models it trains)."""
        if hasattr(self.base, "add_model_tags"):
            self.base.add_model_tags(tags)

    def _set_checkpointing(self, kwargs: dict | None, every_n_layers: int, offload: bool) -> None:
        """A causal LM: transformers' own checkpointing of its layers (the early ones run
        without autograd, so only the late ones are recomputed); a classifier: the late
        layers through :meth:`checkpointed`."""
        if not self.causal_lm:
            return
        if kwargs is None:
            self.base.activation_checkpointing_disable()
        else:
            self.base.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers,
                                                      offload=offload)

    # -- save / load --------------------------------------------------------------------------
    def save_pretrained(self, out, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (trainable part only)."""
        config = {**asdict(self.sherl_config), "taps": list(self.tap_indices),
                  "base": self.describe()}
        return save_adapter(out, METHOD, config, self.trainable_state_dict(), overwrite=overwrite,
                            base_model=self.base)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, folder, *,
                        is_trainable: bool = False) -> SherlModel:
        """Rebuild a SHERL model on ``base_model`` from a folder written by save_pretrained
        (its trainable parts stay trainable; :func:`upcycle.tune.load` freezes them unless
        ``is_trainable``)."""
        raw, tensors = load_adapter(folder, METHOD)
        saved_base = raw.pop("base", None)
        source = f"SHERL weights in {folder}"
        config = SherlConfig.from_dict(raw, source=f"{folder}/adapter_config.json")
        match, layers, hidden, backbone = _layout(base_model)
        here = _description(base_model, match, layers, hidden, backbone is None)
        if saved_base is not None:
            saved_base.setdefault("head", "classification")  # folders written before LMs
        here = {k: here[k] for k in ("head", "family", "hidden_size", "num_layers", "num_labels")}
        check_recorded_backbone(saved_base, here, source)
        model = cls(base_model, config)
        expected = model.trainable_state_dict()
        copy_saved_tensors(expected, tensors, source)
        return model


def get_sherl_model(model: nn.Module, config: SherlConfig | None = None) -> SherlModel:
    """Wrap a HF sequence/image classification model or causal LM of any family in
    :mod:`upcycle.models.families` for SHERL training.

    Freezes every backbone parameter except a classifier's head (and the late layers when
    ``config.train_late_layers``); the new MTSA is trainable.
    """
    return SherlModel(model, config or SherlConfig())


__all__ = [
    "GATE_TEMPERATURE",
    "DEFAULT_LR",
    "MTSA",
    "Backbone",
    "SherlConfig",
    "SherlModel",
    "check_model_config",
    "get_sherl_model",
]
