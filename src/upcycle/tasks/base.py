"""The Task protocol: what a job needs from a task, whatever its kind.

A task is a model folder plus the data it trains and is judged on. The soups, the tuners and
the full fine-tune see only this protocol, so a new kind of task (e.g. token
classification) is one module implementing it plus one branch in :func:`upcycle.tasks.load_task`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..errors import UpcycleError, UpcycleWarning
from ..io.checkpoints import error_line, read_config_json
from ..io.model_files import check_no_custom_code
from ..runtime import distributed

CHARS_PER_TOKEN = 32
"""A text is cut to ``max_length * CHARS_PER_TOKEN`` characters before it is tokenised, so
tokenising it costs memory in proportion to ``max_length``, not to the text (a 50 MB line
took 7 GB). English averages about 4 characters per token and code about 3; the longest
tokens of common vocabularies that real text produces are rarely over 16 characters. A cut
at 32 characters per token therefore lies far beyond the ``max_length``-th token of any
natural text (8x the densest normal text), and the tokens kept are exactly those of the
uncut text; only a pathological text averaging over 32 characters per token (e.g. one
"word" of thousands of letters) can lose tokens that would have fitted."""


@runtime_checkable
class Task(Protocol):
    name: str
    """"classification" or "causal-lm" (``--task``)."""
    metric_names: tuple[str, ...]
    """The metrics :meth:`evaluate` reports, headline first."""
    model_dir: Path

    def load_model(self, *, dtype: torch.dtype | None = None) -> nn.Module:
        """The task's model, in eval mode, on the CPU."""

    def read(self, path: str | os.PathLike, *, split: str = "data") -> Any:
        """One split of data, read and checked (errors name the file and line)."""

    def read_training(self, path: str | os.PathLike) -> Any:
        """The training split (for classification it fixes the class count)."""

    def split(self, data: Any, fraction: float, seed: int = 0) -> tuple[Any, Any]:
        """(rest, carved): ``fraction`` of ``data`` carved off, seeded."""

    def batches(self, data: Any, batch_size: int, *, shuffle: bool = False,
                seed: int = 0) -> list[dict]:
        """Model-ready batches with ``labels``."""

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The training loss of one batch (what the learned soups fit)."""

    def evaluate(self, model: nn.Module, batches: list[dict], *,
                 precision: str | None = None) -> dict:
        """The metrics over ``batches`` (summed over ranks under torch.distributed)."""

    def score(self, metrics: dict) -> float:
        """One number from :meth:`evaluate`'s metrics, higher is better (greedy soup)."""

    def describe(self, metrics: dict) -> str:
        """The metrics as one phrase for a summary table."""

    def collator(self) -> Any:
        """Examples of :meth:`dataset` -> a batch, for ``transformers.Trainer``."""

    def dataset(self, data: Any) -> torch.utils.data.Dataset:
        """A split as a map-style dataset of examples."""

    def trainer_metrics(self) -> dict:
        """Keyword arguments for :func:`upcycle.training.fit`'s evaluation metrics."""

    def save_tokenizer(self, folder: str | os.PathLike) -> None:
        """Write what a saved model of this task needs beside its weights to be used."""


def batch_indices(n: int, batch_size: int, *, shuffle: bool = False,
                  seed: int = 0) -> list[np.ndarray]:
    """The example indices of each batch of ``n`` examples, in order or shuffled (seeded)."""
    if batch_size < 1:
        raise UpcycleError(f"batch size must be >= 1, got {batch_size}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return [order[start:start + batch_size] for start in range(0, n, batch_size)]


def text_limit(max_length: int) -> int:
    """The characters of a text that tokenising to ``max_length`` tokens can need."""
    return max(1, int(max_length)) * CHARS_PER_TOKEN


def cut_text(text: str, max_length: int, *, keep: str = "start") -> str:
    """``text`` cut to :func:`text_limit` characters: its start (``keep="start"``) or its end
    (``"end"``, for a prompt that is truncated from the left)."""
    limit = text_limit(max_length)
    if len(text) <= limit:
        return text
    return text[:limit] if keep == "start" else text[-limit:]


def utf8_error(path: Path, split: str, exc: UnicodeDecodeError) -> UpcycleError:
    """The error for a file that is not UTF-8 text, naming its first undecodable line (read
    again line by line, in binary)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return UpcycleError(f"{split} file {path}, line {lineno}: not UTF-8 text "
                                    f"({bad.reason} at byte {bad.start})")
    return UpcycleError(f"{split} file {path}: not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start})")


def examples_digest(examples) -> str:
    """A content hash of a split: of its examples (each a bytes-like), in any order, so the
    same examples shuffled hash alike."""
    each = sorted(hashlib.sha256(bytes(e)).digest() for e in examples)
    digest = hashlib.sha256()
    for e in each:
        digest.update(e)
    return digest.hexdigest()


class SplitRegistry:
    """The splits a task has read, by content hash: reading a split that holds the same
    examples as another one (held-out = training, test = held-out) warns once."""

    def __init__(self):
        self.seen: dict[str, tuple[str, str]] = {}

    def note(self, digest: str, split: str, source: str) -> None:
        earlier = self.seen.get(digest)
        if earlier is not None and earlier[0] != split and distributed.is_main():
            warnings.warn(f"the {split} file {source} holds the same examples as the "
                          f"{earlier[0]} file {earlier[1]}: its scores say nothing about "
                          f"unseen data", UpcycleWarning, stacklevel=3)
        else:
            self.seen.setdefault(digest, (split, source))


def read_rows(path: Path, split: str, where: str) -> list[tuple[int, object]]:
    """(line number, row) of a CSV file (dicts) or a JSONL file (any JSON value per non-blank
    line). ``where`` names the file in errors ("held-out file x.jsonl"); a line that is not
    JSON or not UTF-8 is one error naming the file and line."""
    rows = []
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                for row in reader:
                    rows.append((reader.line_num, row))
        else:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise UpcycleError(f"{where}, line {lineno}: not JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise utf8_error(path, split, exc) from exc
    return rows


def load_model_config(model_dir: Path):
    """The HF config of a task's model folder, checked first: a folder without config.json,
    a config that is not a JSON object, or one asking for custom code is one error naming
    the folder; transformers' own refusal is cut to one line."""
    # deferred: transformers (an optional dependency) loads only when a task is built
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise UpcycleError(f"model {model_dir}: not a HuggingFace model folder "
                           f"(no config.json)")
    read_config_json(model_dir, f"model {model_dir}")  # one line, no traceback
    check_no_custom_code(model_dir, f"model {model_dir}")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise UpcycleError(f"model {model_dir}: config.json cannot be loaded: "
                           f"{error_line(exc)}") from exc
