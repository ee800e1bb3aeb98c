"""Memory-efficient tuning of pretrained models: SNELL (``upcycle.tune.snell``) and SHERL
(``upcycle.tune.sherl``), with what they share in ``upcycle.tune.common``."""

from .snell import SnellConfig, SnellModel, get_snell_model  # noqa: F401
