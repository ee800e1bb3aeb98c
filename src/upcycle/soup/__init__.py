"""Model soups from checkpoints on disk: uniform, greedy, Learned-Soup(+), MEHL-Soup(+)."""

from .common import SoupResult
from .greedy import greedy_soup
from .learned import LearnedConfig, learned_soup
from .mehl import MehlConfig, mehl_soup
from .uniform import uniform_soup

METHODS = ("uniform", "greedy", "learned", "learned+", "mehl", "mehl+")

__all__ = ["METHODS", "LearnedConfig", "MehlConfig", "SoupResult", "greedy_soup", "learned_soup",
           "mehl_soup", "uniform_soup"]
