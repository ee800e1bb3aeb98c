"""The Task protocol: what a job needs from a task, whatever its kind.

A task is a model folder plus the data it trains and is judged on. The soups, the tuners and
the full fine-tune see only this protocol, so a new kind of task (e.g. token
classification) is one module implementing it plus one branch in :func:`upcycle.tasks.load_task`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..errors import UpcycleError


@runtime_checkable
class Task(Protocol):
    name: str
    """"classification" or "causal-lm" (``--task``)."""
    metric_names: tuple[str, ...]
    """The metrics :meth:`evaluate` reports, headline first."""
    model_dir: Path

    def load_model(self, *, dtype: torch.dtype | None = None) -> nn.Module:
        """The task's model, in eval mode, on the CPU."""

    def read(self, path: str | os.PathLike, *, split: str = "data") -> Any:
        """One split of data, read and checked (errors name the file and line)."""

    def read_training(self, path: str | os.PathLike) -> Any:
        """The training split (for classification it fixes the class count)."""

    def split(self, data: Any, fraction: float, seed: int = 0) -> tuple[Any, Any]:
        """(rest, carved): ``fraction`` of ``data`` carved off, seeded."""

    def batches(self, data: Any, batch_size: int, *, shuffle: bool = False,
                seed: int = 0) -> list[dict]:
        """Model-ready batches with ``labels``."""

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The training loss of one batch (what the learned soups fit)."""

    def evaluate(self, model: nn.Module, batches: list[dict], *,
                 precision: str | None = None) -> dict:
        """The metrics over ``batches`` (summed over ranks under torch.distributed)."""

    def score(self, metrics: dict) -> float:
        """One number from :meth:`evaluate`'s metrics, higher is better (greedy soup)."""

    def describe(self, metrics: dict) -> str:
        """The metrics as one phrase for a summary table."""

    def collator(self) -> Any:
        """Examples of :meth:`dataset` -> a batch, for ``transformers.Trainer``."""

    def dataset(self, data: Any) -> torch.utils.data.Dataset:
        """A split as a map-style dataset of examples."""

    def trainer_metrics(self) -> dict:
        """Keyword arguments for :func:`upcycle.training.fit`'s evaluation metrics."""

    def save_tokenizer(self, folder: str | os.PathLike) -> None:
        """Write what a saved model of this task needs beside its weights to be used."""


def batch_indices(n: int, batch_size: int, *, shuffle: bool = False,
                  seed: int = 0) -> list[np.ndarray]:
    """The example indices of each batch of ``n`` examples, in order or shuffled (seeded)."""
    if batch_size < 1:
        raise UpcycleError(f"batch size must be >= 1, got {batch_size}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return [order[start:start + batch_size] for start in range(0, n, batch_size)]
