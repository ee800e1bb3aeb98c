"""Task arithmetic (Ilharco et al. 2023): theta = theta_0 + lambda * sum_i w_i (theta_i -
theta_0), relative to the base ``--base``, streamed one tensor at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..io.source import TensorSource
from .common import SoupResult, ingredient_names
from .merge import check_weights, require_base, resolve_weights, stream_merge
from .registry import SoupContext, SoupMethod, register
from .task_vectors import combine, task_vector_coefficients


@dataclass
class TaskArithmeticConfig:
    weights: list[float] | None = field(default=None, metadata={"metavar": "W"})
    """one weight per ingredient, in their order (default: 1 each)"""
    lambda_: float = field(default=1.0, metadata={"flag": "--lambda"})
    """the scale of the merged task vector, theta = theta_0 + lambda * merged (mergekit's
    ``lambda``)"""
    normalize: bool = False
    """divide the weighted sum of task vectors by the sum of the weights (mergekit's
    ``normalize``)"""


def task_arithmetic_soup(ingredients: Sequence[TensorSource], base: TensorSource,
                         config: TaskArithmeticConfig, *, dtype: torch.dtype | None = None,
                         progress: bool = False) -> SoupResult:
    """theta_0 + lambda * sum_i w_i tau_i [/ sum_i w_i] per tensor, in fp64, rounded once."""
    w = resolve_weights(config.weights, len(ingredients))
    state = stream_merge(
        ingredients, lambda reads: combine(reads, w, normalize=config.normalize,
                                           scale=config.lambda_),
        base=base, dtype=dtype, progress=progress, desc="task arithmetic")
    coefficients = task_vector_coefficients(w, normalize=config.normalize, scale=config.lambda_)
    return SoupResult("task-arithmetic", state, [str(base.path), *ingredient_names(ingredients)],
                      coefficients, ["<model>"],
                      info={"base": str(base.path), "weights": w, "lambda": config.lambda_,
                            "normalize": config.normalize,
                            "coefficient_rows": "the base, then the ingredients"})


def _run(ingredients, context: SoupContext, config: TaskArithmeticConfig) -> SoupResult:
    base = require_base(context, ingredients, "task-arithmetic")
    return task_arithmetic_soup(ingredients, base, config, dtype=context.dtype,
                                progress=context.progress)


def _check(config: TaskArithmeticConfig, n: int) -> None:
    check_weights(config.weights, n, config.normalize)


register(SoupMethod("task-arithmetic", _run, "Task arithmetic",
                    "the base plus lambda times the weighted sum of the ingredients' task "
                    "vectors (theta_i - base)",
                    config_class=TaskArithmeticConfig, check=_check, needs_base=True))
