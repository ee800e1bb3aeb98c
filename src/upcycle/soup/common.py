"""What the soup methods share: the result type, blocks, buffers, and checks against a model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..checkpoints import Ingredient, atomic_file, save_model
from ..errors import UpcycleError

IGNORE_INDEX = -100
"""Label value that no loss counts (PyTorch's and HuggingFace's ``ignore_index``)."""


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


def out_dtype(ingredient: Ingredient, name: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a soup writes ``name`` in: ``dtype`` when asked for (floating tensors only),
    else the ingredients' own (a soup of bf16 checkpoints is bf16)."""
    stored = ingredient.dtype(name)
    return dtype if dtype is not None and stored.is_floating_point else stored


def average_buffers(ingredients: Sequence[Ingredient], names: Sequence[str], *,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Floating tensors: the mean over ingredients (fp32 accumulation, the ingredients' dtype
    or ``dtype``); integer tensors (e.g. step counters, position ids): taken from the first
    ingredient. CPU tensors, read one at a time."""
    out = {}
    for name in names:
        first = ingredients[0].get(name)
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = first.to(torch.float32, copy=True)
        for ing in ingredients[1:]:
            acc += ing.get(name).to(torch.float32)
        out[name] = (acc / len(ingredients)).to(out_dtype(ingredients[0], name, dtype))
    return out


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def place_model(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Move ``model`` to ``device`` (None: leave it where it is) and return its device."""
    if device is None:
        return model_device(model)
    from ..devices import resolve_device

    device = resolve_device(device, argument="device")
    model.to(device)
    return device


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def check_precision_name(precision: str | None) -> None:
    if precision not in (None, "bf16", "fp16"):
        raise UpcycleError(f"precision {precision!r}: expected 'bf16', 'fp16' or None")


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """fp64 for the small K x L sums, except on MPS (which has no fp64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _targets_per_row(labels) -> torch.Tensor:
    """How many loss targets each row of a batch holds: integer labels of shape (B, T) are
    causal-LM token labels (targets: labels[:, 1:] != -100 after the next-token shift);
    anything else counts one target per row whose label is not -100."""
    if not isinstance(labels, torch.Tensor):
        return torch.ones(len(labels), dtype=torch.float64)
    labels = labels.detach().cpu()
    if labels.ndim >= 2 and not labels.is_floating_point():
        return (labels[:, 1:] != IGNORE_INDEX).reshape(len(labels), -1).sum(1).double()
    if labels.ndim == 1 and not labels.is_floating_point():
        return (labels != IGNORE_INDEX).double()
    return torch.ones(len(labels), dtype=torch.float64)


def local_share(batch: dict) -> tuple[dict | None, float]:
    """This rank's shard of a global batch and its share of the batch's *loss targets*.

    Rows are split contiguously over the ranks. The share is (targets on this rank) /
    (targets in the global batch): rows for classification labels (B,), non-ignored next-token
    labels for causal-LM labels (B, T). A ``loss_fn`` returning the mean over its own
    targets, times this share, summed over ranks, is then the global mean over targets.

    A rank left without targets (fewer rows than ranks, or only ignored labels) gets one
    stand-in row that has targets and a share of 0: it runs the same forward, backward and
    collectives as the others (every rank must take part in each all-reduce) and adds zero.
    Returns (None, 0.0) when the whole global batch has no targets: every rank skips it.
    """
    labels = batch.get("labels")
    size = len(labels) if labels is not None else len(next(iter(batch.values())))
    if not distributed.is_distributed():
        if labels is not None and float(_targets_per_row(labels).sum()) == 0:
            return None, 0.0
        return batch, 1.0
    per_row = (_targets_per_row(labels) if labels is not None
               else torch.ones(size, dtype=torch.float64))
    total = float(per_row.sum())
    if total == 0:
        return None, 0.0
    rank, world = distributed.rank(), distributed.world_size()
    start, end = size * rank // world, size * (rank + 1) // world
    local = float(per_row[start:end].sum())
    if local == 0:
        j = int(torch.nonzero(per_row)[0])
        return {k: v[j:j + 1] for k, v in batch.items()}, 0.0
    return {k: v[start:end] for k, v in batch.items()}, local / total


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
                own[name].copy_(value)  # copy_ converts device and dtype
