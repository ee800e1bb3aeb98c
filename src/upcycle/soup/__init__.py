"""Model soups from checkpoints on disk: uniform, greedy, Learned-Soup(+), MEHL-Soup(+).

Each method registers itself in :data:`SOUP_METHODS` (:mod:`upcycle.soup.registry`) when its
module is imported; the order of the imports below is the order of ``--method``'s choices.
"""

# isort: off
from .uniform import uniform_soup
from .greedy import greedy_soup
from .learned import LearnedConfig, learned_soup
from .mehl import MehlConfig, mehl_soup
# isort: on
from .common import SoupResult
from .registry import SOUP_METHODS, SoupContext, SoupMethod, get_method, register

METHODS = tuple(SOUP_METHODS)
"""The registered methods' names when the package was imported (kept for old imports; the
registry itself is :data:`SOUP_METHODS`)."""

__all__ = ["METHODS", "SOUP_METHODS", "LearnedConfig", "MehlConfig", "SoupContext", "SoupMethod",
           "SoupResult", "get_method", "greedy_soup", "learned_soup", "mehl_soup", "register",
           "uniform_soup"]
