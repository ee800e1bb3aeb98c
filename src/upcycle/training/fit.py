"""A thin bridge to :class:`transformers.Trainer`: our settings -> ``TrainingArguments``, our
optimizer and schedule passed in, checkpoints that resume only the run they belong to.

Trainer (with accelerate) does the work: device placement, mixed precision (``bf16``/``fp16``
autocast), gradient accumulation, periodic evaluation with the best checkpoint kept,
checkpoints and ``resume``, logging (console, TensorBoard when installed) and DDP under
``torchrun``/``accelerate launch``. This module adds only what upcycle needs around it::

    from upcycle.training import TrainingConfig, fit

    result = fit(model, train_examples, TrainingConfig(max_steps=100, lr=1e-3, batch_size=16),
                 data_collator=collate, eval_dataset=held_out_examples, output_dir="ckpts")

- any ``nn.Module`` whose forward returns the loss given ``labels`` (HF models, SNELL/SHERL/LST
  models), or any model plus ``compute_loss(outputs, labels, num_items_in_batch=None)``;
- AdamW with weight decay on matrices only (:func:`upcycle.training.schedules.param_groups`) and linear
  warm-up + cosine (:func:`upcycle.training.schedules.cosine_with_warmup`) unless ``schedule`` (e.g.
  LEMON's :func:`upcycle.grow.lemon_schedule`) or ``optimizers`` say otherwise;
- ``batch_size`` is the number of examples per optimizer step over all ranks and accumulation
  steps, so a run gives the same result on 1 or N processes;
- checkpoints of a model that is not a ``PreTrainedModel`` hold only what training changes
  (trainable parameters and buffers), not the frozen base model;
- a non-finite loss stops training with :class:`NonFiniteLossError`; the checkpoints stay;
- ``fingerprint`` (what the run is: model, data, method, settings) is written beside the
  checkpoints, and ``resume`` refuses checkpoints made by another run, naming what differs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UpcycleError
from ..runtime import distributed
from ..runtime.devices import resolve_device
from .config import _PRECISION_VARIABLE, TrainingConfig
from .runs import last_checkpoint, prepare_checkpoints

# -- checkpoints of one run -------------------------------------------------------------------


# -- fit ---------------------------------------------------------------------------------------

@dataclass
class FitResult:
    steps: int
    """Optimizer steps done (in all, also before a resume)."""
    seconds: float
    """Wall time of this call's training."""
    step_losses: list[float]
    """Mean training loss of each optimizer step done in this call."""
    log_history: list[dict]
    """Trainer's log: losses, learning rates and evaluations with their steps."""
    best_checkpoint: str | None = None
    best_metric: float | None = None
    resumed_from: str | None = None

    @property
    def last_loss(self) -> float | None:
        return self.step_losses[-1] if self.step_losses else None

    @property
    def evals(self) -> list[dict]:
        return [e for e in self.log_history if any(k.startswith("eval_") for k in e)]


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset over a sequence of examples (any objects the collator takes)."""

    def __init__(self, items: Sequence):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def fit(model: nn.Module, train_dataset, config: TrainingConfig | None = None, *,
        output_dir: str | os.PathLike | None = None, eval_dataset=None, data_collator=None,
        compute_loss: Callable | None = None, compute_metrics: Callable | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        schedule: Callable[[torch.optim.Optimizer, int], object] | None = None,
        optimizers: tuple = (None, None), callbacks: Iterable = (),
        resume: bool | str | os.PathLike | None = None, fingerprint: Mapping | None = None,
        overwrite: bool = False, **trainer_arguments) -> FitResult:
    """Train the parameters of ``model`` that require grad with ``transformers.Trainer``.

    ``train_dataset``/``eval_dataset``: map-style datasets (or sequences) of examples that
    ``data_collator`` turns into model inputs with ``labels``. ``compute_loss``: Trainer's
    ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` when the model does not
    return the loss itself. ``schedule(optimizer, total_steps)`` replaces the default
    warm-up + cosine. Checkpoints go to ``output_dir`` (a temporary folder, removed at the end,
    when None); see :func:`prepare_checkpoints` for ``resume``/``fingerprint``/``overwrite``.
    The model ends in eval mode, on the training device, with the best checkpoint loaded when
    ``config.eval_steps`` is set.
    """
    # deferred: transformers (an optional dependency) loads only when something trains
    from .trainer import UpcycleTrainer, training_arguments

    config = config or TrainingConfig()
    config.validate()
    if isinstance(train_dataset, (list, tuple)):
        train_dataset = ListDataset(train_dataset)
    if isinstance(eval_dataset, (list, tuple)):
        eval_dataset = ListDataset(eval_dataset)
    if len(train_dataset) == 0:
        raise UpcycleError("the training data is empty")
    distributed.init_from_env(resolve_device(config.device))
    upcast = []
    if config.bf16 or config.fp16:
        # mixed precision trains float32 master weights (as GradScaler requires): half
        # precision parameters that train are upcast for the run and cast back at its end
        for p in model.parameters():
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                upcast.append((p, p.dtype))
                p.data = p.data.float()
    temporary = output_dir is None
    if temporary:
        if resume:
            raise UpcycleError("resume needs the output_dir of the run to resume")
        output_dir = tempfile.mkdtemp(prefix="upcycle-train-")
    output_dir = Path(output_dir)
    fresh = not resume and last_checkpoint(output_dir) is None
    # Trainer leaves its precision in this variable for every later Trainer of the process;
    # ours is the config's, and the caller's value comes back afterwards
    saved_precision = os.environ.get(_PRECISION_VARIABLE)
    os.environ[_PRECISION_VARIABLE] = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    own_forward = model.__dict__.get("forward")
    trainer = None
    try:
        args = training_arguments(config, output_dir, has_eval=eval_dataset is not None,
                                  **trainer_arguments)
        checkpoint = prepare_checkpoints(output_dir, fingerprint, resume=resume,
                                         overwrite=overwrite or temporary)
        fresh = fresh or bool(overwrite)

        trainer = UpcycleTrainer(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            data_collator=data_collator, compute_loss_func=compute_loss,
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            optimizers=optimizers, callbacks=list(callbacks), schedule=schedule,
            min_lr_ratio=config.min_lr_ratio, warmup_steps=config.warmup_steps,
            warmup_ratio=config.warmup_ratio)
        if not config.progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        seconds = time.perf_counter() - start
        state = trainer.state
        model.eval()
        return FitResult(steps=state.global_step, seconds=seconds,
                         step_losses=list(trainer.step_losses),
                         log_history=list(state.log_history),
                         best_checkpoint=state.best_model_checkpoint,
                         best_metric=state.best_metric,
                         resumed_from=str(checkpoint) if checkpoint else None)
    except BaseException:
        # a fresh run that fails before its first checkpoint leaves nothing behind
        if fresh and not temporary and distributed.is_main() \
                and last_checkpoint(output_dir) is None:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    finally:
        for p, dtype in upcast:  # the model keeps the dtypes it came with
            p.data = p.data.to(dtype)
        if saved_precision is None:
            os.environ.pop(_PRECISION_VARIABLE, None)
        else:
            os.environ[_PRECISION_VARIABLE] = saved_precision
        # accelerate wraps forward in autocast for mixed precision: give the model back as it was
        if model.__dict__.pop("_original_forward", None) is not None:
            if own_forward is None:
                model.__dict__.pop("forward", None)
            else:
                model.__dict__["forward"] = own_forward
        if trainer is not None:  # a run that failed mid-way leaves its trackers' files open
            for callback in trainer.callback_handler.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if writer is not None:
                    writer.close()
                    callback.tb_writer = None
        if temporary and distributed.is_main():
            shutil.rmtree(output_dir, ignore_errors=True)


def first_item(items: Sequence):
    """The collator for a dataset whose items are ready-made batches (``batch_size=1`` per
    rank and accumulation step): the batch itself."""
    return items[0]


def accuracy_metrics():
    """(compute_metrics, preprocess_logits_for_metrics) for classification: accuracy of the
    argmax, computed on the device so that only class ids are gathered."""

    def preprocess(logits, labels):
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return logits.argmax(-1)

    def compute(prediction) -> dict:
        import numpy as np

        predicted, labels = prediction.predictions, prediction.label_ids
        return {"accuracy": float(np.mean(np.asarray(predicted) == np.asarray(labels)))}

    return compute, preprocess
