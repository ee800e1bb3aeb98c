"""Training through :class:`transformers.Trainer`: settings (:mod:`.config`), the one
warm-up/decay formula (:mod:`.schedules`), the Trainer subclass (:mod:`.trainer`, loaded only
when something trains), run folders, checkpoints and fingerprints (:mod:`.runs`) and
:func:`fit` (:mod:`.fit`)."""

from .config import NonFiniteLossError, TrainingConfig
from .fit import FitResult, ListDataset, accuracy_metrics, first_item, fit
from .runs import (
    check_resume,
    checkpoint_step,
    checkpoints_folder,
    last_checkpoint,
    prepare_checkpoints,
    run_fingerprint,
    trained_state_dict,
)
from .schedules import cosine_with_warmup, param_groups

__all__ = ["FitResult", "ListDataset", "NonFiniteLossError", "TrainingConfig",
           "accuracy_metrics", "check_resume", "checkpoint_step", "checkpoints_folder",
           "cosine_with_warmup", "first_item", "fit", "last_checkpoint", "param_groups",
           "prepare_checkpoints", "run_fingerprint", "trained_state_dict"]
