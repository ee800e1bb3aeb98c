"""Tasks: a model folder plus data, loss, metrics and collator. Classification
(:mod:`.classification`) and causal LM (:mod:`.causal_lm`); :func:`load_task` picks one."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UpcycleError
from .base import Task
from .causal_lm import CausalLMTask, is_causal_lm, load_lm_task
from .classification import (
    IMAGE_SUFFIXES,
    ClassificationTask,
    classification_loss,
    evaluate,
    task_kind,
)

__all__ = ["TASKS", "CausalLMTask", "ClassificationTask", "Task", "classification_loss",
           "evaluate", "load_task"]

TASKS = ("auto", "classification", "causal-lm")
"""``task`` values of :func:`load_task` (and ``--task`` of the CLI)."""


def load_task(model_dir: str | os.PathLike, data_path: str | os.PathLike, *,
              max_length: int | None = None, head_seed: int = 0, task: str | None = "auto",
              base_dir: str | os.PathLike | None = None, chunk: bool = False):
    """The task for a model folder and a data file.

    ``task`` "auto" (default): a causal-LM task (:class:`~upcycle.tasks.causal_lm.CausalLMTask`)
    when the folder's config names a ``*ForCausalLM``/``*LMHeadModel`` and the data is text,
    else classification (the data file's suffix picks text or image). "causal-lm" or
    "classification" force the kind. ``max_length``: default 128 tokens for classification,
    min(512, the position limit) for a causal LM. ``base_dir`` (causal LM: where to look for
    the tokenizer when ``model_dir`` has none) and ``chunk`` (causal LM: a .txt file is one
    stream, not one document per line) apply to causal-LM tasks only.
    """
    task = task or "auto"
    if task not in TASKS:
        raise UpcycleError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if task == "auto":
        lm = is_causal_lm(model_dir) and Path(data_path).suffix.lower() not in IMAGE_SUFFIXES
        task = "causal-lm" if lm else "classification"
    if task == "causal-lm":
        return load_lm_task(model_dir, base_dir=base_dir, max_length=max_length, chunk=chunk)
    if chunk:
        raise UpcycleError("--chunk applies to causal-LM tasks (.txt files read as one stream), "
                           f"not to classification with {model_dir}")
    return ClassificationTask(model_dir, task_kind(data_path),
                              max_length=max_length if max_length is not None else 128,
                              head_seed=head_seed)
