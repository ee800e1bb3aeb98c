"""upcycle: get more out of pretrained models on one GPU or a CPU.

- ``upcycle.soup``: model soups from checkpoints on disk (uniform, greedy, learned, MEHL-Soup)
- ``upcycle.tune``: memory-efficient tuning (SNELL, SHERL)
- ``upcycle.grow``: lossless model expansion (LEMON)
- ``upcycle.training``: training through ``transformers.Trainer`` (``fit``, ``TrainingConfig``)
"""

import importlib

_EXPORTS = {
    "UpcycleError": "errors",
    "expand": "grow", "expand_aki": "grow", "expand_net2net": "grow",
    "lemon_schedule": "grow", "max_output_difference": "grow",
    "open_ingredients": "io.ingredients", "validate_ingredients": "io.ingredients",
    "save_model": "io.writing",
    "LearnedConfig": "soup", "MehlConfig": "soup", "SoupResult": "soup", "greedy_soup": "soup",
    "learned_soup": "soup", "mehl_soup": "soup", "uniform_soup": "soup",
    "TrainingConfig": "training.config",
    "FitResult": "training.fit", "fit": "training.fit",
    "SherlConfig": "tune", "SherlModel": "tune", "SnellConfig": "tune", "SnellModel": "tune",
    "get_sherl_model": "tune", "get_snell_model": "tune",
}
"""Each public name and the module that defines it, imported on first use: ``import upcycle``
costs nothing, so the command line can answer before torch (seconds) is loaded, and a soup
never imports the tuners (peft, transformers)."""

_SUBPACKAGES = ("cli", "demo", "errors", "grow", "io", "jobs", "models", "ops", "runtime",
                "soup", "tasks", "training", "tune")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:  # ``upcycle.soup`` after a bare ``import upcycle``
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'upcycle' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.2.0"
__all__ = [
    "FitResult", "LearnedConfig", "MehlConfig", "SherlConfig", "SherlModel", "SnellConfig",
    "SnellModel", "SoupResult", "TrainingConfig", "UpcycleError", "__version__", "expand",
    "expand_aki", "expand_net2net", "fit", "get_sherl_model", "get_snell_model", "greedy_soup",
    "learned_soup", "lemon_schedule", "max_output_difference", "mehl_soup", "open_ingredients",
    "save_model", "uniform_soup", "validate_ingredients",
]
