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
- AdamW with weight decay on matrices only (:func:`upcycle.train.param_groups`) and linear
  warm-up + cosine (:func:`upcycle.train.cosine_with_warmup`) unless ``schedule`` (e.g.
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

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .devices import check_precision, resolve_device
from .errors import UpcycleError

RUN_FILE = "run.json"
"""Beside the checkpoints: the fingerprint of the run they belong to."""
_PRECISION_VARIABLE = "ACCELERATE_MIXED_PRECISION"


class NonFiniteLossError(UpcycleError):
    """The training loss became NaN or infinite; training stopped."""


@dataclass
class TrainingConfig:
    """What a training run does, in upcycle's terms (mapped onto ``TrainingArguments``)."""

    epochs: float = 1
    """Passes over the training data (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Optimizer steps in all (overrides ``epochs``)."""
    lr: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay, on matrices only (not biases, norms or other 1-D parameters)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent in linear warm-up before the cosine decay."""
    warmup_steps: int | None = None
    """Warm-up steps (overrides ``warmup_ratio``)."""
    min_lr_ratio: float = 0.0
    """The cosine decays to ``lr * min_lr_ratio``."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    batch_size: int = 16
    """Examples per optimizer step, over all ranks and accumulation steps; must divide into
    ``world size x grad_accum`` equal micro-batches."""
    grad_accum: int = 1
    """Gradient accumulation: micro-batches per optimizer step."""
    eval_batch_size: int | None = None
    """Examples per evaluation batch and rank (default: the training micro-batch)."""
    eval_steps: int | None = None
    """Evaluate on ``eval_dataset`` every this many steps and keep the best checkpoint (by
    ``best_metric``); the best one is loaded at the end."""
    best_metric: str = "loss"
    """The evaluation metric that picks the best checkpoint (lower is better for 'loss')."""
    load_best: bool = True
    """With ``eval_steps``: keep the best checkpoint and load it at the end (False: only
    evaluate; the model ends as the last step left it)."""
    save_steps: int | None = None
    """Save a resumable checkpoint every this many steps (default: ``eval_steps``)."""
    logging_steps: int = 10
    """Log the loss and learning rate every this many steps."""
    seed: int = 0
    """Seed of the data order, dropout and any initialisation done inside training."""
    device: str | torch.device = "auto"
    """auto, cpu, cuda, cuda:N or mps (see :func:`upcycle.devices.resolve_device`)."""
    bf16: bool = False
    """bfloat16 autocast for forward/backward."""
    fp16: bool = False
    """float16 autocast with loss scaling (GPU only)."""
    progress: bool = True
    """Progress bar and log lines on the console."""
    report_to: list[str] | None = None
    """Trackers (Trainer's ``report_to``); default: TensorBoard when it is installed."""

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UpcycleError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("max_steps", "eval_steps", "save_steps", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UpcycleError(f"{name}: expected a positive integer, got {value!r}")
        if self.max_steps is None and not self.epochs > 0:
            raise UpcycleError(f"epochs: expected a positive number, got {self.epochs!r}")
        if not self.lr > 0:
            raise UpcycleError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if self.eval_steps and self.save_steps and self.load_best \
                and self.save_steps % self.eval_steps:
            raise UpcycleError(f"save_steps {self.save_steps} must be a multiple of eval_steps "
                               f"{self.eval_steps} (the best checkpoint is chosen at evaluations)")

    def micro_batch(self, world: int) -> int:
        parts = world * self.grad_accum
        if self.batch_size % parts:
            raise UpcycleError(
                f"batch size {self.batch_size} does not split into {world} rank(s) x "
                f"{self.grad_accum} accumulation step(s) of equal size; choose a multiple of "
                f"{parts}")
        return self.batch_size // parts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["device"] = str(self.device)
        return d


def _default_trackers() -> list[str]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return ["tensorboard"]


def training_arguments(config: TrainingConfig, output_dir: str | os.PathLike, *,
                       has_eval: bool = False, **overrides):
    """The ``TrainingArguments`` for ``config`` (checkpoints in ``output_dir``). Checks the
    device and the precision first; keyword ``overrides`` set any other Trainer argument."""
    config.validate()
    device = resolve_device(config.device)
    check_precision(device, bf16=config.bf16, fp16=config.fp16)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = config.micro_batch(world)
    evaluate = bool(has_eval and config.eval_steps)
    keep_best = evaluate and config.load_best
    save_steps = config.save_steps or (config.eval_steps if keep_best else None)
    if config.eval_steps and not has_eval:
        raise UpcycleError("eval_steps: no evaluation data to evaluate on")
    best = config.best_metric
    kwargs = dict(
        output_dir=str(output_dir),
        overwrite_output_dir=False,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=config.eval_batch_size or micro,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=float(config.epochs),
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        warmup_steps=config.warmup_steps or 0,
        lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio},
        max_grad_norm=config.grad_clip if config.grad_clip is not None else 0.0,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps if evaluate else None,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=1,  # the latest (and, with evaluation, the best) checkpoint
        load_best_model_at_end=keep_best,
        metric_for_best_model=best if keep_best else None,
        greater_is_better=(best not in ("loss", "eval_loss")) if keep_best else None,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        fp16=config.fp16,
        use_cpu=device.type == "cpu",
        device_spec=None if distributed.launched_by_torchrun() else str(device),
        disable_tqdm=not config.progress,
        report_to=config.report_to if config.report_to is not None else _default_trackers(),
        logging_dir=str(Path(output_dir) / "runs"),
        remove_unused_columns=False,  # our collators choose the columns themselves
        label_names=["labels"],
        dataloader_num_workers=0,
        save_safetensors=True,
        log_level="warning",
    )
    kwargs.update(overrides)
    from ._trainer import UpcycleTrainingArguments

    return UpcycleTrainingArguments(**kwargs)


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` must hold: its trainable parameters and its persistent
    buffers (a frozen base model is left out), each tensor once."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name in frozen:
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.contiguous()
    return out


# -- checkpoints of one run -------------------------------------------------------------------

def checkpoint_step(path: Path | None) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return -1


def last_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and (p / "trainer_state.json").is_file()]
    return max(found, key=checkpoint_step) if found else None


def _describe(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def prepare_checkpoints(folder: str | os.PathLike, fingerprint: Mapping | None, *,
                        resume: bool | str | os.PathLike | None = None,
                        overwrite: bool = False, argument: str = "--resume") -> Path | None:
    """Get ``folder`` ready for a run's checkpoints and say where to resume from.

    Fresh start (``resume`` falsy): ``folder`` must hold no checkpoint of another run (unless
    ``overwrite``, which removes it); the ``fingerprint`` is written there. ``resume=True``:
    the latest checkpoint in ``folder``; a path: that checkpoint. Either must exist and come
    from a run with the same ``fingerprint``; otherwise an error names what differs.
    """
    folder = Path(folder)
    if not resume:
        if last_checkpoint(folder) is not None:
            if not overwrite:
                raise UpcycleError(
                    f"{folder} holds checkpoints of an earlier run (interrupted?); pass "
                    f"{argument} to continue it, or overwrite to start over")
        if folder.exists() and overwrite and distributed.is_main():
            shutil.rmtree(folder)
        distributed.barrier()
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            if fingerprint is not None:
                from .checkpoints import write_json

                write_json(folder / RUN_FILE, dict(fingerprint))
        distributed.barrier()
        return None
    if resume is True or str(resume) == "latest":
        checkpoint = last_checkpoint(folder)
        if checkpoint is None:
            raise UpcycleError(f"{argument}: no checkpoint to resume from in {folder} (a run "
                               f"saves one every save-steps steps)")
    else:
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise UpcycleError(f"{argument} {checkpoint}: not a checkpoint folder (no "
                               f"trainer_state.json)")
    if fingerprint is not None:
        run_file = checkpoint.parent / RUN_FILE
        if not run_file.is_file():
            raise UpcycleError(f"{argument}: {run_file} is missing, so the checkpoint cannot be "
                               f"matched to this run")
        saved = json.loads(run_file.read_text())
        now = json.loads(json.dumps(dict(fingerprint), default=str))
        differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if differ:
            what = "; ".join(f"{k}: {_describe(saved.get(k))} in the checkpoint, "
                             f"{_describe(now.get(k))} now" for k in differ[:4])
            raise UpcycleError(f"{argument}: {checkpoint} was made by another run ({what}); "
                               f"use the same settings, or start over without {argument}")
    return checkpoint


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
        from ._trainer import UpcycleTrainer

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


__all__ = ["FitResult", "ListDataset", "NonFiniteLossError", "TrainingConfig",
           "accuracy_metrics", "checkpoint_step", "first_item", "fit", "last_checkpoint",
           "prepare_checkpoints", "trained_state_dict", "training_arguments"]
