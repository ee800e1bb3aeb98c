"""The piecewise backbone runner: a HF model's embedding, layers and head called one piece at
a time (SHERL, LST, the LEMON checks), from the architecture map
(:mod:`upcycle.models.families`).

The functions (:func:`embed`, :func:`layer_list`, :func:`layer_mask`, :func:`layer_kwargs`,
:func:`call_layer`, :func:`final_norm_module`, :func:`classification_logits`, ...) do each
piece for any family; :class:`Backbone` holds them together for one model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UpcycleError
from .families import supported
from .matching import Match, architecture_of, module_at, sizes_of

IGNORED_ARGUMENTS = frozenset({"use_cache"})
"""Keyword arguments that change nothing for a classifier (no key/value cache is returned)."""


# -- the pieces, for any family of the map ------------------------------------------------------

def base_model(model: nn.Module, match: Match | None = None) -> nn.Module:
    match = match or architecture_of(model)
    return module_at(model, match.prefix.rstrip(".")) if match.prefix else model


def layer_list(model: nn.Module, match: Match | None = None) -> nn.ModuleList:
    match = match or architecture_of(model)
    return module_at(base_model(model, match), match.arch.layers)


def final_norm_module(model: nn.Module, match: Match | None = None) -> nn.Module | None:
    """The norm after the last layer (None for post-LN families)."""
    match = match or architecture_of(model)
    return module_at(base_model(model, match), match.arch.final_norm)


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
        embeds = module_at(base, match.arch.token_embedding)(inputs["input_ids"])
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
        rotary = module_at(base_model(model, match), call.rotary)
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
    missing = [n for n in names if not isinstance(_module_or_none(model, n), nn.Module)]
    if missing:
        kind = "image" if match.arch.embed == "vit" else "sequence"
        raise UpcycleError(
            f"model {type(model).__name__}: a {match.arch.title} model without the module "
            f"{missing[0]!r} that its {kind} classification head needs; load it with "
            f"AutoModelFor{kind.title()}Classification (or upcycle.tasks.ClassificationTask"
            f".load_model())")
    return names


def _module_or_none(root: nn.Module, path: str):
    try:
        return module_at(root, path)
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


# -- the backbone, run piecewise through the architecture map ---------------------------------

EXACT_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take the explicit additive masks SHERL builds."""


class Backbone:
    """A HF classification model run piecewise as :mod:`upcycle.models.families` describes its
    family: embed, run one layer, finish (final norm + the model's own classification head).
    Shared by SHERL and LST; every family of the map is supported (see
    :func:`upcycle.models.families.supported`), a new family is one entry there."""

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

    def describe(self) -> dict:
        """What an adapter records about the backbone it was trained on (and checks on
        loading): family, model type, hidden size, layers and labels."""
        return {"family": self.name, "model_type": self.model.config.model_type,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "num_labels": self.num_labels}

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
    # deferred: transformers is heavy and this module is imported by every method
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


__all__ = [
    "EXACT_ATTENTION", "IGNORED_ARGUMENTS", "Backbone", "base_model", "call_layer",
    "classification_logits", "classifier_modules", "classifier_output", "embed",
    "final_norm_module", "layer_kwargs", "layer_list", "layer_mask", "layer_windows",
]
