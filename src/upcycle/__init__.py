"""upcycle: get more out of pretrained models on one GPU or a CPU.

- ``upcycle.soup``: model soups from checkpoints on disk (uniform, greedy, learned, MEHL-Soup)
- ``upcycle.tune``: memory-efficient tuning (SNELL, SHERL)
- ``upcycle.grow``: lossless model expansion (LEMON)
"""

from .errors import UpcycleError

__version__ = "0.1.0"
__all__ = ["UpcycleError", "__version__"]
