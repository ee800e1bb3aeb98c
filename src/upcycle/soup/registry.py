"""The soup methods, one entry each, registered by the module that implements the method.

A method is a function ``run(ingredients, context, config) -> SoupResult``: ``context``
(:class:`SoupContext`) carries what the job provides (the model, the held-out batches, the
task's loss/evaluation/score functions, device, precision, dtype, progress, checkpointing),
``config`` is an instance of the entry's ``config_class`` (None for a method without
settings). Variants are entries of their own with a preset config (``mehl+`` is MEHL with
``blockwise=True``), not names to parse. Adding a method is one module that defines ``run``
and calls :func:`register` once; the job (:mod:`upcycle.jobs.soup`), the CLI's ``--method``
choices and flags, and the model card's title and note all read this registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UpcycleError
from ..io.source import TensorSource


@dataclass
class SoupContext:
    """What a job hands a soup method; a method reads only what it needs (the model and the
    held-out batches are loaded when first asked for: :attr:`model`, :attr:`held_out`)."""
    load_model: Callable[[], nn.Module] | None = None
    """Returns the model the ingredients are checkpoints of (None without data)."""
    load_held_out: Callable[[], Sequence[dict]] | None = None
    """Returns the global held-out batches to fit on (each rank takes its share of every
    batch); None without data."""
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None
    """The task's loss of a model on a batch (None: the loss the model itself returns)."""
    eval_fn: Callable[[nn.Module], dict] | None = None
    """Held-out metrics of the model as it is (for the history of fitted soups)."""
    score_fn: Callable[[dict[str, torch.Tensor]], float] | None = None
    """Held-out score of a state dict, higher is better (greedy)."""
    ingredient_scores: Sequence[float] | None = None
    """Each ingredient's score, when the job already has them (greedy)."""
    device: torch.device | None = None
    precision: str | None = None
    dtype: torch.dtype | None = None
    progress: bool = False
    checkpoint_dir: Path | None = None
    """Resumable methods: where the checkpoint after every round goes."""
    resume: bool = False
    callback: Callable[[dict], None] | None = None
    """Resumable methods: called with each round's record once its checkpoint is written."""
    base: TensorSource | None = None
    """The base model theta_0 the ingredients are fine-tunes of (``--base``), read one tensor
    at a time; the merges relative to a base (task arithmetic, TIES, DARE, Model Stock) need
    it (see :attr:`SoupMethod.needs_base`)."""

    @property
    def model(self) -> nn.Module | None:
        return None if self.load_model is None else self.load_model()

    @property
    def held_out(self) -> Sequence[dict]:
        return () if self.load_held_out is None else self.load_held_out()


@dataclass(frozen=True)
class SoupMethod:
    """One soup method: its name, its function and what it needs."""
    name: str
    run: Callable[[Sequence, SoupContext, Any], Any]
    """``run(ingredients, context, config) -> SoupResult``."""
    title: str
    """For model cards and reports, e.g. "MEHL-Soup+"."""
    note: str
    """One line for the model card: how the soup is made."""
    config_class: type | None = None
    """The dataclass of the method's settings (None: it has none)."""
    preset: dict = field(default_factory=dict)
    """Settings this entry fixes (``{"blockwise": True}`` for the "+" variants)."""
    needs_data: bool = False
    """Needs held-out data (and the model) to make the soup."""
    min_ingredients: int = 1
    max_ingredients: int | None = None
    """At most this many ingredients (SLERP: exactly 2); None: no limit."""
    needs_base: bool = False
    """Needs the base model (``--base``, :attr:`SoupContext.base`): task vectors are
    theta_i - theta_0."""
    defaults: Callable[[int], dict] | None = None
    """Settings whose default depends on the number of ingredients: ``n -> {field: value}``
    (MEHL's K is min(18, N)); used where a setting is not given."""
    check: Callable[[Any, int], None] | None = None
    """``check(config, n_ingredients)``: refuse settings that cannot work, before any work."""
    check_resume: Callable[[Sequence, SoupContext, Any], dict] | None = None
    """Resumable methods: ``check_resume(ingredients, context, config)`` checks the checkpoint
    in ``context.checkpoint_dir`` against this run before any work (raises saying what
    differs) and returns its state (rounds done, history...)."""

    @property
    def resumable(self) -> bool:
        return self.check_resume is not None

    def make_config(self, n_ingredients: int | None = None, **settings):
        """The method's config from ``settings``: the fields its config class has (None values
        and other names are left out, i.e. the defaults; with ``n_ingredients``, the
        :attr:`defaults` for that many), then the entry's preset."""
        if self.config_class is None:
            return None
        names = {f.name for f in dataclasses.fields(self.config_class)}
        kept = {k: v for k, v in settings.items() if k in names and v is not None}
        if self.defaults is not None and n_ingredients is not None:
            kept = {**self.defaults(n_ingredients), **kept}
        return self.config_class(**{**kept, **self.preset})


SOUP_METHODS: dict[str, SoupMethod] = {}
"""Every registered soup method by name, in registration order."""


def register(method: SoupMethod) -> SoupMethod:
    """Add ``method`` to :data:`SOUP_METHODS` (a name is registered once)."""
    if method.name in SOUP_METHODS and SOUP_METHODS[method.name] is not method:
        raise UpcycleError(f"soup method {method.name!r} is already registered")
    SOUP_METHODS[method.name] = method
    return method


def get_method(name: str) -> SoupMethod:
    """The registered method called ``name`` (raises naming the known ones)."""
    if name not in SOUP_METHODS:
        raise UpcycleError(f"unknown soup method {name!r}; choose from {', '.join(SOUP_METHODS)}")
    return SOUP_METHODS[name]


def check_count(method: SoupMethod, n: int) -> None:
    """Refuse ``n`` ingredients when ``method`` takes fewer or more (one line naming both)."""
    low, high = method.min_ingredients, method.max_ingredients
    if low <= n and (high is None or n <= high):
        return
    want = (f"exactly {low}" if low == high else f"at least {low}" if high is None
            else f"{low} to {high}")
    raise UpcycleError(f"method {method.name!r} needs {want} ingredients, got {n}")


def method_names(*, resumable: bool | None = None, needs_data: bool | None = None,
                 needs_base: bool | None = None) -> list[str]:
    """Names of the registered methods, optionally only the (non-)resumable or those that
    (do not) need data or a base."""
    return [m.name for m in SOUP_METHODS.values()
            if (resumable is None or m.resumable == resumable)
            and (needs_data is None or m.needs_data == needs_data)
            and (needs_base is None or m.needs_base == needs_base)]


def config_classes() -> list[type]:
    """The registered methods' config classes, each once, in registration order."""
    out: list[type] = []
    for m in SOUP_METHODS.values():
        if m.config_class is not None and m.config_class not in out:
            out.append(m.config_class)
    return out
