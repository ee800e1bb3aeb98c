"""Full fine-tuning of a HF classification model with the project's training loop, saved as
a HF folder (atomically). The demo and the soup benchmarks make their ingredients with it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints import atomic_dir
from ..train import TrainConfig, train
from . import ClassificationTask, LabeledData, classification_loss, evaluate


def finetune(task: ClassificationTask, train_data: LabeledData, out: str | os.PathLike, *,
             config: TrainConfig, batch_size: int = 16, eval_data: LabeledData | None = None,
             overwrite: bool = False) -> dict:
    """Fine-tune all weights of ``task``'s model on ``train_data`` and save it to ``out``.

    The classification head is initialised from ``task.head_seed`` (the same for every run),
    the data order from ``config.seed``. Returns the run's record (also saved as
    ``train.json`` in ``out``).
    """
    model = task.load_model()
    torch.manual_seed(config.seed)
    batches = task.batches(train_data, batch_size, shuffle=True, seed=config.seed)
    eval_fn = None
    if eval_data is not None:
        eval_batches = task.batches(eval_data, 64)
        eval_fn = lambda m: evaluate(m, eval_batches)  # noqa: E731
    result = train(model, batches, classification_loss, config, eval_fn=eval_fn)
    record = {"lr": config.lr, "epochs": config.epochs, "weight_decay": config.weight_decay,
              "seed": config.seed, "batch_size": batch_size, "steps": result.steps,
              "seconds": result.seconds, "final_loss": result.losses[-1],
              "evals": result.evals, "base_model": str(task.model_dir)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if task.kind == "text":
            task.tokenizer.save_pretrained(tmp)
        (tmp / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def cached_record(out: str | os.PathLike, recipe: dict) -> dict | None:
    """The ``train.json`` of an existing fine-tune in ``out`` if it was made with ``recipe``."""
    f = Path(out) / "train.json"
    if not f.is_file():
        return None
    record = json.loads(f.read_text())
    return record if all(record.get(k) == v for k, v in recipe.items()) else None
