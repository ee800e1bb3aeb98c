"""Memory-efficient tuning of pretrained models: SNELL (``upcycle.tune.snell``) and SHERL
(``upcycle.tune.sherl``), with what they share in ``upcycle.tune.common``."""

from .common import load
from .sherl import SherlConfig, SherlModel, get_sherl_model
from .snell import SnellConfig, SnellModel, get_snell_model

__all__ = ["SherlConfig", "SherlModel", "SnellConfig", "SnellModel", "get_sherl_model",
           "get_snell_model", "load"]
