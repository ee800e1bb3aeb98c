"""The streamed per-tensor machinery of the fixed-weight merges (linear, task arithmetic,
TIES, DARE, SLERP, Model Stock): one tensor name at a time, every ingredient read one at a
time, arithmetic in fp64, rounded once to the output dtype.

Peak memory is the output plus a few fp64 copies of the largest tensor (the base's, one
ingredient's and the method's accumulators), whatever the number of ingredients: a method that
needs a statistic over all ingredients before it can combine them (TIES' sign election, Model
Stock's angle) reads them twice rather than holding N tensors. Tensors that are not floating
point come from the first ingredient; a tied parameter stored under several names is merged
once and every name gets that one tensor (a random method would otherwise draw two masks for
it).

Inside :func:`streamed_to` the output is not held either: each merged tensor is handed to a
sink as soon as it is made (the start of a learned or MEHL soup writes it straight into its
anchor), so a merge's peak is a few tensors, not a model. Every method that merges through
:func:`stream_merge` streams this way without knowing it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from tqdm.auto import tqdm

from ..errors import UpcycleError
from ..io.source import TensorSource
from .common import _tied_groups_of_folder, out_dtype
from .registry import SoupContext

WORK = torch.float64
"""The dtype every merge computes in."""


class TensorReads:
    """One tensor name of the base and of every ingredient, read when asked (fp64, CPU); the
    base's tensor is read once and kept for this name only."""

    def __init__(self, name: str, ingredients: Sequence[TensorSource],
                 base: TensorSource | None):
        self.name = name
        self.ingredients = ingredients
        self._base_source = base
        self._base: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ingredients)

    @property
    def base(self) -> torch.Tensor:
        if self._base_source is None:
            raise UpcycleError(f"tensor {self.name!r}: this merge needs --base")
        if self._base is None:
            self._base = self._base_source.get(self.name).to(WORK)
        return self._base

    def ingredient(self, i: int) -> torch.Tensor:
        """Ingredient ``i`` (0-based)'s tensor, read now."""
        return self.ingredients[i].get(self.name).to(WORK, copy=True)

    def delta(self, i: int) -> torch.Tensor:
        """The task vector tau_i = theta_i - theta_0 of this tensor, read now."""
        return self.ingredient(i).sub_(self.base)


def tied_aliases(ingredients: Sequence[TensorSource]) -> dict[str, str]:
    """Stored names of a tied parameter beyond its first: alias -> the name that is merged
    (from the first ingredient's HF config; none for bare checkpoint files)."""
    folder = ingredients[0].hf_dir
    if folder is None or not (folder / "config.json").is_file():
        return {}
    keys = ingredients[0].keys()
    key_set, aliases = set(keys), {}
    for group in _tied_groups_of_folder(folder):
        present = [n for n in group if n in key_set]
        aliases.update({alias: present[0] for alias in present[1:]})
    return aliases


Sink = Callable[[str, torch.Tensor], None]
"""``sink(name, tensor)``: takes one merged tensor (and keeps it or not)."""

_SINK: ContextVar[Sink | None] = ContextVar("upcycle_merge_sink", default=None)


@contextmanager
def streamed_to(sink: Sink) -> Iterator[None]:
    """Within this block, :func:`stream_merge` hands every tensor it makes to ``sink`` (under
    each of its names, tied aliases included) instead of returning it: the merge's state is
    then empty, and its other results (coefficients, info) are as usual."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def stream_merge(ingredients: Sequence[TensorSource], merge_one: Callable[[TensorReads], torch.Tensor],
                 *, base: TensorSource | None = None, dtype: torch.dtype | None = None,
                 progress: bool = False, desc: str = "merge") -> dict[str, torch.Tensor]:
    """The merged state dict: ``merge_one(reads)`` (fp64) for every floating tensor, in the
    first ingredient's key order, rounded to that tensor's dtype (or ``dtype``). Within
    :func:`streamed_to` each tensor goes to the sink as it is made and the dict is empty."""
    first = ingredients[0]
    bar = tqdm(first.keys(), desc=desc, disable=not progress, leave=False)  # shown first: a
    aliases = tied_aliases(ingredients)  # tied model's config imports transformers (seconds)
    names_of: dict[str, list[str]] = {}
    for alias, name in aliases.items():
        names_of.setdefault(name, [name]).append(alias)
    sink = _SINK.get()
    state: dict[str, torch.Tensor] = {}
    for name in bar:
        if name in aliases:
            continue
        if not first.dtype(name).is_floating_point:
            tensor = first.get(name).clone()
        else:
            tensor = merge_one(TensorReads(name, ingredients, base)).to(out_dtype(first, name, dtype))
        for each in names_of.get(name, [name]):
            if sink is None:
                state[each] = tensor
            else:
                sink(each, tensor)
    return {} if sink is not None else {name: state[name] for name in first.keys()}


# -- checks shared by the methods (before any work) ------------------------------------------

def check_base(base: TensorSource, ingredients: Sequence[TensorSource]) -> None:
    """``base`` has every tensor of the ingredients, in the same shapes: they are fine-tunes
    of it (headers only, nothing read)."""
    ref = ingredients[0]
    keys = set(base.keys())
    for name in ref.keys():
        if name not in keys:
            raise UpcycleError(f"--base {base.path}: has no tensor {name!r} of {ref.label}: the "
                               f"ingredients are not fine-tunes of this base")
        if base.shape(name) != ref.shape(name):
            raise UpcycleError(f"--base {base.path}: {name!r} has shape {base.shape(name)}, "
                               f"{ref.label} has {ref.shape(name)}: the ingredients are not "
                               f"fine-tunes of this base")


def require_base(context: SoupContext, ingredients: Sequence[TensorSource],
                 method: str) -> TensorSource:
    """The context's base, checked against the ingredients; an error when there is none."""
    if context.base is None:
        raise UpcycleError(f"method {method!r} needs --base: the model the ingredients were "
                           f"fine-tuned from (their task vectors are theta_i - theta_0)")
    check_base(context.base, ingredients)
    return context.base


def resolve_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-ingredient weights: ``weights`` (one per ingredient) or 1 each."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise UpcycleError(f"--weights: {len(weights)} value(s) for {n} ingredients (one weight "
                           f"per ingredient, in their order)")
    return [float(w) for w in weights]


def check_weights(weights: Sequence[float] | None, n: int, normalize: bool) -> None:
    """One weight per ingredient, and a non-zero sum when the merge divides by it."""
    w = resolve_weights(weights, n)
    if normalize and abs(sum(w)) < 1e-8:
        raise UpcycleError(f"--weights {' '.join(map(str, w))}: they sum to 0, and normalize "
                           f"divides by their sum (pass --no-normalize, or other weights)")


def check_density(density: float) -> None:
    """The fraction of each task vector kept (TIES) or the keep probability (DARE)."""
    if not 0 < density <= 1:
        raise UpcycleError(f"--density {density}: expected a fraction in (0, 1] (the share of "
                           f"each task vector that is kept; DARE's drop rate is 1 - density)")


def seeded_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A CPU generator for ingredient ``index``'s tensor ``name`` under ``seed``: the same
    draws whatever the order the tensors are merged in or how often they are read."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
