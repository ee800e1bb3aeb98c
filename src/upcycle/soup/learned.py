"""Learned-Soup / Learned-Soup+: the faithful, memory-hungry baseline.

alpha = softmax(w) over ingredients (one row per block, w initialised to 0 = the uniform
soup), theta^l = sum_i alpha[l, i] theta_i^l. All N ingredients are kept resident and
autograd runs through the weighted sum, exactly as the reference does, so the comparison
with MEHL-Soup is honest: its memory grows with N.

The start (``init``): w = 0 is the uniform soup, the reference's start and the default. From
another fixed-weight merge A (``--init ties``...; :mod:`upcycle.soup.anchor`) the soup is
theta^l = A^l + sum_i (alpha[l, i] - 1/N) (theta_i^l - A^l) = sum_i alpha[l, i] theta_i^l + delta^l
with the fixed offset delta = A - the uniform soup: at w = 0 it is exactly A, the learned
coefficients move the same convex combination as from the uniform start, and what the merge
adds beyond an average (TIES' trimmed, sign-elected task vectors; task arithmetic's lambda)
rides along unchanged. The coefficients are then those of the anchor's rows (composed with a
linear merge's own, else "the anchor" with weight 1 plus alpha - 1/N over the ingredients).
The offset costs one more model in memory (none from the uniform start).

Keep-best (:mod:`upcycle.soup.keep_best`): the held-out loss is measured at the start and
after every epoch and the soup is the best of those states, the start included.

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
from ..io.source import TensorSource
from ..runtime import distributed
from ..training.schedules import cosine_with_warmup
from .anchor import INIT_DEFAULT, check_merges, compose_coefficients, run_merge
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
from .keep_best import KeepBest, held_out_loss, warn_few_steps
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
    init: str = field(default=INIT_DEFAULT, metadata={"metavar": "MERGE"})
    """learned/MEHL: the start of the fit (its anchor), a fixed-weight merge of all ingredients
    with that merge's settings (--weights, --lambda, --density, --t, --base...): uniform,
    linear, task-arithmetic, ties, dare-linear, dare-ties, slerp or model-stock"""
    merge_configs: dict | None = field(default=None, metadata={"cli": False})
    """The ``init`` merge's config by name (None: its defaults)."""
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
    base: TensorSource | None = None,
) -> SoupResult:
    """Learn softmax mixing coefficients on ``held_out`` batches with all ingredients resident.

    ``device`` (None: where ``model`` is), ``precision`` ("bf16"/"fp16" autocast) and
    ``dtype`` (the soup's dtype; None: the ingredients') as for :func:`mehl_soup`;
    ``eval_fn(model)`` (optional) gives the held-out metrics kept in the history and whose
    ``loss`` decides the state kept; ``base``: for an ``init`` merge that reads it.
    """
    config = config or LearnedConfig()
    check_precision_name(precision)
    if len(ingredients) < 2:
        raise UpcycleError(f"a learned soup needs at least 2 ingredients, got {len(ingredients)}")
    if not held_out:
        raise UpcycleError("the held-out set is empty: a learned soup needs data to fit on")
    check_merges(config, len(ingredients), has_base=base is not None)
    method = "learned+" if config.blockwise else "learned"
    warn_few_steps(method, config.epochs * len(held_out), config.epochs, len(held_out),
                   config.lr, what="the fit")
    torch.manual_seed(config.seed)
    names, others, device, params = ready_model(model, ingredients, device)
    # All N ingredients resident on the device (the reference's memory profile), in the
    # model's dtype, read one tensor at a time.
    thetas = [{n: ing.get(n).to(device).to(params[n].dtype, copy=True) for n in names}
              for ing in ingredients]
    block_names, block_of = make_blocks(names, config.blockwise)
    n_ing, n_blocks = len(ingredients), len(block_names)
    merged = offset = None
    if config.init != "uniform":  # (w = 0 is the uniform soup itself: no offset)
        merged = run_merge(config.init, ingredients, SoupContext(base=base), config)
        offset = _offset(merged, thetas, names, params)
        merged.state = {}  # only its coefficients are kept
    w = torch.zeros(n_blocks, n_ing, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([w], lr=config.lr, weight_decay=0.0)
    total = config.epochs * len(held_out)
    scheduler = cosine_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    fmodel = FunctionalModel(model)

    def mix(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        mixed = {}
        for n, l in zip(names, block_of):
            acc = alpha[l, 0] * thetas[0][n]
            if offset is not None:
                acc = acc + offset[n]
            for i in range(1, n_ing):
                acc = acc + alpha[l, i] * thetas[i][n]
            mixed[n] = acc
        return mixed

    def prepare() -> None:  # the weighted sums, through which autograd runs
        fmodel.params = mix(torch.softmax(w, dim=1))

    def gradient(loss_scale: float) -> None:
        fmodel.params = {}
        distributed.all_reduce_sum(w.grad)

    def measure() -> dict:  # held-out metrics of the current soup, loaded into the model
        with torch.no_grad():
            load_state(model, mix(torch.softmax(w, dim=1)))
        if eval_fn is not None:
            return dict(eval_fn(model))
        return {"loss": held_out_loss(model, held_out, loss_fn, device, precision)}

    def snapshot() -> torch.Tensor:
        return w.detach().cpu().clone()

    fit = dict(model=fmodel, loss_fn=loss_fn, device=device, precision=precision,
               optimizer=optimizer, scheduler=scheduler, scaler=grad_scaler(device, precision),
               prepare=prepare, gradient=gradient,
               bar=progress_bar(total, "learned soup", config.progress),
               loss_sum=torch.zeros((), dtype=accumulator_dtype(device), device=device))
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    best = KeepBest(method, config.init, measure(), snapshot)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        steps = held_out_epoch(held_out, gen, **fit)
        record = {"epoch": epoch + 1, "train_loss": float(fit["loss_sum"]) / max(1, steps),
                  "seconds": time.perf_counter() - start}
        metrics = measure()
        record.update({f"held_out_{k}": v for k, v in metrics.items()})
        history.append(record)
        best.offer(f"epoch {epoch + 1}", metrics, snapshot)
    fit["bar"].close()
    ref = ingredients[0]
    with torch.no_grad():
        alpha = torch.softmax(best.best_state.to(device), dim=1).detach()
        state = {}
        for n, l in zip(names, block_of):
            acc = torch.zeros_like(thetas[0][n], dtype=torch.float32)
            if offset is not None:
                acc += offset[n].float()
            for i in range(n_ing):
                acc += alpha[l, i] * thetas[i][n].float()
            state[n] = acc.to(out_dtype(ref, n, dtype)).cpu()
    state = finish_state(state, ingredients, others, model, dtype)
    alpha = alpha.t().cpu().to(torch.float64)
    if offset is None:  # from the uniform soup: the reference's coefficients, alpha itself
        c, rows, blocks = alpha.contiguous(), ingredient_names(ingredients), block_names
    else:  # A + sum_i (alpha_i - 1/N) theta_i, with the anchor's own rows where it has them
        c, rows, blocks = compose_coefficients(
            merged, torch.ones(n_blocks, dtype=torch.float64), alpha - 1.0 / n_ing,
            block_names, names, block_of, ingredient_names(ingredients))
    return SoupResult(method, state, rows, c, blocks, history,
                      info={"device": str(device), "precision": precision, "init": config.init,
                            "keep_best": best.finish()})


@torch.no_grad()
def _offset(merged: SoupResult, thetas: list[dict], names, params) -> dict[str, torch.Tensor]:
    """delta = A - (1/N) sum_i theta_i per parameter (the anchor's offset from the uniform
    soup, in the model's dtype on its device)."""
    out = {}
    for n in names:
        mean = sum(t[n].double() for t in thetas) / len(thetas)
        a = merged.state[n].to(mean.device, torch.float64).view_as(mean)
        out[n] = (a - mean).to(params[n].dtype)
    return out


def _run(ingredients: Sequence[Ingredient], context: SoupContext,
         config: LearnedConfig) -> SoupResult:
    return learned_soup(ingredients, context.model, context.held_out,
                        loss_fn=context.loss_fn or model_loss,
                        config=replace(config, progress=context.progress),
                        eval_fn=context.eval_fn, device=context.device,
                        precision=context.precision, dtype=context.dtype, base=context.base)


for _name, _blockwise, _title, _note in (
    ("learned", False, "Learned-Soup",
     "one mixing coefficient per ingredient, learned by gradient descent on the held-out split"),
    ("learned+", True, "Learned-Soup+",
     "one mixing coefficient per ingredient and parameter tensor, learned by gradient descent "
     "on the held-out split (all ingredients in memory)"),
):
    register(SoupMethod(_name, _run, _title, _note, config_class=LearnedConfig,
                        preset={"blockwise": _blockwise}, needs_data=True, min_ingredients=2))
