"""SLERP (Shoemake 1985), as mergekit's ``slerp``: per tensor, the spherical interpolation
between two ingredients, t = 0 the first and t = 1 the second, falling back to linear
interpolation when they are nearly colinear; streamed one tensor at a time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UpcycleError
from ..io.source import TensorSource
from .common import SoupResult, ingredient_names
from .merge import TensorReads, stream_merge
from .registry import SoupContext, SoupMethod, register

DOT_THRESHOLD = 0.9995
"""|cos Omega| above this: the two tensors are taken as colinear and interpolated linearly
(mergekit's threshold)."""
EPS = 1e-8
"""A tensor whose norm is at most this is not normalised (mergekit's)."""


@dataclass
class SlerpConfig:
    t: float = 0.5
    """SLERP: the interpolation factor in [0, 1] (0: the first ingredient, 1: the second)"""


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sin((1 - t) Omega) / sin Omega * a + sin(t Omega) / sin Omega * b, Omega the angle
    between the flattened a and b (on copies normalised to unit norm), or (1 - t) a + t b
    when |cos Omega| > :data:`DOT_THRESHOLD`; in the inputs' dtype."""
    na, nb = a.norm(), b.norm()
    ua = a / na if na > EPS else a
    ub = b / nb if nb > EPS else b
    dot = float((ua * ub).sum())
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    s0 = math.sin(omega - omega * t) / math.sin(omega)
    s1 = math.sin(omega * t) / math.sin(omega)
    return s0 * a + s1 * b


def slerp_soup(ingredients: Sequence[TensorSource], config: SlerpConfig, *,
               dtype: torch.dtype | None = None, progress: bool = False) -> SoupResult:
    """SLERP of the two ingredients per tensor, in fp64, rounded once."""
    if len(ingredients) != 2:
        raise UpcycleError(f"method 'slerp' needs exactly 2 ingredients, got {len(ingredients)}")

    def merge_one(reads: TensorReads) -> torch.Tensor:
        return slerp(config.t, reads.ingredient(0), reads.ingredient(1))

    state = stream_merge(ingredients, merge_one, dtype=dtype, progress=progress, desc="slerp")
    return SoupResult("slerp", state, ingredient_names(ingredients), info={"t": config.t})


def _run(ingredients, context: SoupContext, config: SlerpConfig) -> SoupResult:
    return slerp_soup(ingredients, config, dtype=context.dtype, progress=context.progress)


def _check(config: SlerpConfig, n: int) -> None:
    if not 0 <= config.t <= 1:
        raise UpcycleError(f"--t {config.t}: expected a value in [0, 1] (0: the first "
                           f"ingredient, 1: the second)")


register(SoupMethod("slerp", _run, "SLERP",
                    "the spherical interpolation between two ingredients, per tensor",
                    config_class=SlerpConfig, check=_check, min_ingredients=2,
                    max_ingredients=2))
