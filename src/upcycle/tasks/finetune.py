"""Training a classification task through :mod:`upcycle.training` (``transformers.Trainer``):
the task's examples as a dataset plus a collator, and full fine-tuning saved as a HF folder
(atomically). The demo and the soup benchmarks make their ingredients with it; ``upcycle
tune`` and ``upcycle grow --train`` train through :func:`task_datasets` too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints import atomic_dir
from ..training import TrainingConfig, accuracy_metrics, fit
from . import ClassificationTask, LabeledData


class ExampleDataset(torch.utils.data.Dataset):
    """One split of a classification task, example by example: ``{"text"|"pixel_values",
    "labels"}``; :class:`ClassificationCollator` makes model inputs of them."""

    def __init__(self, data: LabeledData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        label = self.data.labels[index]
        if self.data.texts is not None:
            return {"text": self.data.texts[index], "labels": label}
        return {"pixel_values": self.data.images[index], "labels": label}


class ClassificationCollator:
    """Examples -> a batch like :meth:`ClassificationTask.batches` makes (tokenised and padded
    per batch for text, stacked pixels for images), with ``labels``."""

    def __init__(self, task: ClassificationTask):
        self.task = task

    def __call__(self, examples: list[dict]) -> dict:
        labels = torch.stack([torch.as_tensor(e["labels"]) for e in examples])
        if "text" in examples[0]:
            batch = dict(self.task.tokenizer([e["text"] for e in examples], padding=True,
                                             truncation=True, max_length=self.task.max_length,
                                             return_tensors="pt"))
        else:
            batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
        batch["labels"] = labels
        return batch


def task_datasets(task: ClassificationTask, *splits: LabeledData | None):
    """(collator, dataset per split) for :func:`upcycle.training.fit` (None stays None)."""
    return ClassificationCollator(task), *[
        ExampleDataset(s) if s is not None else None for s in splits]


def train_task(model, task: ClassificationTask, train_data: LabeledData,
               config: TrainingConfig, *, eval_data: LabeledData | None = None, **fit_kwargs):
    """Train ``model`` on a classification task with :func:`upcycle.training.fit` (accuracy
    reported at evaluations)."""
    collate, train_set, eval_set = task_datasets(task, train_data, eval_data)
    compute, preprocess = accuracy_metrics()
    return fit(model, train_set, config, eval_dataset=eval_set, data_collator=collate,
               compute_metrics=compute if eval_set is not None else None,
               preprocess_logits_for_metrics=preprocess if eval_set is not None else None,
               **fit_kwargs)


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
