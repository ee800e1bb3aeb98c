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

import torch

from . import is_lm_task
from .causal_lm import IGNORE_INDEX, CausalLMTask, LMData
from .classification import ClassificationTask, LabeledData


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


