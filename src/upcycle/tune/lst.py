"""Ladder Side-Tuning (LST, Sung et al., NeurIPS 2022): the baseline SHERL is compared with.

A small side Transformer of width d / reduction is fed by a gated ladder of down-projected,
frozen backbone states (the whole backbone runs under ``no_grad``)::

    s_0 = W_0 h_0
    s_i = Block_i(mu_i * s_{i-1} + (1 - mu_i) * W_i h_i),   mu_i = sigmoid(alpha_i / 0.1)

and no pretrained layer after it: ``W_up LN(s_L)`` goes to the backbone's final norm and its
own classification head. Trainable: the side network and the head. Same call contract as
:class:`upcycle.tune.sherl.SherlModel` (the backbone is run through the same
:mod:`upcycle.models.families` map).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UpcycleError
from ..models.backbone import Backbone, classifier_output, layer_mask
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

METHOD = "lst"
LADDER_TEMPERATURE = 0.1


@dataclass
class LstConfig(TunerConfig):
    """Configuration of an LST side network (field docstrings as in ``SherlConfig``)."""

    reduction: int = 8
    """side width = hidden size / reduction (must divide the hidden size)"""
    num_heads: int | None = None
    """attention heads of the side blocks (default: the largest of 4, 2, 1 dividing the
    width)"""
    init_std: float = 0.02
    """normal init std of the side linears"""


class SideBlock(nn.Module):
    """A pre-LN Transformer block of the side width; takes the backbone's additive mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ff1, self.ff2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=causal and mask is None)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, w))
        return x + self.ff2(F.gelu(self.ff1(self.norm2(x))))


class LadderSideModel(Checkpointing, nn.Module):
    """A HF classification model with a ladder side network; call it like the HF model.
    Activation checkpointing (``Trainer(gradient_checkpointing=True)``) recomputes the side
    blocks in the backward pass; the backbone keeps no activations anyway. ``save_pretrained``
    writes an adapter folder (the side network and the head), ``from_pretrained`` reads it."""

    writes_adapter_folder = True
    """``transformers.Trainer.save_model(d)`` (upcycle's trainer) writes the adapter folder."""

    def __init__(self, model: nn.Module, config: LstConfig):
        super().__init__()
        backbone = Backbone(model, method="LST")
        d = backbone.hidden_size
        if config.reduction < 1 or d % config.reduction:
            raise UpcycleError(f"reduction {config.reduction} does not divide the hidden size {d}")
        width = d // config.reduction
        heads = config.num_heads or next(h for h in (4, 2, 1) if width % h == 0)
        if width % heads:
            raise UpcycleError(f"num_heads {heads} does not divide the side width {width}")
        check_quantized_base("LST", model, trained=backbone.head_modules())
        self.lst_config, self.base, self._backbone = config, model, backbone
        layers = backbone.num_layers
        self.down = nn.ModuleList(nn.Linear(d, width) for _ in range(layers + 1))  # W_0..W_L
        self.ladder = nn.Parameter(torch.zeros(layers))  # alpha_1..alpha_L
        self.blocks = nn.ModuleList(SideBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, d)
        side = nn.ModuleList([self.down, self.blocks, self.norm, self.up])
        with torch.no_grad():
            for m in side.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, config.init_std)
                    m.bias.zero_()
        param, dtype = next(model.parameters()), float_dtype(model)  # a quantized base: its
        side.to(device=param.device, dtype=dtype)  # compute dtype, not the packed weights'
        self.ladder.data = self.ladder.data.to(device=param.device, dtype=dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in backbone.head_parameters():
            p.requires_grad_(True)

    @property
    def config(self):
        """The wrapped model's ``transformers`` config; the LST settings are
        :attr:`lst_config`."""
        return self.base.config

    def print_trainable_parameters(self) -> None:
        print(trainable_report(self))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The side network and the backbone's head (``base.<name>``): what is saved."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}
        state.update({f"base.{n}": p for n, p in self._backbone.head_parameters()})
        return state

    def save_pretrained(self, out, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (trainable part only)."""
        config = {**asdict(self.lst_config), "base": self._backbone.describe()}
        return save_adapter(out, METHOD, config, self.trainable_state_dict(), overwrite=overwrite,
                            base_model=self.base)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, folder, *,
                        is_trainable: bool = False) -> LadderSideModel:
        """Rebuild an LST model on ``base_model`` from a folder written by save_pretrained
        (its trainable parts stay trainable, as SHERL's)."""
        raw, tensors = load_adapter(folder, METHOD)
        saved_base = raw.pop("base", None)
        config = LstConfig.from_dict(raw, source=f"{folder}/adapter_config.json")
        source = f"LST weights in {folder}"
        check_recorded_backbone(saved_base, Backbone(base_model, method="LST").describe(), source)
        model = cls(base_model, config)
        copy_saved_tensors(model.trainable_state_dict(), tensors, source)
        return model

    def side_mask(self, hidden: torch.Tensor, token_mask: torch.Tensor | None):
        """The side blocks' additive mask: the backbone's padding or causal mask (the map's,
        with the side width's dtype), never a (B, T) token mask nor a sliding window."""
        match = self._backbone.match
        call = replace(match.arch.call, token_mask_eager=False)
        return layer_mask(self.base, hidden, token_mask,
                          replace(match, arch=replace(match.arch, call=call)))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                pixel_values=None, inputs_embeds=None, labels=None, num_items_in_batch=None,
                **unused):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "token_type_ids": token_type_ids, "position_ids": position_ids,
                  "pixel_values": pixel_values, "inputs_embeds": inputs_embeds}
        b = self._backbone
        b.check_inputs(inputs)
        taps, _, token_mask, _ = b.frozen_route(inputs, b.num_layers, range(b.num_layers + 1))
        mask = self.side_mask(taps[0], token_mask)
        side = self.down[0](taps[0])
        for i, block in enumerate(self.blocks, start=1):
            mu = torch.sigmoid(self.ladder[i - 1] / LADDER_TEMPERATURE)
            side = self.checkpointed(i - 1, block, mu * side + (1 - mu) * self.down[i](taps[i]),
                                     mask, False)
        logits = b.finish(self.up(self.norm(side)), inputs)
        return classifier_output(logits, labels, b.num_labels, num_items_in_batch)


def get_lst_model(model: nn.Module, config: LstConfig | None = None) -> LadderSideModel:
    """Wrap a HF classification model of any family in :mod:`upcycle.models.families` with a
    ladder side network."""
    return LadderSideModel(model, config or LstConfig())


__all__ = ["LadderSideModel", "LstConfig", "get_lst_model"]
