"""What the soup methods share: the result type, blocks, buffers, and checks against a model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import Ingredient, atomic_file, save_model
from ..errors import UpcycleError


@dataclass
class SoupResult:
    """A soup: its state dict plus what the method learned about its ingredients.

    ``coefficients`` is C (N ingredients x L blocks) with soup^l = sum_i C[i, l] theta_i^l
    (for the parameters; floating buffers are the plain average, integer buffers come from
    the first ingredient). ``blocks`` names the L blocks.
    """

    method: str
    state: dict[str, torch.Tensor]
    ingredients: list[str]
    coefficients: torch.Tensor | None = None
    blocks: list[str] | None = None
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"method": self.method, "ingredients": self.ingredients, "info": self.info,
               "history": self.history}
        if self.coefficients is not None:
            c = self.coefficients
            out["coefficients"] = {
                "shape": list(c.shape),
                "blocks": self.blocks,
                "per_ingredient_mean": c.mean(dim=1).tolist(),
                "min": float(c.min()), "max": float(c.max()),
                "column_sums_max_abs_error": float((c.sum(dim=0) - 1).abs().max()),
            }
        return out

    def save(self, out: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
             overwrite: bool = False, max_shard_bytes: int | None = None,
             extra_files: dict | None = None) -> Path:
        """Write the soup atomically: a HF folder (config/tokenizer copied from ``source_dir``)
        with ``soup.json`` and ``coefficients.safetensors`` beside the weights, or, for an
        ``out`` ending in .safetensors, one file plus ``<out>.soup.json``."""
        out = Path(out)
        summary = json.dumps(self.summary(), indent=2, default=float) + "\n"
        tensors = {}
        if self.coefficients is not None:
            tensors["coefficients.safetensors"] = {"coefficients": self.coefficients.float()}
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        if out.suffix == ".safetensors":
            save_model(out, self.state, overwrite=overwrite)
            with atomic_file(out.with_name(out.name + ".soup.json")) as tmp:
                tmp.write_text(summary)
            return out
        return save_model(out, self.state, source_dir=source_dir, overwrite=overwrite,
                          extra_files={"soup.json": summary, **(extra_files or {})},
                          extra_tensors=tensors, **kwargs)


def ingredient_names(ingredients: Sequence[Ingredient]) -> list[str]:
    return [str(ing.path) for ing in ingredients]


def parameter_names(model: nn.Module, ingredients: Sequence[Ingredient]) -> tuple[list[str], list[str]]:
    """Split the ingredients' tensors into the model's learnable parameters and the rest.

    Returns (parameter names, other names). Raises when the model's parameters are not all
    in the ingredients or a shape differs.
    """
    keys = ingredients[0].keys()
    key_set = set(keys)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in key_set]
    if missing:
        raise UpcycleError(
            f"the model's parameter {missing[0]!r} is not in {ingredients[0].label} "
            f"({len(missing)} missing): the ingredients are not checkpoints of this model"
        )
    for n, p in params.items():
        if tuple(p.shape) != ingredients[0].shape(n):
            raise UpcycleError(
                f"{ingredients[0].label}: {n!r} has shape {ingredients[0].shape(n)}, the model's "
                f"parameter has {tuple(p.shape)}"
            )
    names = [k for k in keys if k in params and ingredients[0].dtype(k).is_floating_point]
    others = [k for k in keys if k not in set(names)]
    return names, others


def average_buffers(ingredients: Sequence[Ingredient], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Floating tensors: the mean over ingredients (fp32 accumulation, original dtype);
    integer tensors (e.g. step counters, position ids): taken from the first ingredient."""
    out = {}
    for name in names:
        first = ingredients[0].get(name)
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = first.to(torch.float32).clone()
        for ing in ingredients[1:]:
            acc += ing.get(name).to(torch.float32)
        out[name] = (acc / len(ingredients)).to(first.dtype)
    return out


def make_blocks(names: Sequence[str], blockwise: bool) -> tuple[list[str], list[int]]:
    """Blocks for learned coefficients: one per parameter tensor (``blockwise``, the "+"
    variants) or one for the whole model. Returns (block names, block index of each name)."""
    if blockwise:
        return list(names), list(range(len(names)))
    return ["<model>"], [0] * len(names)


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` (tensors present in the model only), without autograd."""
    own = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if name in own:
                own[name].copy_(value)
