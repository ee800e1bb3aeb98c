"""The ``transformers`` classes behind :mod:`upcycle.training` (imported only when training,
so that ``import upcycle`` does not load ``transformers``). Module-level, so that Trainer can
pickle its arguments into checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from . import distributed
from .errors import UpcycleError
from .train import cosine_with_warmup, param_groups
from .training import NonFiniteLossError, checkpoint_step, last_checkpoint, trained_state_dict


@dataclass
class UpcycleTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``device_spec``: the device of a single-process run
    (``cuda:N`` included; Trainer alone would take ``cuda:0``, or every GPU with
    DataParallel). Under torchrun each rank uses ``cuda:LOCAL_RANK`` as Trainer does."""

    device_spec: str | None = field(default=None, metadata={"help": "cpu, cuda:N or mps"})

    @cached_property
    def _setup_devices(self) -> torch.device:
        device = super()._setup_devices
        if self.device_spec is None or self.parallel_mode.value == "distributed":
            return device
        device = torch.device(self.device_spec)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            self._n_gpu = 1
        elif device.type == "cpu":
            self._n_gpu = 0
        return device


class _StepLosses(TrainerCallback):
    def __init__(self, trainer: UpcycleTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.step_losses.append(self.trainer._micro_loss)
        self.trainer._micro_loss = 0.0


class UpcycleTrainer(Trainer):
    """``Trainer`` with upcycle's optimizer and schedule, checkpoints of the trained part
    only, and a stop on a non-finite loss."""

    def __init__(self, *args, schedule=None, min_lr_ratio: float = 0.0,
                 warmup_steps: int | None = None, warmup_ratio: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.min_lr_ratio = min_lr_ratio
        self._warmup = (warmup_steps, warmup_ratio)
        self.step_losses: list[float] = []
        self._micro_loss = 0.0
        self.add_callback(_StepLosses(self))

    def _plain_model(self):
        """The model without DDP/accelerate wrappers or a torch.compile shell."""
        model = self.accelerator.unwrap_model(self.model)
        return getattr(model, "_orig_mod", model)

    # optimizer and schedule ----------------------------------------------------------------
    def create_optimizer(self):
        if self.optimizer is None:
            groups = param_groups(self.model.named_parameters(), self.args.weight_decay)
            if not groups:
                raise UpcycleError("the model has no trainable parameters")
            self.optimizer = torch.optim.AdamW(
                groups, lr=self.args.learning_rate, eps=self.args.adam_epsilon,
                betas=(self.args.adam_beta1, self.args.adam_beta2))
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            if self.schedule is not None:
                self.lr_scheduler = self.schedule(optimizer, num_training_steps)
            else:
                steps, ratio = self._warmup
                warmup = steps if steps is not None else int(round(ratio * num_training_steps))
                self.lr_scheduler = cosine_with_warmup(optimizer, warmup, num_training_steps,
                                                       self.min_lr_ratio)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # a non-finite loss stops the run -----------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss).all()) else 1.0)
        if distributed.is_distributed():  # every rank stops together
            bad = distributed.all_reduce_sum(bad.to(self.args.device)).cpu()
        if float(bad) > 0:
            last = last_checkpoint(Path(self.args.output_dir))
            kept = (f"the last good checkpoint is {last} (step {checkpoint_step(last)})"
                    if last is not None else "no checkpoint was saved before it")
            raise NonFiniteLossError(
                f"the training loss became {float(loss):g} at step "
                f"{self.state.global_step + 1}; training stopped and nothing more was written; "
                f"{kept}. Lower the learning rate, or use bf16 instead of fp16 (fp16 overflows "
                f"above 65504)")
        self._micro_loss += float(loss)
        return loss

    def _save_checkpoint(self, model, trial):
        """Never save non-finite weights: the last checkpoint stays a good one."""
        unwrapped = self._plain_model()
        for name, p in unwrapped.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                last = last_checkpoint(Path(self.args.output_dir))
                kept = (f"the last good checkpoint is {last} (step {checkpoint_step(last)})"
                        if last is not None else "no checkpoint was saved before it")
                raise NonFiniteLossError(
                    f"parameter {name} became non-finite at step {self.state.global_step}; "
                    f"training stopped and no checkpoint was saved for it; {kept}. Lower the "
                    f"learning rate, or use bf16 instead of fp16")
        return super()._save_checkpoint(model, trial)

    # checkpoints hold what training changes --------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        model = self._plain_model()
        if isinstance(model, PreTrainedModel) or state_dict is not None:
            return super()._save(output_dir, state_dict)
        return super()._save(output_dir, trained_state_dict(model))

    def _issue_warnings_after_load(self, load_result):
        model = self._plain_model()
        trained = set(trained_state_dict(model))
        missing = [k for k in load_result.missing_keys if k in trained]
        if missing or load_result.unexpected_keys:
            what = (f"lacks {missing[0]!r}" if missing else
                    f"holds {load_result.unexpected_keys[0]!r}, which the model does not have")
            raise UpcycleError(f"checkpoint does not fit this model: it {what}")
