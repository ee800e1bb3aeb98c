"""What the soup methods share: the result type, blocks, buffers, and checks against a model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UpcycleError
from ..io.checkpoints import Ingredient
from ..io.model_files import tied_groups_of_folder as _tied_groups_of_folder
from ..io.writing import atomic_file, save_model
from ..runtime import distributed
from ..runtime.devices import model_device, resolve_device
from .card import soup_card

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
             extra_files: dict | None = None, rows: Sequence[dict] = (),
             command: str | None = None, card: dict | None = None) -> Path:
        """Write the soup atomically: a HF folder (config/tokenizer copied from ``source_dir``)
        with ``soup.json``, ``coefficients.safetensors`` and a ``README.md`` model card
        (:func:`upcycle.soup.card.soup_card`: ``rows`` are metric rows such as ``{"method": ...,
        "held_out_accuracy": ...}``, ``command`` the command that made it, ``card`` the card's
        ``task`` and ``base_model``) beside the weights, or, for an ``out`` ending in
        .safetensors, one file plus ``<out>.soup.json``. A tied parameter is written once under the name
        ``from_pretrained`` re-ties (as ``save_pretrained`` does) when ``source_dir``'s config
        tells the model. Paths are checked before anything is written: on an error the soup
        is still in this object, to save again."""
        out = Path(out)
        if source_dir is not None and not Path(source_dir).is_dir():
            raise UpcycleError(
                f"source_dir {source_dir}: no such folder (expected the HF model folder whose "
                f"config and tokenizer go beside the soup, e.g. one ingredient's folder); "
                f"nothing was written and the soup is still in this SoupResult: call "
                f".save() again with an existing folder, or source_dir=None")
        summary = json.dumps(self.summary(), indent=2, default=float) + "\n"
        tensors = {}
        if self.coefficients is not None:
            tensors["coefficients.safetensors"] = {"coefficients": self.coefficients.float()}
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        if out.suffix == ".safetensors":
            save_model(out, _untie_for_writing(self.state, None), overwrite=overwrite)
            with atomic_file(out.with_name(out.name + ".soup.json")) as tmp:
                tmp.write_text(summary)
            return out
        state = _untie_for_writing(self.state, source_dir)
        text = soup_card(self, list(rows), command or "# made in Python with upcycle.soup",
                         **(card or {}))
        files = {"soup.json": summary, "README.md": text,
                 **(extra_files or {})}
        return save_model(out, state, source_dir=source_dir, overwrite=overwrite,
                          extra_files=files, extra_tensors=tensors, **kwargs)


def ingredient_names(ingredients: Sequence[Ingredient]) -> list[str]:
    return [str(ing.path) for ing in ingredients]


def tied_groups(model: nn.Module) -> list[list[str]]:
    """The model's parameters as groups of names sharing one tensor, the name
    ``named_parameters()`` reports first (e.g. GPT-2 ``[transformer.wte.weight,
    lm_head.weight]``; a group of one for an untied parameter)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return list(groups.values())


def tied_aliases(model: nn.Module, keys: Sequence[str]) -> dict[str, str]:
    """Tied duplicates among ``keys``: alias key -> the key of the same parameter that is
    souped (the first name of its group present in ``keys``)."""
    key_set = set(keys)
    aliases = {}
    for group in tied_groups(model):
        present = [n for n in group if n in key_set]
        for alias in present[1:]:
            aliases[alias] = present[0]
    return aliases


def parameter_names(model: nn.Module, ingredients: Sequence[Ingredient]) -> tuple[list[str], list[str]]:
    """Split the ingredients' tensors into the model's learnable parameters and the rest.

    Returns (parameter names, other names). A tied parameter (GPT-2 ``lm_head.weight`` is
    ``transformer.wte.weight``) is ONE parameter: it is listed once, under the first of its
    names the checkpoint stores, and its other stored names are in neither list (see
    :func:`tie_state`). Raises when a model parameter is not in the ingredients or a shape
    differs.
    """
    keys = ingredients[0].keys()
    key_set = set(keys)
    chosen: dict[str, str] = {}  # key souped -> the model's name for it
    for group in tied_groups(model):
        present = [n for n in group if n in key_set]
        if not present:
            missing = [g[0] for g in tied_groups(model) if not any(n in key_set for n in g)]
            raise UpcycleError(
                f"the model's parameter {group[0]!r} is not in {ingredients[0].label} "
                f"({len(missing)} missing): the ingredients are not checkpoints of this model"
            )
        chosen[present[0]] = group[0]
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in chosen:
        if tuple(params[key].shape) != ingredients[0].shape(key):
            raise UpcycleError(
                f"{ingredients[0].label}: {key!r} has shape {ingredients[0].shape(key)}, the "
                f"model's parameter has {tuple(params[key].shape)}"
            )
    aliases = tied_aliases(model, keys)
    names = [k for k in keys if k in chosen and ingredients[0].dtype(k).is_floating_point]
    others = [k for k in keys if k not in set(names) and k not in aliases]
    return names, others


def tie_state(state: dict[str, torch.Tensor], ingredients: Sequence[Ingredient],
              model: nn.Module) -> dict[str, torch.Tensor]:
    """The soup's state in the ingredients' key order, every stored alias of a tied
    parameter pointing at the souped tensor (so tied names never disagree)."""
    keys = ingredients[0].keys()
    for alias, key in tied_aliases(model, keys).items():
        state[alias] = state[key]
    return {key: state[key] for key in keys}


def _untie_for_writing(state: dict[str, torch.Tensor], source_dir) -> dict[str, torch.Tensor]:
    """What to write: like ``save_pretrained``, a tied parameter is written once, under the
    name ``from_pretrained`` loads and re-ties (``transformer.wte.weight``, not
    ``lm_head.weight``), when ``source_dir``'s config describes the model; tensors still
    sharing memory are copied (safetensors refuses shared tensors)."""
    if source_dir is not None and (Path(source_dir) / "config.json").is_file():
        rename: dict[str, str | None] = {}  # stored name -> name to write (None: drop)
        for group in _tied_groups_of_folder(Path(source_dir)):
            present = [n for n in group if n in state]
            for other in present[1:]:
                if not torch.equal(state[other], state[present[0]]):
                    raise UpcycleError(
                        f"tied tensors {present[0]!r} and {other!r} of the soup differ: a tied "
                        f"parameter must be souped once"
                    )
            if present:
                rename[present[0]] = group[0]
                rename.update({n: None for n in present[1:]})
        state = {rename.get(k, k): v for k, v in state.items() if rename.get(k, k) is not None}
    else:
        state = dict(state)
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            state[name] = t.clone()
        else:
            seen[ident] = name
    return state


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
    return {name: mean_tensor(ingredients, name, torch.float32, dtype) for name in names}


def mean_tensor(ingredients: Sequence[Ingredient], name: str, accumulate: torch.dtype,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The mean of one tensor over the ingredients, read one ingredient at a time and summed
    in ``accumulate``, rounded once to the first ingredient's dtype (or ``dtype``). An integer
    tensor is the first ingredient's."""
    first = ingredients[0].get(name)
    if not first.is_floating_point():
        return first.clone()
    acc = first.to(accumulate, copy=True)
    for ing in ingredients[1:]:
        acc += ing.get(name).to(accumulate)
    acc /= len(ingredients)
    return acc.to(out_dtype(ingredients[0], name, dtype))


def place_model(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Move ``model`` to ``device`` (None: leave it where it is) and return its device."""
    if device is None:
        return model_device(model)
    device = resolve_device(device, argument="device")
    model.to(device)
    return device


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The default ``loss_fn`` of the learned soups: the loss the model itself returns given
    ``labels`` (a HF classifier's cross-entropy, a causal LM's token loss). A job passes its
    task's loss instead (``task.loss``, :class:`upcycle.tasks.Task`)."""
    out = model(**batch)
    loss = out.loss if hasattr(out, "loss") else out[0] if isinstance(out, tuple) else None
    if loss is None:
        raise UpcycleError("the model returned no loss given labels: pass loss_fn(model, batch)")
    return loss


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
