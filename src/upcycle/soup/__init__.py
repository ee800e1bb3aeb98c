"""Model soups from checkpoints on disk: uniform, the fixed-weight merges (linear, task
arithmetic, TIES, DARE, SLERP, Model Stock), greedy, Learned-Soup(+), MEHL-Soup(+).

Each method registers itself in :data:`SOUP_METHODS` (:mod:`upcycle.soup.registry`) when its
module is imported; the order of the imports below is the order of ``--method``'s choices.
"""

# isort: off
from .uniform import uniform_soup
from .linear import LinearConfig, linear_soup
from .task_arithmetic import TaskArithmeticConfig, task_arithmetic_soup
from .ties import TiesConfig, ties_soup
from .dare import DareConfig, dare_soup
from .slerp import SlerpConfig, slerp_soup
from .model_stock import model_stock_soup
from .greedy import GreedyConfig, greedy_soup
from .learned import LearnedConfig, learned_soup
from .mehl import MehlConfig, mehl_soup
# isort: on
from .common import SoupResult
from .registry import SOUP_METHODS, SoupContext, SoupMethod, get_method, register

METHODS = tuple(SOUP_METHODS)
"""The registered methods' names when the package was imported (kept for old imports; the
registry itself is :data:`SOUP_METHODS`)."""

__all__ = ["METHODS", "SOUP_METHODS", "DareConfig", "GreedyConfig", "LearnedConfig", "LinearConfig", "MehlConfig",
           "SlerpConfig", "SoupContext", "SoupMethod", "SoupResult", "TaskArithmeticConfig",
           "TiesConfig", "dare_soup", "get_method", "greedy_soup", "learned_soup",
           "linear_soup", "mehl_soup", "model_stock_soup", "register", "slerp_soup",
           "task_arithmetic_soup", "ties_soup", "uniform_soup"]
