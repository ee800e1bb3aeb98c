"""One small training loop: AdamW, cosine schedule with linear warm-up, evaluation, tqdm.

Used to make soup ingredients, to tune (SNELL, SHERL) and to continue training grown
models (LEMON). Works with any ``nn.Module`` (also one wrapped in DDP) and any iterable of
batches; the caller supplies ``loss_fn(model, batch) -> scalar``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist_utils


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training batches (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (cycling the batches if needed)."""
    lr: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not biases, norms or 1-D parameters)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent in linear warm-up before the cosine decay."""
    warmup_steps: int | None = None
    """Warm-up steps (overrides ``warmup_ratio``)."""
    min_lr_ratio: float = 0.0
    """The cosine decays to ``lr * min_lr_ratio``."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    eval_every: int | None = None
    """Run ``eval_fn`` every this many steps (and always at the end)."""
    seed: int = 0
    progress: bool = True
    """Show a tqdm progress bar."""
    desc: str = "train"


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the peak over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` x peak at ``total_steps``."""
    total_steps = max(1, total_steps)
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _cycle(batches: Sequence | Iterable, steps: int):
    done = 0
    while done < steps:
        yielded = False
        for batch in batches:
            yield batch
            yielded = True
            done += 1
            if done >= steps:
                return
        if not yielded:
            raise ValueError("the training batches are empty")


def train(
    model: nn.Module,
    batches: Sequence,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    config: TrainConfig | None = None,
    *,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad.

    ``batches`` must support ``len()`` (a list or DataLoader). Returns per-step losses and
    the evaluations (``eval_fn(model)`` results with a ``step`` key).
    """
    config = config or TrainConfig()
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ValueError("the training batches are empty")
    total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    if optimizer is None:
        optimizer = torch.optim.AdamW(
            param_groups(model.named_parameters(), config.weight_decay), lr=config.lr
        )
    warmup = config.warmup_steps if config.warmup_steps is not None else int(
        round(config.warmup_ratio * total)
    )
    scheduler = cosine_with_warmup(optimizer, warmup, total, config.min_lr_ratio)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult(steps=0, seconds=0.0)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=config.desc, disable=not config.progress or not dist_utils.is_main(),
               leave=False)
    for step, batch in enumerate(_cycle(batches, total), start=1):
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        result.losses.append(value)
        result.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step is not None:
            on_step(step, value)
        if eval_fn is not None and config.eval_every and step % config.eval_every == 0 and step < total:
            metrics = eval_fn(model)
            result.evals.append({"step": step, **metrics})
            model.train()
    bar.close()
    result.seconds = time.perf_counter() - start
    if eval_fn is not None:
        result.evals.append({"step": result.steps, **eval_fn(model)})
    model.eval()
    return result
