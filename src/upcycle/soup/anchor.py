"""Fixed-weight merges as the start of a data-driven soup: the anchor of learned(+) and MEHL(+)
(``--init``) and greedy's merge candidates (``--candidates``).

A method that runs merges names them in its config (``init``: one; ``candidates``: several)
and keeps their settings in ``merge_configs`` (merge name -> that merge's config), made from
the same flags as the merge itself (``--density``, ``--lambda``, ``--weights``, ``--t``...):
:func:`resolve_merge_configs` fills them, :func:`check_merges` refuses an unknown name, a
count the merge cannot take, or bad settings before any work. A merge that reads ``--base``
(task arithmetic, TIES, DARE, Model Stock) makes the method need it too
(:func:`merges_need_base`).

What "starting from a merge" means for coefficients: the merge's state A is the anchor and
the fit moves away from it. When the merge is a per-tensor linear combination of the
ingredients (and of the base), it reports its coefficients and the soup's coefficients are
composed with them (:func:`compose_coefficients`), so a soup started from uniform, linear,
task arithmetic or Model Stock is still sum_r C[r, l] theta_r over its rows (the base first
where the merge has one). TIES, DARE and SLERP are not linear in the ingredients (a trim mask,
a sign election, a random drop, an angle): their state enters as one more row, "the anchor",
with soup^l = a_l A^l + sum_i C[i, l] theta_i^l (a = 1, C = 0 at the start).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from ..errors import UpcycleError
from ..io.source import TensorSource
from .common import SoupResult
from .merge import Sink, streamed_to
from .registry import SoupContext, SoupMethod, check_count, get_method, method_names

INIT_DEFAULT = "uniform"
"""The default start of learned(+) and MEHL(+): benchmarks/merge_quality.py (--quick, 10 LM
fine-tunes) gave MEHL+ its best held-out and test perplexity from the uniform soup (model stock
and task arithmetic within the interval, TIES behind); it needs no --base and is the
reference's start."""
INGREDIENTS = "ingredients"
"""Greedy's candidate that stands for every ingredient."""


def merge_choices() -> list[str]:
    """The merges a data-driven soup can start from: every registered method that needs no
    data (uniform, linear, task-arithmetic, ties, dare-linear, dare-ties, slerp, model-stock)."""
    return method_names(needs_data=False)


def merge_names(config) -> list[str]:
    """The merges ``config`` runs: its ``init`` and/or its ``candidates`` (less
    :data:`INGREDIENTS`), each once, in order."""
    names = []
    if getattr(config, "init", None) is not None:
        names.append(config.init)
    names += [c for c in getattr(config, "candidates", None) or () if c != INGREDIENTS]
    return list(dict.fromkeys(names))


def _entry(name: str, flag: str) -> SoupMethod:
    choices = merge_choices()
    if name not in choices:
        extra = f", {INGREDIENTS}" if flag == "--candidates" else ""
        raise UpcycleError(f"{flag} {name}: not a fixed-weight merge; choose from "
                           f"{', '.join(choices)}{extra}")
    return get_method(name)


def _flag(config, name: str) -> str:
    return "--init" if getattr(config, "init", None) == name else "--candidates"


def resolve_merge_configs(config, n: int, settings: Mapping):
    """``config`` with ``merge_configs`` holding each merge's config made from ``settings``
    (the command's method settings by field name, as for the method itself); a config without
    merges, or whose ``merge_configs`` is already set, is returned as it is."""
    names = merge_names(config)
    if not names or getattr(config, "merge_configs", None) is not None:
        return config
    made = {name: _entry(name, _flag(config, name)).make_config(n, **settings) for name in names}
    return dataclasses.replace(config, merge_configs=made)


def merges_need_base(config) -> list[str]:
    """The merges of ``config`` that read ``--base`` (refused names are left to
    :func:`check_merges`)."""
    return [m for m in merge_names(config) if m in merge_choices() and get_method(m).needs_base]


def check_merges(config, n: int, *, has_base: bool | None = None) -> None:
    """Before any work: every merge of ``config`` is a known fixed-weight merge that takes
    ``n`` ingredients, its settings are valid, and (``has_base`` given) it has the base it
    needs. One :class:`UpcycleError` naming the flag."""
    configs = getattr(config, "merge_configs", None) or {}
    for name in merge_names(config):
        flag = _flag(config, name)
        entry = _entry(name, flag)
        try:
            check_count(entry, n)
        except UpcycleError as exc:
            raise UpcycleError(f"{flag} {name}: {exc}") from None
        if has_base is False and entry.needs_base:
            raise UpcycleError(f"{flag} {name} needs --base: the model the ingredients were "
                               f"fine-tuned from (its task vectors are theta_i - theta_0)")
        if entry.check is not None:
            entry.check(configs.get(name) or entry.make_config(n), n)


def run_merge(name: str, ingredients: Sequence[TensorSource], context: SoupContext,
              config, sink: Sink | None = None) -> SoupResult:
    """The merge ``name`` of ``ingredients`` in fp32 (the start of a fit keeps fp32, whatever
    the ingredients' dtype), its config ``merge_configs[name]`` (None: its defaults). With
    ``sink``, each merged tensor goes to ``sink(name, tensor)`` as it is made and the result's
    state is empty (:func:`~upcycle.soup.merge.streamed_to`)."""
    entry = _entry(name, _flag(config, name))
    configs = getattr(config, "merge_configs", None) or {}
    merge_config = configs.get(name) or entry.make_config(len(ingredients))
    check_merges(config, len(ingredients), has_base=context.base is not None)
    quiet = dataclasses.replace(context, dtype=torch.float32, progress=False)
    if sink is None:
        return entry.run(ingredients, quiet, merge_config)
    with streamed_to(sink):
        return entry.run(ingredients, quiet, merge_config)


def anchor_rows(anchor: SoupResult, ingredients: list[str]) -> list[str]:
    """The rows of a soup started from ``anchor``: the merge's own rows when it is linear in
    them (the base first where it has one), else "the anchor" then the ingredients."""
    if anchor.coefficients is not None:
        return list(anchor.ingredients)
    return [f"<{anchor.method} merge (the anchor)>", *ingredients]


def compose_coefficients(anchor: SoupResult, weight: torch.Tensor, coefficients: torch.Tensor,
                         blocks: Sequence[str], names: Sequence[str],
                         block_of: Sequence[int], ingredients: list[str],
                         ) -> tuple[torch.Tensor, list[str], list[str]]:
    """The soup's coefficients over :func:`anchor_rows` for soup^l = weight[l] A^l +
    sum_i coefficients[i, l] theta_i^l (``weight``: L, ``coefficients``: N x L over the fit's
    ``blocks``; ``names``/``block_of``: each parameter and its block). Returns (C, rows,
    blocks); per parameter tensor when the anchor's coefficients are (Model Stock)."""
    weight, coefficients = weight.double(), coefficients.double()
    rows = anchor_rows(anchor, ingredients)
    if anchor.coefficients is None:
        return torch.cat([weight[None], coefficients]), rows, list(blocks)
    a = anchor.coefficients.double()
    where = [rows.index(name) for name in ingredients]
    if a.shape[1] == 1:
        out = weight[None] * a
        out[where] += coefficients
        return out, rows, list(blocks)
    column = {name: j for j, name in enumerate(anchor.blocks)}
    out = torch.zeros(len(rows), len(names), dtype=torch.float64)
    for j, (name, block) in enumerate(zip(names, block_of)):
        out[:, j] = weight[block] * a[:, column[name]]
        out[where, j] += coefficients[:, block]
    return out, rows, list(names)
