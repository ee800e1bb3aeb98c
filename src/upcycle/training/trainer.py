"""The ``transformers`` classes behind :mod:`upcycle.training` (imported only when training,
so that ``import upcycle`` does not load ``transformers``). Module-level, so that Trainer can
pickle its arguments into checkpoints."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from ..errors import UpcycleError
from ..runtime import distributed
from ..runtime.devices import check_precision, resolve_device
from .config import NonFiniteLossError, TrainingConfig, _default_trackers
from .runs import checkpoint_step, last_checkpoint, trained_state_dict
from .schedules import cosine_with_warmup, param_groups


@dataclass
class UpcycleTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``device_spec``: the device of a single-process run
    (``cuda:N`` included; Trainer alone would take ``cuda:0``, or every GPU with
    DataParallel). Under torchrun each rank uses ``cuda:LOCAL_RANK`` as Trainer does."""

    device_spec: str | None = field(default=None, metadata={"help": "cpu, cuda:N or mps"})
    logging_dir: str | None = field(default=None, metadata={
        "help": "TensorBoard's folder (transformers 5 dropped the argument; its callback "
                "would otherwise write to output_dir/runs/<date>_<host>)"})

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
        logging_dir = getattr(self.args, "logging_dir", None)
        if logging_dir is not None:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                    callback.logging_dir = logging_dir

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
            raise NonFiniteLossError(
                f"the training loss became {float(loss):g} at step "
                f"{self.state.global_step + 1}; training stopped and nothing more was written; "
                f"{self._last_good()}. Lower the learning rate, or use bf16 instead of fp16 (fp16 overflows "
                f"above 65504)")
        self._micro_loss += float(loss)
        return loss

    def _last_good(self) -> str:
        last = last_checkpoint(Path(self.args.output_dir))
        return (f"the last good checkpoint is {last} (step {checkpoint_step(last)})"
                if last is not None else "no checkpoint was saved before it")

    def _save_checkpoint(self, model, trial):
        """Never save non-finite weights: the last checkpoint stays a good one."""
        unwrapped = self._plain_model()
        for name, p in unwrapped.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                raise NonFiniteLossError(
                    f"parameter {name} became non-finite at step {self.state.global_step}; "
                    f"training stopped and no checkpoint was saved for it; {self._last_good()}. Lower the "
                    f"learning rate, or use bf16 instead of fp16")
        return super()._save_checkpoint(model, trial)

    # save_model of a tuner: its adapter folder -------------------------------------------
    def save_model(self, output_dir=None, _internal_call: bool = False):
        """A user's ``save_model(d)`` of a tuner whose class sets ``writes_adapter_folder``
        (SNELL, SHERL) writes its adapter folder (``adapter_config.json`` +
        ``adapter_model.safetensors``, what ``upcycle.tune.load(d)`` reads) into ``d``, beside
        whatever ``d`` already holds (checkpoints stay); Trainer's own saves (checkpoints,
        the Hub) are unchanged."""
        model = self._plain_model()
        if _internal_call or not getattr(type(model), "writes_adapter_folder", False):
            return super().save_model(output_dir, _internal_call)
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:
            out.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
            try:
                folder = model.save_pretrained(staging / "adapter")
                for item in sorted(Path(folder).iterdir()):
                    os.replace(item, out / item.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # checkpoints hold what training changes --------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        model = self._plain_model()
        if isinstance(model, PreTrainedModel):
            # transformers 5 writes a model in its checkpoints' original (4.x) names (ViT's
            # encoder.layer.N...), but Trainer reloads a checkpoint (best model, resume) with a
            # plain load_state_dict: a checkpoint keeps the modules' own names
            model.save_pretrained = partial(type(model).save_pretrained, model,
                                            save_original_format=False)
            try:
                return super()._save(output_dir, state_dict)
            finally:
                del model.save_pretrained
        if state_dict is not None:
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
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=config.eval_batch_size or micro,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=float(config.epochs),
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        # transformers 5: a float below 1 is a ratio (our own schedule reads config's anyway)
        warmup_steps=config.warmup_steps if config.warmup_steps else config.warmup_ratio,
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
        ddp_timeout=distributed.timeout_seconds(),  # --dist-timeout, as init_from_env
        disable_tqdm=not config.progress,
        report_to=config.report_to if config.report_to is not None else _default_trackers(),
        logging_dir=str(Path(output_dir) / "runs"),  # ours: TensorBoard's folder
        remove_unused_columns=False,  # our collators choose the columns themselves
        label_names=["labels"],
        dataloader_num_workers=0,
        log_level="warning",
    )
    kwargs.update(overrides)
    return UpcycleTrainingArguments(**kwargs)
