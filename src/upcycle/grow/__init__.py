"""``upcycle.grow``: lossless model expansion (LEMON) and its baselines."""

from .baselines import expand_aki, expand_net2net
from .families import FAMILIES, SUPPORTED, Family, family_of
from .lemon import (
    METHODS,
    POST_LN_DEPTH_NOTE,
    GrowthPlan,
    example_inputs,
    expand,
    lemon_schedule,
    lemon_train_config,
    max_output_difference,
    plan_expansion,
)

__all__ = [
    "FAMILIES", "METHODS", "POST_LN_DEPTH_NOTE", "SUPPORTED", "Family", "GrowthPlan",
    "example_inputs", "expand", "expand_aki", "expand_net2net", "family_of",
    "lemon_schedule", "lemon_train_config", "max_output_difference", "plan_expansion",
]
