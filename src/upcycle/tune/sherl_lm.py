"""SHERL's route inside a HF causal LM (``*ForCausalLM``/``*LMHeadModel``), by module hooks.

The HF model runs its own forward (its masks, rotary embeddings, sliding windows, KV cache,
final norm, LM head and causal-LM loss); while :meth:`DecoderRoute.active` is on, hooks on its
decoder layers change only what SHERL changes:

* the input of layer 0 switches autograd off: the early layers run under ``no_grad``;
* the input of each early layer ``i`` (= the embedding output for ``i = 0``, the output of
  layer ``i - 1`` otherwise) is kept, detached, when ``i`` is a tap;
* the input of the first late layer (``h_last``, the output of the last early layer) is
  replaced by ``fuse(taps, h_last, token_mask)`` (the MTSA) with autograd back on.

The hooks sit on the layers' ``__call__``, outside transformers' activation checkpointing
(which wraps ``forward``), so checkpointing the late layers recomputes only them. The MTSA is a
per-token function, so under ``generate()`` each new token needs only its own early-layer
outputs and both routes use the KV cache as the plain model does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

LM_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm_model(model: nn.Module) -> bool:
    """A HF causal LM: its class is a ``*ForCausalLM``/``*LMHeadModel`` with an LM head."""
    get_head = getattr(model, "get_output_embeddings", None)
    return type(model).__name__.endswith(LM_CLASS_SUFFIXES) and callable(get_head) \
        and get_head() is not None


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class DecoderRoute:
    """SHERL's early route -> ``fuse`` -> late route, inside ``decoder``'s own forward (see
    the module's docstring). ``decoder``: the causal LM's inner model (its ``base_model``,
    e.g. ``LlamaForCausalLM.model``), whose 2-D ``attention_mask`` gives the MTSA its token
    mask; ``layers``: its layers; ``num_early``: how many run frozen; ``taps``: the layer inputs
    kept for ``fuse`` (0 = embedding output, ``i`` = output of layer ``i``, at most
    ``num_early``)."""

    def __init__(self, decoder: nn.Module, layers: nn.ModuleList, num_early: int,
                 taps: Sequence[int], fuse: Callable):
        self.decoder, self.layers, self.num_early = decoder, layers, num_early
        self.taps, self.fuse = frozenset(taps), fuse
        self._state: dict | None = None

    @contextmanager
    def active(self):
        """Hooks on while inside (re-entrant: an inner call reuses the outer hooks)."""
        if self._state is not None:
            yield
            return
        grad = torch.is_grad_enabled()
        self._state = {"kept": [], "grad": grad, "mask": None}
        handles = [self.decoder.register_forward_pre_hook(self._record_mask, with_kwargs=True)]
        handles += [self.layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True)
                    for i in range(self.num_early + 1)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._state = None
            torch.set_grad_enabled(grad)

    def _record_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._state["mask"] = mask if torch.is_tensor(mask) and mask.ndim == 2 else None
        self._state["grad"] = torch.is_grad_enabled()

    def _token_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The (B, T) mask of the tokens in ``hidden`` (the last T columns of the 2-D
        attention mask, which covers the cached tokens too); None when all are real."""
        mask = self._state["mask"]
        if mask is None or mask.shape[0] != hidden.shape[0] or mask.shape[1] < hidden.shape[1]:
            return None
        mask = mask[:, mask.shape[1] - hidden.shape[1]:].to(hidden.device).bool()
        return None if bool(mask.all()) else mask

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            state = self._state
            hidden = _hidden_of(args, kwargs)
            if index == 0:
                state["kept"] = []
                torch.set_grad_enabled(False)
            if index in self.taps:
                state["kept"].append(hidden.detach())
            if index < self.num_early:
                return None
            torch.set_grad_enabled(state["grad"])
            taps, state["kept"] = state["kept"], []
            fused = self.fuse(taps, hidden.detach(), self._token_mask(hidden))
            return _with_hidden(args, kwargs, fused)
        return hook




class RoutedDecoder:
    """The inner decoder as seen through :class:`DecoderRoute`: calling it runs the SHERL
    route and returns the decoder's own output (``last_hidden_state``, the cache). What TRL
    calls as ``model.base_model`` (its fused LM-head loss); other attributes are the
    decoder's."""

    def __init__(self, route: DecoderRoute):
        self._route = route

    def __call__(self, *args, **kwargs):
        with self._route.active():
            return self._route.decoder(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._route.decoder, name)


__all__ = ["DecoderRoute", "LM_CLASS_SUFFIXES", "RoutedDecoder", "is_causal_lm_model"]
