"""MEHL-Soup / MEHL-Soup+ (Li et al. 2024): learned soups by block-coordinate descent on the
affine hull of the ingredients, with memory bounded by a model batch of K ingredients.

Per round, over a model batch S of K ingredients (order shuffled once per pass):
  anchor c (first round: the mean of S; then the current soup),
  directions d_i^l = (theta_i^l - c^l) / n_il with n_il = ||theta_i^l - c^l|| (zero: skipped),
  theta^l(X) = c^l + sum_i X[i, l] d_i^l with X = 0 at the start of the round,
  dL/dX[i, l] = <d_i^l, g^l> from ONE model's weight gradient g, AdamW on X with a fresh
  optimizer and a cosine schedule with 20% warm-up per round.
The implied coefficients C (N x L) always sum to 1 per block and are tracked exactly.

Memory: the model (holding theta), the anchor c, K directions and X. The weight gradient is
consumed parameter by parameter as backward produces it (a post-accumulate-grad hook folds
it into dL/dX and frees it), so not even one full gradient is resident. Nothing grows with N.

Data parallel: under torch.distributed every rank evaluates its shard of each held-out batch
and only the K x L coefficient gradient (and the loss) is all-reduced. With gradient
clipping the global weight-gradient norm is needed, so the weight gradient is all-reduced
per parameter as well (documented cost).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..checkpoints import Ingredient
from ..errors import UpcycleError
from ..tasks import classification_loss
from ..train import cosine_with_warmup
from .common import (
    SoupResult,
    average_buffers,
    ingredient_names,
    load_state,
    make_blocks,
    parameter_names,
    tie_state,
)


@dataclass
class MehlConfig:
    model_batch: int = 18
    """K: ingredients loaded and trained per round (reference: 18 for 72 CLIP ViT-B/32)."""
    blockwise: bool = True
    """One coefficient per ingredient and parameter tensor (MEHL-Soup+); False: per model."""
    epochs: int = 5
    """E: passes over the held-out batches in each round (reference: 5)."""
    models_epochs: int = 1
    """Outer passes over all ingredients (reference: 1)."""
    lr: float = 0.01
    """AdamW learning rate on the coefficients (reference: 0.01)."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.2
    """Linear warm-up fraction of each round's steps before the cosine decay."""
    grad_clip: float | None = None
    """Clip the weight-gradient norm to this (the reference uses 1.0 for ViTs)."""
    seed: int = 0
    """Seeds the ingredient order and the order of held-out batches."""
    progress: bool = False


def _check(ingredients: Sequence[Ingredient], held_out: Sequence[dict], config: MehlConfig) -> None:
    n = len(ingredients)
    if n < 2:
        raise UpcycleError(f"MEHL-Soup needs at least 2 ingredients, got {n}")
    if not 1 <= config.model_batch <= n:
        raise UpcycleError(f"model_batch (K) must be between 1 and the number of ingredients "
                           f"({n}), got {config.model_batch}")
    if config.epochs < 1 or config.models_epochs < 1:
        raise UpcycleError(f"epochs and models_epochs must be >= 1, got {config.epochs} and "
                           f"{config.models_epochs}")
    if not held_out:
        raise UpcycleError("the held-out set is empty: MEHL-Soup needs data to fit on")


def _local_part(batch: dict) -> tuple[dict, float]:
    """This rank's shard of a global batch and its share of the global example count."""
    if not distributed.is_distributed():
        return batch, 1.0
    size = len(batch["labels"]) if "labels" in batch else len(next(iter(batch.values())))
    rank, world = distributed.rank(), distributed.world_size()
    start, end = size * rank // world, size * (rank + 1) // world
    return {k: v[start:end] for k, v in batch.items()}, (end - start) / size


class _Round:
    """One model batch: the directions, the coefficients X, and the gradient hooks."""

    def __init__(self, names, block_of, n_blocks, params, anchor, members, ingredients,
                 grad_clip):
        self.names, self.block_of, self.params, self.anchor = names, block_of, params, anchor
        k = len(members)
        sq = torch.zeros(k, n_blocks, dtype=torch.float64)
        anchor_sq = torch.zeros(n_blocks, dtype=torch.float64)
        self.directions: dict[str, torch.Tensor] = {}
        for name, block in zip(names, block_of):
            c = anchor[name]
            d = torch.empty(k, c.numel(), dtype=torch.float32)
            for row, i in enumerate(members):
                torch.sub(ingredients[i].get(name).reshape(-1).to(torch.float32), c, out=d[row])
            # Reductions without fp64 copies of the directions (that would cost 4x their size).
            sq[:, block] += torch.linalg.vector_norm(d, dim=1).double().pow(2)
            anchor_sq[block] += float(torch.linalg.vector_norm(c)) ** 2
            self.directions[name] = d
        norms = sq.sqrt()
        # A block whose difference to the anchor is zero (or at fp32 rounding level) has no
        # direction: skip it (the reference divides by zero and produces NaN there).
        tol = torch.clamp(1e-7 * anchor_sq.sqrt(), min=1e-30)
        valid = norms > tol
        self.inv_norms = torch.where(valid, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        for name, block in zip(names, block_of):
            self.directions[name].mul_(self.inv_norms[:, block].to(torch.float32).unsqueeze(1))
        self.valid = valid
        self.x = torch.zeros(k, n_blocks)
        self.grad_x = torch.zeros(k, n_blocks, dtype=torch.float64)
        self.grad_sq = torch.zeros((), dtype=torch.float64)
        self.grad_clip = grad_clip
        self._hooks = [params[name].register_post_accumulate_grad_hook(self._hook(name, block))
                       for name, block in zip(names, block_of)]

    def _hook(self, name: str, block: int):
        direction = self.directions[name]
        need_global_grad = self.grad_clip is not None and distributed.is_distributed()

        def fold(param: torch.Tensor) -> None:
            g = param.grad
            if need_global_grad:
                distributed.all_reduce_sum(g)
            g = g.reshape(-1).to(torch.float32)
            self.grad_x[:, block] += (direction @ g).double()
            if self.grad_clip is not None:
                self.grad_sq += float(torch.linalg.vector_norm(g)) ** 2
            param.grad = None  # consumed: never hold a full weight gradient

        return fold

    @torch.no_grad()
    def apply(self) -> None:
        """Write theta(X) = c + sum_i X[i, l] d_i^l into the model's parameters (in place when
        the parameter is fp32, so no model-sized temporary is made)."""
        for name, block in zip(self.names, self.block_of):
            param = self.params[name]
            args = (self.anchor[name].unsqueeze(0), self.x[:, block].unsqueeze(0),
                    self.directions[name])
            if param.dtype == torch.float32 and param.is_contiguous():
                torch.addmm(*args, out=param.view(1, -1))
            else:
                param.copy_(torch.addmm(*args).view_as(param))

    def take_grad(self) -> torch.Tensor:
        """dL/dX for the last backward (clipped like clip_grad_norm_ would), then reset."""
        grad = self.grad_x
        if self.grad_clip is not None:
            # The hooks folded the global (all-reduced) weight gradient: grad is global.
            scale = self.grad_clip / (math.sqrt(float(self.grad_sq)) + 1e-6)
            if scale < 1:
                grad = grad * scale
        else:
            distributed.all_reduce_sum(grad)  # only K x L numbers cross the wire
        self.grad_x = torch.zeros_like(self.grad_x)
        self.grad_sq = torch.zeros((), dtype=torch.float64)
        return grad.to(torch.float32)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.directions.clear()


def mehl_soup(
    ingredients: Sequence[Ingredient],
    model: nn.Module,
    held_out: Sequence[dict],
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = classification_loss,
    config: MehlConfig | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
) -> SoupResult:
    """Fit a MEHL-Soup(+) of ``ingredients`` for ``model`` on ``held_out`` batches.

    ``held_out`` holds global batches (dicts with ``labels``); under torch.distributed each
    rank uses its slice of every batch. ``eval_fn(model)`` (optional) is called after each
    round on the current soup and its metrics are kept in the history.
    """
    config = config or MehlConfig()
    _check(ingredients, held_out, config)
    names, others = parameter_names(model, ingredients)
    load_state(model, average_buffers(ingredients, others))
    model.eval()  # no dropout while fitting coefficients: the loss is a function of X only
    params = dict(model.named_parameters(remove_duplicate=False))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        params[name].requires_grad_(True)
    block_names, block_of = make_blocks(names, config.blockwise)
    n, n_blocks, k = len(ingredients), len(block_names), config.model_batch
    coefficients = torch.zeros(n, n_blocks, dtype=torch.float64)
    gen = torch.Generator().manual_seed(config.seed)
    anchor: dict[str, torch.Tensor] | None = None
    history: list[dict] = []
    rounds_per_pass = math.ceil(n / k)
    steps_per_round = config.epochs * len(held_out)
    bar = tqdm(total=config.models_epochs * rounds_per_pass * steps_per_round, desc="MEHL soup",
               disable=not config.progress or not distributed.is_main(), leave=False)
    start = time.perf_counter()
    for outer in range(config.models_epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for r in range(rounds_per_pass):
            members = order[r * k:(r + 1) * k]
            if anchor is None:  # first round: centre on the mean of the model batch
                anchor = {}
                for name in names:
                    acc = torch.zeros(ingredients[0].shape(name), dtype=torch.float32).reshape(-1)
                    for i in members:
                        acc += ingredients[i].get(name).reshape(-1).to(torch.float32)
                    anchor[name] = acc / len(members)
                coefficients[members] = 1.0 / len(members)
            rnd = _Round(names, block_of, n_blocks, params, anchor, members, ingredients,
                         config.grad_clip)
            optimizer = torch.optim.AdamW([rnd.x], lr=config.lr, weight_decay=config.weight_decay)
            scheduler = cosine_with_warmup(optimizer, int(config.warmup_ratio * steps_per_round),
                                           steps_per_round)
            losses = []
            try:
                for _ in range(config.epochs):
                    losses = []
                    for b in torch.randperm(len(held_out), generator=gen).tolist():
                        rnd.apply()
                        local, share = _local_part(held_out[b])
                        loss = loss_fn(model, local) * share
                        loss.backward()
                        rnd.x.grad = rnd.take_grad()
                        optimizer.step()
                        scheduler.step()
                        total_loss = distributed.all_reduce_sum(loss.detach().double().reshape(1))
                        losses.append(float(total_loss))
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses[-1]:.4f}")
                rnd.apply()
            finally:
                rnd.close()
            # Book-keeping: theta = (1 - sum_i X_i/n_i) c + sum_i (X_i/n_i) theta_i.
            ratio = rnd.x.double() * rnd.inv_norms  # (K, L); zero on skipped blocks
            coefficients *= 1 - ratio.sum(dim=0, keepdim=True)
            coefficients[members] += ratio
            with torch.no_grad():  # the round's end point is the next anchor (in place)
                for name in names:
                    anchor[name].copy_(params[name].detach().reshape(-1))
            skipped = int((~rnd.valid).sum())
            del rnd
            record = {"pass": outer + 1, "round": r + 1, "ingredients": [i + 1 for i in members],
                      "held_out_loss_train": sum(losses) / len(losses),
                      "skipped_blocks": skipped,
                      "seconds": time.perf_counter() - start}
            if eval_fn is not None:
                record.update({f"held_out_{key}": v for key, v in eval_fn(model).items()})
            history.append(record)
    bar.close()
    for p in model.parameters():
        p.requires_grad_(False)
    state = {name: anchor[name].view(ingredients[0].shape(name)).to(ingredients[0].dtype(name))
             for name in names}
    state.update(average_buffers(ingredients, others))
    state = tie_state(state, ingredients, model)
    method = "mehl+" if config.blockwise else "mehl"
    return SoupResult(method, state, ingredient_names(ingredients), coefficients, block_names,
                      history, info={"model_batch": k, "rounds": len(history)})
