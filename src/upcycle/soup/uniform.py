"""Uniform soup: the plain mean of the ingredients, streamed one tensor at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..io.checkpoints import Ingredient
from .common import SoupResult, ingredient_names
from .merge import TensorReads, stream_merge
from .registry import SoupContext, SoupMethod, register


def uniform_soup(ingredients: Sequence[Ingredient], *, progress: bool = False,
                 dtype: torch.dtype | None = None) -> SoupResult:
    """theta = (1/N) sum_i theta_i, accumulated in fp64 and rounded once to each tensor's
    dtype, or to ``dtype`` when given (the exact mean, bit for bit). Runs on the CPU: it is
    bound by reading the checkpoints, not by arithmetic.

    Peak memory: the output, one fp64 accumulator (one tensor, not one model) and one tensor
    of one ingredient; never N models. Integer tensors are taken from the first ingredient.
    """
    n = len(ingredients)

    def merge_one(reads: TensorReads) -> torch.Tensor:
        acc = reads.ingredient(0)
        for i in range(1, n):
            acc += reads.ingredient(i)
        return acc.div_(n)

    state = stream_merge(ingredients, merge_one, dtype=dtype, progress=progress,
                         desc="uniform soup")
    coefficients = torch.full((n, 1), 1.0 / n, dtype=torch.float64)
    return SoupResult("uniform", state, ingredient_names(ingredients), coefficients, ["<model>"])


def _run(ingredients: Sequence[Ingredient], context: SoupContext, config: None) -> SoupResult:
    return uniform_soup(ingredients, progress=context.progress, dtype=context.dtype)


register(SoupMethod("uniform", _run, "Uniform soup", "the plain average of all ingredients"))
