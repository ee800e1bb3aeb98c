"""Training a task through :mod:`upcycle.training` (``transformers.Trainer``): the task's
examples as a dataset plus a collator, and full fine-tuning saved as a HF folder
(atomically). The demo and the soup benchmarks make their ingredients with it; ``upcycle
tune`` and ``upcycle grow --train`` train through :func:`task_datasets` too.

Classification and causal-LM tasks (:mod:`upcycle.tasks.causal_lm`). A causal LM trains on
the model's own token loss: the collator marks the first position of every row as ignored
(it is never a target after the next-token shift), so that Trainer's count of label tokens
is the count of target tokens, and the loss is the mean over the target tokens of the whole
optimizer step: over accumulation steps and, under torchrun, over all ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints import atomic_dir
from ..training import TrainingConfig, accuracy_metrics, fit
from . import ClassificationTask, LabeledData, is_lm_task
from .causal_lm import IGNORE_INDEX, CausalLMTask, LMData


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


class LMExampleDataset(torch.utils.data.Dataset):
    """One split of a causal-LM task, block by block: ``{"input_ids", "labels"}`` (lists)."""

    def __init__(self, data: LMData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.data.input_ids[index], "labels": self.data.labels[index]}


class CausalLMCollator:
    """Examples -> a right-padded batch as :meth:`CausalLMTask.batches` makes it
    (``input_ids``, ``attention_mask``, ``labels`` with -100 on padding and prompts), with the
    first label of each row set to -100 too: it is never a target (the model predicts
    ``labels[:, 1:]``), and Trainer counts label tokens to average the loss over."""

    def __init__(self, task: CausalLMTask):
        self.task = task

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.task.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[row, :k] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[row, :k] = torch.as_tensor(e["labels"], dtype=torch.long)
            mask[row, :k] = 1
        labels[:, 0] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def task_datasets(task: ClassificationTask | CausalLMTask, *splits: LabeledData | LMData | None):
    """(collator, dataset per split) for :func:`upcycle.training.fit` (None stays None)."""
    if is_lm_task(task):
        return CausalLMCollator(task), *[
            LMExampleDataset(s) if s is not None else None for s in splits]
    return ClassificationCollator(task), *[
        ExampleDataset(s) if s is not None else None for s in splits]


def train_task(model, task: ClassificationTask | CausalLMTask,
               train_data: LabeledData | LMData, config: TrainingConfig, *,
               eval_data: LabeledData | LMData | None = None, **fit_kwargs):
    """Train ``model`` on a task with :func:`upcycle.training.fit` (classification: accuracy
    reported at evaluations; a causal LM: the token loss)."""
    collate, train_set, eval_set = task_datasets(task, train_data, eval_data)
    if is_lm_task(task):
        return fit(model, train_set, config, eval_dataset=eval_set, data_collator=collate,
                   **fit_kwargs)
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
        if task.kind in ("text", "causal_lm"):
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
