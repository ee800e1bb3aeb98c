"""``upcycle.grow``: lossless model expansion (LEMON) and its baselines.

The model families LEMON knows are those of :mod:`upcycle.models.architectures` (the one map every
method reads); ``FAMILIES``/``Family``/``family_of`` are kept as names for it.
"""

from ..models.architectures import ARCHITECTURES as FAMILIES
from ..models.architectures import Architecture as Family
from ..models.architectures import architecture_of, supported
from .baselines import expand_aki, expand_net2net
from .lemon import (
    METHODS,
    POST_LN_DEPTH_NOTE,
    SCHEDULES,
    GrowthPlan,
    LemonRecipe,
    example_inputs,
    expand,
    lemon_schedule,
    lemon_train_config,
    max_output_difference,
    plan_expansion,
)


def family_of(model) -> Family:
    """The family (an :class:`upcycle.models.architectures.Architecture`) of a HF model."""
    return architecture_of(model, method="LEMON").arch


__all__ = [
    "FAMILIES", "METHODS", "POST_LN_DEPTH_NOTE", "SCHEDULES", "Family", "GrowthPlan", "LemonRecipe",
    "example_inputs", "expand", "expand_aki", "expand_net2net", "family_of",
    "lemon_schedule", "lemon_train_config", "max_output_difference", "plan_expansion",
    "supported",
]
