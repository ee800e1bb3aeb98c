"""LEMON's training recipe (specs/lemon.md): the grown model trains with the from-scratch
peak learning rate and warm-up, on a reduced budget, with a decay that ends at its last step.
The schedule itself is :func:`upcycle.training.schedules.warmup_decay_factor`, the one formula
the Trainer and the soups use too."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UpcycleError
from ..training.config import TrainingConfig
from ..training.schedules import DECAYS, warmup_decay_factor

SCHEDULES = DECAYS
"""How the learning rate decays after the warm-up, to ``min_lr_ratio`` x peak at the last step."""


def _check_recipe(peak_lr: float, warmup_steps: int, total_steps: int, decay: str,
                  min_lr_ratio: float, where: str) -> None:
    if decay not in SCHEDULES:
        raise UpcycleError(f"{where}: decay must be one of {', '.join(SCHEDULES)}, got {decay!r}")
    if not peak_lr > 0 or total_steps < 1 or warmup_steps < 0:
        raise UpcycleError(f"{where}: expected peak_lr > 0, total_steps >= 1 and "
                           f"warmup_steps >= 0, got {peak_lr}, {total_steps}, {warmup_steps}")
    if not 0 <= min_lr_ratio < 1:
        raise UpcycleError(f"{where}: min_lr_ratio must be in [0, 1), got {min_lr_ratio}")


def lemon_schedule(optimizer: torch.optim.Optimizer, *, peak_lr: float, warmup_steps: int,
                   total_steps: int, decay: str = "cosine", min_lr_ratio: float = 0.0,
                   fresh_state: bool = True) -> torch.optim.lr_scheduler.LambdaLR:
    """LEMON's recipe on ``optimizer``: the from-scratch peak learning rate and warm-up
    (explicit inputs: pass what the large model would use from scratch), then a ``decay``
    ("cosine" or "linear") that ends at ``total_steps``, the reduced budget (about 0.45-0.65
    of the from-scratch steps), so it decays fully. Sets every group's lr to ``peak_lr`` and,
    with ``fresh_state``, clears the optimizer's state (moments): the paper starts the grown
    model on a fresh optimizer."""
    _check_recipe(peak_lr, warmup_steps, total_steps, decay, min_lr_ratio, "lemon_schedule")
    if fresh_state:
        optimizer.state.clear()
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group["initial_lr"] = peak_lr

    def factor(step: int) -> float:  # a closure, not a partial: LambdaLR saves no state for it
        return warmup_decay_factor(step, warmup_steps, total_steps, decay, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class LemonRecipe:
    """The grown model's training budget and schedule (see :func:`lemon_train_config`)."""
    max_steps: int
    lr: float
    warmup_steps: int
    decay: str = "cosine"
    min_lr_ratio: float = 0.0
    extra: dict = field(default_factory=dict)

    def scheduler(self, optimizer: torch.optim.Optimizer, *, fresh_state: bool = True):
        """:func:`lemon_schedule` with this recipe."""
        return lemon_schedule(optimizer, peak_lr=self.lr, warmup_steps=self.warmup_steps,
                              total_steps=self.max_steps, decay=self.decay,
                              min_lr_ratio=self.min_lr_ratio, fresh_state=fresh_state)

    def training_arguments(self) -> dict:
        """Keyword arguments for ``transformers.TrainingArguments`` giving the same schedule
        (HF's "cosine"/"linear" decay to 0 at max_steps; "cosine_with_min_lr" otherwise)."""
        kwargs = {"max_steps": self.max_steps, "learning_rate": self.lr,
                  "warmup_steps": self.warmup_steps, "lr_scheduler_type": self.decay}
        if self.min_lr_ratio:
            if self.decay != "cosine":
                raise UpcycleError("a linear decay to a nonzero min_lr_ratio has no "
                                   "transformers scheduler; pass the recipe's scheduler()")
            kwargs["lr_scheduler_type"] = "cosine_with_min_lr"
            kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": self.min_lr_ratio}
        return kwargs

    def train_config(self):
        """An :class:`upcycle.training.TrainingConfig` with this budget, peak and warm-up (pass
        ``schedule=lambda opt, total: recipe.scheduler(opt)`` to :func:`upcycle.training.fit`
        for the decay; its default is the cosine)."""
        return TrainingConfig(max_steps=self.max_steps, lr=self.lr,
                              warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                              **self.extra)


def lemon_train_config(scratch_steps: int, *, peak_lr: float, warmup_steps: int,
                       budget: float = 0.55, decay: str = "cosine", min_lr_ratio: float = 0.0,
                       **kwargs) -> LemonRecipe:
    """The grown model's recipe: the from-scratch ``peak_lr`` and ``warmup_steps`` (required:
    they are the large model's from-scratch values, not defaults), ``budget`` x
    ``scratch_steps`` steps with the ``decay`` ("cosine" or "linear") ending at the last one.
    ``kwargs`` go to :meth:`LemonRecipe.train_config`."""
    if not 0 < budget <= 1:
        raise UpcycleError(f"budget: expected a fraction in (0, 1], got {budget}")
    if scratch_steps < 1:
        raise UpcycleError(f"scratch_steps: expected a positive number, got {scratch_steps}")
    steps = max(1, round(scratch_steps * budget))
    _check_recipe(peak_lr, warmup_steps, steps, decay, min_lr_ratio, "lemon_train_config")
    return LemonRecipe(max_steps=steps, lr=peak_lr, warmup_steps=min(warmup_steps, steps),
                       decay=decay, min_lr_ratio=min_lr_ratio, extra=dict(kwargs))
