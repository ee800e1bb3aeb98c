"""The full fine-tune job: train a task's model on its data with :func:`upcycle.training.fit`
(used by ``tune``, ``grow --train`` and the demo's ingredients), cached by recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..io.writing import atomic_dir
from ..tasks.causal_lm import CausalLMTask, LMData
from ..tasks.classification import ClassificationTask, LabeledData
from ..training.config import TrainingConfig
from ..training.fit import fit


def train_task(model, task: ClassificationTask | CausalLMTask,
               train_data: LabeledData | LMData, config: TrainingConfig, *,
               eval_data: LabeledData | LMData | None = None, **fit_kwargs):
    """Train ``model`` on a task with :func:`upcycle.training.fit` (classification: accuracy
    reported at evaluations; a causal LM: the token loss)."""
    eval_set = task.dataset(eval_data) if eval_data is not None else None
    metrics = task.trainer_metrics() if eval_set is not None else {}
    return fit(model, task.dataset(train_data), config, eval_dataset=eval_set,
               data_collator=task.collator(), **metrics, **fit_kwargs)


def finetune(task: ClassificationTask, train_data: LabeledData, out: str | os.PathLike, *,
             config: TrainingConfig, eval_data: LabeledData | None = None,
             overwrite: bool = False) -> dict:
    """Fine-tune all weights of ``task``'s model on ``train_data`` and save it to ``out``.

    The classification head is initialised from ``task.head_seed`` (the same for every run),
    the data order from ``config.seed``. Returns the run's record (also saved as
    ``train.json`` in ``out``).
    """
    model = task.load_model()
    torch.manual_seed(config.seed)
    result = train_task(model, task, train_data, config, eval_data=eval_data)
    record = {"lr": config.lr, "epochs": config.epochs, "weight_decay": config.weight_decay,
              "seed": config.seed, "batch_size": config.batch_size, "steps": result.steps,
              "seconds": result.seconds, "final_loss": result.last_loss,
              "evals": result.evals, "base_model": str(task.model_dir)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        task.save_tokenizer(tmp)
        (tmp / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def cached_record(out: str | os.PathLike, recipe: dict) -> dict | None:
    """The ``train.json`` of an existing fine-tune in ``out`` if it was made with ``recipe``."""
    f = Path(out) / "train.json"
    if not f.is_file():
        return None
    record = json.loads(f.read_text())
    return record if all(record.get(k) == v for k, v in recipe.items()) else None
