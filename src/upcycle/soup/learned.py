"""Learned-Soup / Learned-Soup+: the faithful, memory-hungry baseline.

alpha = softmax(w) over ingredients (one row per block, w initialised to 0 = the uniform
soup), theta^l = sum_i alpha[l, i] theta_i^l. All N ingredients are kept resident and
autograd runs through the weighted sum, exactly as the reference does, so the comparison
with MEHL-Soup is honest: its memory grows with N.

The N ingredients, the mixing logits and the weighted sums live on the model's device (read
there one tensor at a time); under torch.distributed each rank fits on its share of every
held-out batch and the logits' gradient is all-reduced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.func import functional_call

from ..errors import UpcycleError
from ..io.checkpoints import Ingredient
from ..runtime import distributed
from ..training.schedules import cosine_with_warmup
from .common import (
    SoupResult,
    accumulator_dtype,
    check_precision_name,
    ingredient_names,
    load_state,
    make_blocks,
    model_loss,
    out_dtype,
)
from .fit_loop import finish_state, grad_scaler, held_out_epoch, progress_bar, ready_model
from .registry import SoupContext, SoupMethod, register


@dataclass
class LearnedConfig:
    blockwise: bool = True
    """One coefficient row per parameter tensor (Learned-Soup+); False: one for the model."""
    epochs: int = 5
    """Passes over the held-out batches (reference: 5)."""
    lr: float = 0.05
    """AdamW learning rate on the logits w (reference: 0.05, weight decay 0)."""
    warmup_ratio: float = field(default=0.2, metadata={"cli": False})
    """Linear warm-up fraction before the cosine decay (as MEHL, for a like-for-like run)."""
    seed: int = 0
    progress: bool = False


class FunctionalModel(nn.Module):
    """Calls ``model`` with substituted parameters (``torch.func.functional_call``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.params: dict[str, torch.Tensor] = {}

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs, strict=False)


def learned_soup(
    ingredients: Sequence[Ingredient],
    model: nn.Module,
    held_out: Sequence[dict],
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = model_loss,
    config: LearnedConfig | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    dtype: torch.dtype | None = None,
) -> SoupResult:
    """Learn softmax mixing coefficients on ``held_out`` batches with all ingredients resident.

    ``device`` (None: where ``model`` is), ``precision`` ("bf16"/"fp16" autocast) and
    ``dtype`` (the soup's dtype; None: the ingredients') as for :func:`mehl_soup`.
    """
    config = config or LearnedConfig()
    check_precision_name(precision)
    if len(ingredients) < 2:
        raise UpcycleError(f"a learned soup needs at least 2 ingredients, got {len(ingredients)}")
    if not held_out:
        raise UpcycleError("the held-out set is empty: a learned soup needs data to fit on")
    torch.manual_seed(config.seed)
    names, others, device, params = ready_model(model, ingredients, device)
    # All N ingredients resident on the device (the reference's memory profile), in the
    # model's dtype, read one tensor at a time.
    thetas = [{n: ing.get(n).to(device).to(params[n].dtype, copy=True) for n in names}
              for ing in ingredients]
    block_names, block_of = make_blocks(names, config.blockwise)
    n_ing, n_blocks = len(ingredients), len(block_names)
    w = torch.zeros(n_blocks, n_ing, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([w], lr=config.lr, weight_decay=0.0)
    total = config.epochs * len(held_out)
    scheduler = cosine_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    fmodel = FunctionalModel(model)

    def prepare() -> None:  # the weighted sums, through which autograd runs
        alpha = torch.softmax(w, dim=1)
        mixed = {}
        for n, l in zip(names, block_of):
            acc = alpha[l, 0] * thetas[0][n]
            for i in range(1, n_ing):
                acc = acc + alpha[l, i] * thetas[i][n]
            mixed[n] = acc
        fmodel.params = mixed

    def gradient(loss_scale: float) -> None:
        fmodel.params = {}
        distributed.all_reduce_sum(w.grad)

    fit = dict(model=fmodel, loss_fn=loss_fn, device=device, precision=precision,
               optimizer=optimizer, scheduler=scheduler, scaler=grad_scaler(device, precision),
               prepare=prepare, gradient=gradient,
               bar=progress_bar(total, "learned soup", config.progress),
               loss_sum=torch.zeros((), dtype=accumulator_dtype(device), device=device))
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        steps = held_out_epoch(held_out, gen, **fit)
        record = {"epoch": epoch + 1, "train_loss": float(fit["loss_sum"]) / max(1, steps),
                  "seconds": time.perf_counter() - start}
        if eval_fn is not None:
            with torch.no_grad():
                alpha = torch.softmax(w, dim=1)
                load_state(model, {n: sum(alpha[l, i] * thetas[i][n] for i in range(n_ing))
                                   for n, l in zip(names, block_of)})
            record.update({f"held_out_{k}": v for k, v in eval_fn(model).items()})
        history.append(record)
    fit["bar"].close()
    ref = ingredients[0]
    with torch.no_grad():
        alpha = torch.softmax(w, dim=1).detach()
        state = {}
        for n, l in zip(names, block_of):
            acc = torch.zeros_like(thetas[0][n], dtype=torch.float32)
            for i in range(n_ing):
                acc += alpha[l, i] * thetas[i][n].float()
            state[n] = acc.to(out_dtype(ref, n, dtype)).cpu()
    state = finish_state(state, ingredients, others, model, dtype)
    method = "learned+" if config.blockwise else "learned"
    return SoupResult(method, state, ingredient_names(ingredients),
                      alpha.t().cpu().to(torch.float64).contiguous(), block_names, history,
                      info={"device": str(device), "precision": precision})


def _run(ingredients: Sequence[Ingredient], context: SoupContext,
         config: LearnedConfig) -> SoupResult:
    return learned_soup(ingredients, context.model, context.held_out,
                        loss_fn=context.loss_fn or model_loss,
                        config=replace(config, progress=context.progress),
                        device=context.device, precision=context.precision, dtype=context.dtype)


for _name, _blockwise, _title, _note in (
    ("learned", False, "Learned-Soup",
     "one mixing coefficient per ingredient, learned by gradient descent on the held-out split"),
    ("learned+", True, "Learned-Soup+",
     "one mixing coefficient per ingredient and parameter tensor, learned by gradient descent "
     "on the held-out split (all ingredients in memory)"),
):
    register(SoupMethod(_name, _run, _title, _note, config_class=LearnedConfig,
                        preset={"blockwise": _blockwise}, needs_data=True, min_ingredients=2))
