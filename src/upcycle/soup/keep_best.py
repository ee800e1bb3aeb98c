"""What a fitted soup (learned(+), MEHL(+)) guarantees about its start: it never returns a
model worse on held-out than the start (its ``--init`` merge), and it says when a round is too
short to move.

Keep-best: the held-out loss (the loss the fit minimises: the task's held-out evaluation when
the job gives one, else the target-weighted mean of ``loss_fn`` over the held-out batches) is
measured at the start and after every round (MEHL) or epoch (learned); the soup returned is
the state with the lowest, the start included. When no round beat the start, one
:class:`UpcycleWarning` line says so with both figures and the result's ``info["keep_best"]``
records it (the job adds a table row for the fit that was not kept).

Too few steps: a round of AdamW on the coefficients needs :data:`MIN_ROUND_STEPS` steps to
move (see there); a shorter round gets one warning line before the fit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import UpcycleWarning
from ..runtime import distributed
from ..runtime.devices import autocast
from .common import _targets_per_row, local_share, to_device

MIN_ROUND_STEPS = 10
"""The fewest coefficient steps a round needs to move. Adam's first moment averages the last
1 / (1 - beta1) = 10 gradients: below that its update is the sign of a few batches' gradient
(bias correction makes the very first steps full-size in whatever direction they start), and
the round's warm-up + cosine schedule averages half the learning rate, so in S steps a
coefficient moves at most ~lr * S / 2 (0.02 for MEHL's lr 0.01 at S = 4: a soup within
noise of its start). The issue's MEHL+ run that ended worse than its start took ~4 a round."""


def warn_few_steps(method: str, steps: int, epochs: int, batches: int, lr: float,
                   what: str = "each round") -> None:
    """One warning line when ``steps`` (= ``epochs`` x ``batches``) < :data:`MIN_ROUND_STEPS`."""
    if steps >= MIN_ROUND_STEPS or not distributed.is_main():
        return
    warnings.warn(
        f"{method}: {what} takes {steps} coefficient step(s) ({epochs} epoch(s) x {batches} "
        f"held-out batch(es)), fewer than the {MIN_ROUND_STEPS} a round needs to move (Adam "
        f"averages 10 gradients; at lr {lr:g} the coefficients move at most ~{lr * steps / 2:.2g})"
        f": raise --epochs or lower --batch-size", UpcycleWarning, stacklevel=3)


@torch.no_grad()
def held_out_loss(model: nn.Module, held_out: Sequence[dict],
                  loss_fn: Callable[[nn.Module, dict], torch.Tensor], device: torch.device,
                  precision: str | None) -> float:
    """The mean of ``loss_fn`` over every loss target of the global held-out batches (each
    batch's mean weighted by its targets; under torch.distributed each rank its share)."""
    total, count = 0.0, 0.0
    for batch in held_out:
        local, share = local_share(batch)
        if local is None:
            continue
        labels = batch.get("labels")
        targets = (float(_targets_per_row(labels).sum()) if labels is not None
                   else float(len(next(iter(batch.values())))))
        with autocast(device, precision):
            loss = loss_fn(model, to_device(local, device))
        mean = distributed.all_reduce_sum(loss.detach().float().reshape(1) * share)
        total += float(mean) * targets
        count += targets
    return total / max(count, 1.0)


class KeepBest:
    """The best held-out state of a fit, the start included: ``offer`` each round's metrics
    (``{"loss": ...}`` and the rest of the evaluation) with a function that snapshots the
    state; a snapshot is taken only when the round is the best so far (CPU, one model)."""

    def __init__(self, method: str, init: str, start: dict, snapshot: Callable[[], object]):
        self.method, self.init = method, init
        self.start = dict(start)
        self.best_label, self.best_metrics, self.best_state = "start", dict(start), snapshot()
        self.fit_best: tuple[str, dict] | None = None

    def offer(self, label: str, metrics: dict, snapshot: Callable[[], object]) -> bool:
        """Record a round's held-out ``metrics``; keep its state when it is the best so far."""
        if self.fit_best is None or metrics["loss"] < self.fit_best[1]["loss"]:
            self.fit_best = (label, dict(metrics))
        if metrics["loss"] < self.best_metrics["loss"]:
            self.best_label, self.best_metrics, self.best_state = label, dict(metrics), snapshot()
            return True
        return False

    def restore(self, saved: dict, state: object) -> None:
        """Continue from a checkpoint's :meth:`summary` and its best state."""
        self.start = saved["start"]
        self.best_label, self.best_metrics = saved["kept"], saved["kept_held_out"]
        self.fit_best = (saved["fit_best"], saved["fit_best_held_out"]) \
            if saved.get("fit_best") else None
        self.best_state = state

    @property
    def improved(self) -> bool:
        return self.best_label != "start"

    def summary(self) -> dict:
        """For ``SoupResult.info["keep_best"]`` (and checkpoints)."""
        out = {"init": self.init, "start": self.start, "kept": self.best_label,
               "kept_held_out": self.best_metrics, "improved": self.improved,
               "fit_best": None, "fit_best_held_out": None}
        if self.fit_best is not None:
            out["fit_best"], out["fit_best_held_out"] = self.fit_best
        return out

    def finish(self) -> dict:
        """The summary, after one warning line when no round beat the start."""
        summary = self.summary()
        if not self.improved and self.fit_best is not None and distributed.is_main():
            label, metrics = self.fit_best
            warnings.warn(
                f"{self.method}: the fit did not improve on its start (--init {self.init}): "
                f"held-out loss {self.start['loss']:.4f} at the start, "
                f"{metrics['loss']:.4f} at best ({label}); the soup is the start",
                UpcycleWarning, stacklevel=3)
        return summary


def not_kept_row(method: str, result) -> dict | None:
    """A table row for a fit that did not beat its start (the soup is the start): the
    held-out metrics of its best round, or None when the fit improved."""
    kept = result.info.get("keep_best")
    if not kept or kept["improved"] or not kept["fit_best_held_out"]:
        return None
    return {"method": f"{method} fit, not kept ({kept['fit_best']}; the soup is its start, "
                      f"--init {kept['init']})",
            **{f"held_out_{k}": v for k, v in kept["fit_best_held_out"].items()}}
