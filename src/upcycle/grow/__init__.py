"""``upcycle.grow``: lossless model expansion (LEMON) and its baselines.

- :mod:`.plan`: the target dimensions checked against the model (:func:`plan_expansion`);
- :mod:`.growth`: what an expansion needs, worked out from shapes (the grown config, the
  tied head, the layout check);
- :mod:`.lemon`: the lossless expansion itself, piece by piece (:func:`expand`);
- :mod:`.stream`: the same expansion of a model folder, streamed tensor by tensor
  (:func:`expand_folder`);
- :mod:`.baselines`: Net2Net, bert2BERT-AKI and G_stack depth stacking on the same
  machinery;
- :mod:`.recipe`: the grown model's training recipe (:func:`lemon_train_config`,
  :func:`lemon_schedule`);
- :mod:`.check`: comparing the source and the grown model (:func:`max_output_difference`).

The model families LEMON knows are the architectures of :mod:`upcycle.models.families` (the
one map every method reads). "Family" and "architecture" are one concept: ``FAMILIES``,
``Family`` and ``family_of`` are aliases of ``ARCHITECTURES``, ``Architecture`` and
``architecture_of(model).arch``, kept as names, not a second map.
"""

from ..models.families import ARCHITECTURES as FAMILIES
from ..models.families import Architecture as Family
from ..models.families import supported
from ..models.matching import architecture_of
from .baselines import expand_aki, expand_net2net, expand_stack
from .check import example_inputs, max_output_difference
from .lemon import POST_LN_DEPTH_NOTE, expand
from .plan import METHODS, GrowthPlan, plan_expansion
from .recipe import SCHEDULES, LemonRecipe, lemon_schedule, lemon_train_config
from .stream import FolderGrowth, expand_folder, stream_blocker


def family_of(model) -> Family:
    """An alias: the :class:`upcycle.models.families.Architecture` of a HF model, i.e.
    ``upcycle.models.matching.architecture_of(model, method="LEMON").arch`` (a "family" is an
    architecture of the map)."""
    return architecture_of(model, method="LEMON").arch


__all__ = [
    "FAMILIES", "METHODS", "FolderGrowth", "POST_LN_DEPTH_NOTE", "SCHEDULES", "Family", "GrowthPlan", "LemonRecipe",
    "example_inputs", "expand", "expand_aki", "expand_folder", "expand_net2net", "expand_stack",
    "family_of",
    "lemon_schedule", "lemon_train_config", "max_output_difference", "plan_expansion", "stream_blocker",
    "supported",
]
