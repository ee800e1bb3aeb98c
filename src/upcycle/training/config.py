"""What a training run does, in upcycle's terms (:class:`TrainingConfig`), mapped onto
``TrainingArguments`` by :mod:`upcycle.training.trainer`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import UpcycleError

_PRECISION_VARIABLE = "ACCELERATE_MIXED_PRECISION"
"""accelerate's mixed-precision setting, which :func:`~upcycle.training.fit.fit` sets for its run."""


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
    """auto, cpu, cuda, cuda:N or mps (see :func:`upcycle.runtime.devices.resolve_device`)."""
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
