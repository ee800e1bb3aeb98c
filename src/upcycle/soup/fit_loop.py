"""The fit loop the learned soups share (Learned-Soup and MEHL-Soup): the model made ready to
fit mixing coefficients, one pass over the held-out batches, and the soup's state at the end.

A method plugs in what differs: ``prepare()`` puts the current soup's weights where
``loss_fn`` sees them, ``gradient(loss_scale)`` turns the backward into the gradient of the
coefficients the optimizer steps. The loop does the rest: the batch order, each rank's share
of a batch (:func:`local_share`), autocast, loss scaling, the optimizer and schedule steps,
and the all-reduced running loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io.checkpoints import Ingredient
from ..runtime import distributed
from ..runtime.devices import autocast
from .common import (
    average_buffers,
    load_state,
    local_share,
    parameter_names,
    place_model,
    tie_state,
    to_device,
)


def ready_model(model: nn.Module, ingredients: Sequence[Ingredient],
                device: str | torch.device | None,
                ) -> tuple[list[str], list[str], torch.device, dict[str, torch.Tensor]]:
    """``model`` on ``device`` with the ingredients' averaged buffers, in eval mode (no
    dropout: the loss is a function of the coefficients only) and frozen. Returns the names
    of the parameters to soup and of the other tensors (:func:`parameter_names`), the device,
    and the model's parameters by name, tied aliases included."""
    names, others = parameter_names(model, ingredients)
    device = place_model(model, device)
    load_state(model, average_buffers(ingredients, others))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return names, others, device, dict(model.named_parameters(remove_duplicate=False))


def progress_bar(total: int, desc: str, progress: bool, initial: int = 0) -> tqdm:
    """A progress bar over fit steps, on the main rank only."""
    return tqdm(total=total, initial=initial, desc=desc,
                disable=not progress or not distributed.is_main(), leave=False)


def grad_scaler(device: torch.device, precision: str | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast; a disabled scaler (plain steps) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def held_out_epoch(
    held_out: Sequence[dict], generator: torch.Generator, *, model: nn.Module,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor], device: torch.device,
    precision: str | None, optimizer: torch.optim.Optimizer, scheduler,
    scaler: torch.amp.GradScaler, prepare: Callable[[], None],
    gradient: Callable[[float], None], bar: tqdm, loss_sum: torch.Tensor,
) -> int:
    """One pass over ``held_out`` in a random order drawn from ``generator``: per batch,
    ``prepare()``, this rank's share of the loss under autocast, backward (scaled),
    ``gradient(loss_scale)``, an optimizer step (through the scaler: it unscales and skips
    steps with inf/NaN) and a schedule step. ``loss_sum`` (zeroed first) ends as the sum of
    the global batch losses; returns the number of steps taken (batches without any loss
    target on any rank are skipped)."""
    loss_sum.zero_()
    steps = 0
    for b in torch.randperm(len(held_out), generator=generator).tolist():
        local, share = local_share(held_out[b])
        if local is None:  # no loss targets in this batch on any rank
            bar.update(1)
            continue
        prepare()
        with autocast(device, precision):
            loss = loss_fn(model, to_device(local, device))
        loss = loss.float() * share
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        gradient(float(scaler.get_scale()) if scaler.is_enabled() else 1.0)
        scaler.step(optimizer)  # a disabled scaler steps the optimizer as it is
        scaler.update()
        scheduler.step()
        loss_sum += distributed.all_reduce_sum(loss.detach().to(loss_sum.dtype))
        steps += 1
        bar.update(1)
        if not bar.disable:
            bar.set_postfix(loss=f"{float(loss_sum) / steps:.4f}")
    return steps


def finish_state(state: dict[str, torch.Tensor], ingredients: Sequence[Ingredient],
                 others: Sequence[str], model: nn.Module,
                 dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The soup's whole state: its souped parameters ``state`` plus the averaged other
    tensors, in the ingredients' key order with tied aliases (:func:`tie_state`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    state.update(average_buffers(ingredients, others, dtype=dtype))
    return tie_state(state, ingredients, model)
