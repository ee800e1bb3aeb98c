"""upcycle: get more out of pretrained models on one GPU or a CPU.

- ``upcycle.soup``: model soups from checkpoints on disk (uniform, greedy, learned, MEHL-Soup)
- ``upcycle.tune``: memory-efficient tuning (SNELL, SHERL)
- ``upcycle.grow``: lossless model expansion (LEMON)
- ``upcycle.training``: training through ``transformers.Trainer`` (``fit``, ``TrainingConfig``)
"""

from .errors import UpcycleError
from .grow import expand, expand_aki, expand_net2net, lemon_schedule, max_output_difference
from .io.ingredients import open_ingredients, validate_ingredients
from .io.writing import save_model
from .soup import (
    LearnedConfig,
    MehlConfig,
    SoupResult,
    greedy_soup,
    learned_soup,
    mehl_soup,
    uniform_soup,
)
from .training.config import TrainingConfig
from .training.fit import FitResult, fit

_TUNE = ("SherlConfig", "SherlModel", "SnellConfig", "SnellModel", "get_sherl_model",
         "get_snell_model")
"""Names of ``upcycle.tune`` offered here too, imported on first use: importing the tuners
imports peft (SNELL is a peft method), seconds that a soup or a grow does not need."""


def __getattr__(name: str):
    if name in _TUNE:
        from . import tune  # deferred: peft and transformers load only when a tuner is used

        return getattr(tune, name)
    raise AttributeError(f"module 'upcycle' has no attribute {name!r}")


__version__ = "0.2.0"
__all__ = [
    "FitResult", "LearnedConfig", "MehlConfig", "SherlConfig", "SherlModel", "SnellConfig",
    "SnellModel", "SoupResult", "TrainingConfig", "UpcycleError", "__version__", "expand",
    "expand_aki", "expand_net2net", "fit", "get_sherl_model", "get_snell_model", "greedy_soup",
    "learned_soup", "lemon_schedule", "max_output_difference", "mehl_soup", "open_ingredients",
    "save_model", "uniform_soup", "validate_ingredients",
]
