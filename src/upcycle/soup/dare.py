"""DARE (Yu et al. 2024, "Language Models are Super Mario"), as mergekit's ``dare_linear``
and ``dare_ties``: per tensor, drop each entry of each task vector with probability
p = 1 - density (a seeded draw per ingredient and tensor), rescale the survivors, then sum
them (dare-linear) or combine them with TIES' sign election and disjoint mean (dare-ties);
theta = theta_0 + lambda * merged. Relative to ``--base``, streamed one tensor at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UpcycleError
from ..io.source import TensorSource
from .common import SoupResult, ingredient_names
from .merge import (
    TensorReads,
    check_density,
    check_weights,
    require_base,
    resolve_weights,
    seeded_generator,
    stream_merge,
)
from .registry import SoupContext, SoupMethod, register
from .task_vectors import combine

RESCALES = ("inverse", "l1", "none")


@dataclass
class DareConfig:
    weights: list[float] | None = field(default=None, metadata={"metavar": "W"})
    """one weight per ingredient, in their order (default: 1 each)"""
    density: float = 1.0
    """the share of each task vector kept"""
    lambda_: float = field(default=1.0, metadata={"flag": "--lambda"})
    """the scale of the merged task vector"""
    normalize: bool = False
    """divide by the sum of the weights (dare-ties: of the agreeing entries' weights)"""
    rescale: str = field(default="inverse", metadata={"choices": RESCALES})
    """DARE: how the kept entries are rescaled: inverse (times 1/density = 1/(1 - p), the
    paper's), l1 (to the task vector's L1 norm, mergekit's ``rescale``) or none"""
    seed: int = 0
    """seeds the drop masks (one draw per ingredient and tensor)"""
    elect: bool = field(default=False, metadata={"cli": False})
    """TIES' sign election and disjoint mean (dare-ties) instead of a plain sum"""


def drop_and_rescale(tau: torch.Tensor, density: float, rescale: str,
                     generator: torch.Generator) -> torch.Tensor:
    """``tau`` with each entry kept with probability ``density`` (the draw: ``torch.rand``
    of tau's shape in fp64 from ``generator`` < density), the kept ones rescaled, in place."""
    if density >= 1:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) < density
    if rescale == "l1":
        before = tau.abs().sum()
        tau.mul_(keep)
        after = tau.abs().sum()
        return tau if before < 1e-7 or after < 1e-7 else tau.mul_(before / after)
    tau.mul_(keep)
    return tau.div_(density) if rescale == "inverse" else tau


def dare_soup(ingredients: Sequence[TensorSource], base: TensorSource, config: DareConfig, *,
              dtype: torch.dtype | None = None, progress: bool = False) -> SoupResult:
    """DARE per tensor in fp64, rounded once; the same seed gives the same soup."""
    w = resolve_weights(config.weights, len(ingredients))
    method = "dare-ties" if config.elect else "dare-linear"

    def merge_one(reads: TensorReads) -> torch.Tensor:
        def sparsify(i: int, tau: torch.Tensor) -> torch.Tensor:
            generator = seeded_generator(config.seed, reads.name, i)
            return drop_and_rescale(tau, config.density, config.rescale, generator)

        return combine(reads, w, sparsify=sparsify, elect=config.elect,
                       normalize=config.normalize, scale=config.lambda_)

    state = stream_merge(ingredients, merge_one, base=base, dtype=dtype, progress=progress,
                         desc=method)
    return SoupResult(method, state, ingredient_names(ingredients),
                      info={"base": str(base.path), "weights": w, "density": config.density,
                            "drop_rate": 1 - config.density, "rescale": config.rescale,
                            "seed": config.seed, "lambda": config.lambda_,
                            "normalize": config.normalize})


def _run(ingredients, context: SoupContext, config: DareConfig) -> SoupResult:
    base = require_base(context, ingredients, "dare-ties" if config.elect else "dare-linear")
    return dare_soup(ingredients, base, config, dtype=context.dtype, progress=context.progress)


def _check(config: DareConfig, n: int) -> None:
    check_density(config.density)
    check_weights(config.weights, n, config.normalize and not config.elect)
    if config.rescale not in RESCALES:
        raise UpcycleError(f"--rescale {config.rescale!r}: expected one of {', '.join(RESCALES)}")


register(SoupMethod("dare-linear", _run, "DARE (linear)",
                    "the base plus lambda times the weighted sum of the ingredients' task "
                    "vectors, each with a seeded random share 1 - density dropped and the rest "
                    "rescaled", config_class=DareConfig, check=_check, needs_base=True))
register(SoupMethod("dare-ties", _run, "DARE-TIES",
                    "the base plus the sign-elected disjoint combination of the ingredients' "
                    "task vectors, each with a seeded random share 1 - density dropped and the "
                    "rest rescaled", config_class=DareConfig, preset={"elect": True},
                    check=_check, needs_base=True))
