"""The piecewise backbone runner: a HF model's embedding, layers and head called one piece at
a time (SHERL, LST, the LEMON checks), from the architecture map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UpcycleError
from .architectures import (
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

IGNORED_ARGUMENTS = frozenset({"use_cache"})
"""Keyword arguments that change nothing for a classifier (no key/value cache is returned)."""


# ---------------------------------------------------------------------------------------------
# The backbone, run piecewise through the architecture map
# ---------------------------------------------------------------------------------------------
EXACT_ATTENTION = ("eager", "sdpa")
"""Attention implementations that take the explicit additive masks SHERL builds."""


class Backbone:
    """A HF classification model run piecewise as :mod:`upcycle.models.architectures` describes its
    family: embed, run one layer, finish (final norm + the model's own classification head).
    Shared by SHERL and LST; every family of the map is supported (see
    :func:`upcycle.models.architectures.supported`), a new family is one entry there."""

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
