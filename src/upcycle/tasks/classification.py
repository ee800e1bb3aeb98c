"""A real job end to end: a HF classification model + labelled data + loss + metric.

Two task kinds, chosen by the data file:
- text classification: a CSV or JSONL file with ``text`` and ``label`` columns, and a HF
  model folder loaded with ``AutoModelForSequenceClassification``;
- image classification: an ``.npz`` with ``images`` (N,H,W), (N,H,W,C) or (N,C,H,W) and
  ``labels`` (N,), and a HF model folder loaded with ``AutoModelForImageClassification``.

Labels are integers ``0..num_labels-1`` or class names found in the model's ``label2id``.
When the model folder has no classification head yet (e.g. a plain MiniLM), the number of
classes comes from the training data and a new head is initialised from ``head_seed`` (the
same head for every run with that seed, which is what makes soups of such runs work).
A decoder (GPT-2, Llama...) without a pad token gets EOS as its pad token (tokenizer and
``config.pad_token_id``), so it batches.

Beside classification, a causal-LM task (:mod:`upcycle.tasks.causal_lm`): :func:`load_task`
picks it for a ``*ForCausalLM`` model folder (or ``task="causal-lm"``). Both implement the
:class:`~upcycle.tasks.base.Task` protocol: ``task.loss``, ``task.evaluate`` (accuracy, or
perplexity), ``task.score``...
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UpcycleError
from ..io.checkpoints import error_line, load_pretrained
from ..runtime import distributed
from ..runtime.devices import autocast, model_device
from ..training.fit import accuracy_metrics
from .base import (
    SplitRegistry,
    batch_indices,
    cut_text,
    examples_digest,
    load_model_config,
    read_rows,
)

TEXT_SUFFIXES = (".csv", ".jsonl", ".json")
IMAGE_SUFFIXES = (".npz",)
# a folder's tokenizer is one of these (what AutoTokenizer reads)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class LabeledData:
    """Examples of one split: ``texts`` (text tasks) or ``images`` (float N,C,H,W), and labels."""
    labels: torch.Tensor
    source: str
    texts: list[str] | None = None
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index, source: str | None = None) -> LabeledData:
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return LabeledData(
            labels=self.labels[index],
            source=source or self.source,
            texts=[self.texts[i] for i in index.tolist()] if self.texts is not None else None,
            images=self.images[index] if self.images is not None else None,
        )


def task_kind(data_path: str | os.PathLike) -> str:
    suffix = Path(data_path).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise UpcycleError(
        f"data file {data_path}: unknown format {suffix!r} (expected .csv or .jsonl with 'text' "
        f"and 'label', or .npz with 'images' and 'labels')"
    )


def _read_text_rows(path: Path, split: str = "data") -> list[tuple[int, dict]]:
    """(line number, row) of a CSV or JSONL file, each row with a string ``text`` and a
    ``label``; errors name the file and line."""
    if not path.is_file():
        raise UpcycleError(f"data file {path}: no such file")
    rows = read_rows(path, split, f"data file {path}")
    for i, (lineno, row) in enumerate(rows):
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise UpcycleError(f"data file {path}, row {i + 1}: expected 'text' and 'label' fields")
        if not isinstance(row["text"], str):
            raise UpcycleError(f"{split} file {path}, line {lineno}: 'text' is "
                               f"{_kind(row['text'])}, expected a string")
    return rows


def _kind(value) -> str:
    """How a JSON value is named in an error ("null", "a list", "true")."""
    if value is None:
        return "null (or missing)"
    if isinstance(value, (bool, np.bool_)):
        return json.dumps(bool(value))
    return f"a {type(value).__name__}"


INT64 = (-(1 << 63), (1 << 63) - 1)


def _label_id(v, where: str) -> int | None:
    """An integer class id from a label, None when it is not one (perhaps a class name); an
    error for what is neither (booleans, fractions, nulls, lists) or overflows int64."""
    if isinstance(v, (bool, np.bool_)):
        raise UpcycleError(f"{where}: label {json.dumps(bool(v))} is a boolean; expected an "
                           f"integer class id 0..C-1 or a class name")
    if isinstance(v, (float, np.floating)):
        raise UpcycleError(f"{where}: label {v!r} is not an integer class id (write it "
                           f"without a fraction, or as a class name in quotes)")
    if v is None or isinstance(v, (list, dict)):
        raise UpcycleError(f"{where}: label is {_kind(v)}; expected an integer class id "
                           f"0..C-1 or a class name")
    if isinstance(v, (int, np.integer)):
        value = int(v)
    elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
        value = int(v)
    else:
        return None
    if not INT64[0] <= value <= INT64[1]:
        raise UpcycleError(f"{where}: label {value} does not fit a 64-bit integer (expected a "
                           f"class id 0..C-1)")
    return value


def _is_fraction(v) -> bool:
    """A string that reads as a number but not an integer ("1.5", "2.0", "1e3")."""
    if not isinstance(v, str):
        return False
    try:
        float(v)
    except ValueError:
        return False
    return not v.strip().lstrip("-").isdigit() and v.strip().lower() not in (
        "nan", "inf", "-inf", "infinity", "-infinity")


class ClassificationTask:
    """A HF classification model folder plus its data handling, loss and accuracy (a
    :class:`~upcycle.tasks.base.Task`)."""

    name = "classification"
    metric_names = ("accuracy", "loss")
    def __init__(self, model_dir: str | os.PathLike, kind: str, *, num_labels: int | None = None,
                 max_length: int = 128, head_seed: int = 0):

        self.model_dir = Path(model_dir)
        self.kind = kind
        self.max_length = max_length
        self.head_seed = head_seed
        self.config = load_model_config(self.model_dir)
        archs = self.config.architectures or []
        suffix = "ForSequenceClassification" if kind == "text" else "ForImageClassification"
        self.has_head = any(a.endswith(suffix) for a in archs)
        self.num_labels = self.config.num_labels if self.has_head else num_labels
        self.fixed_num_labels = num_labels is not None or self.has_head
        """True when the class count was given (head or ``num_labels``): gaps are allowed."""
        self.label2id = {str(k): int(v) for k, v in (self.config.label2id or {}).items()} \
            if self.has_head else {}
        self._tokenizer = None
        self._image_stats = None
        self._splits = SplitRegistry()

    # -- model -----------------------------------------------------------------------------
    def load_model(self, num_labels: int | None = None, *, dtype: torch.dtype | None = None
                   ) -> nn.Module:
        """The classification model, in eval mode, on CPU (weights in ``dtype`` when given,
        else as stored)."""
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if self.kind == "text" else \
            AutoModelForImageClassification
        n = self.num_labels or num_labels
        if n is None:
            raise UpcycleError(f"model {self.model_dir}: has no classification head and the number "
                               f"of classes is unknown (read the training data first)")
        kwargs = {} if self.has_head else {"num_labels": n}
        if not self.has_head and self.label2id:  # class names from the data: keep them
            kwargs["label2id"] = dict(self.label2id)
            kwargs["id2label"] = {i: name for name, i in self.label2id.items()}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if self.kind == "text" and getattr(self.config, "pad_token_id", None) is None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id  # decoders: pad = EOS
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        if not self.has_head:  # the new head is expected: no "newly initialized" warning
            hf_logging.set_verbosity_error()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.head_seed)
                model = load_pretrained(auto, self.model_dir, role="model", **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        return model.eval()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            folder = Path(self.model_dir)
            try:
                if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
                    # transformers 5 would build an empty tokenizer of the model type
                    raise FileNotFoundError(f"no tokenizer file in {folder}")
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False)
            except Exception as exc:  # missing or broken tokenizer files: say which folder
                raise UpcycleError(f"model {self.model_dir}: its tokenizer cannot be loaded "
                                   f"(expected tokenizer.json, or tokenizer_config.json with "
                                   f"its vocabulary): {error_line(exc)}") from exc
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token  # a decoder's tokenizer (GPT-2, Llama)
            self._tokenizer = tokenizer
        return self._tokenizer

    # -- data ------------------------------------------------------------------------------
    def read(self, path: str | os.PathLike, *, split: str = "data", fix_num_labels: bool = False
             ) -> LabeledData:
        """Read and validate one split. ``fix_num_labels`` infers the class count from it when
        the model has no head yet."""
        path = Path(path)
        if task_kind(path) != self.kind:
            raise UpcycleError(f"{split} file {path}: a {task_kind(path)} file, but the task is "
                               f"{self.kind} classification")
        if self.kind == "text":
            rows = _read_text_rows(path, split)
            # cut before tokenising: the tokens kept are the same (see CHARS_PER_TOKEN)
            texts = [cut_text(r["text"], self.max_length) for _, r in rows]
            raw = [r["label"] for _, r in rows]
            where = [f"{split} file {path}, line {lineno}" for lineno, _ in rows]
            images = None
        else:
            if not path.is_file():
                raise UpcycleError(f"{split} file {path}: no such file")
            try:
                with np.load(path) as z:
                    if "images" not in z or "labels" not in z:
                        raise UpcycleError(f"{split} file {path}: expected arrays 'images' and "
                                           f"'labels', found {sorted(z.files)}")
                    arr, raw = z["images"], list(z["labels"])
            except UpcycleError:
                raise
            except Exception as exc:
                raise UpcycleError(f"{split} file {path}: not a readable .npz: {exc}") from exc
            images = self._prepare_images(arr, path)
            texts = None
            where = [f"{split} file {path}, example {i + 1}" for i in range(len(raw))]
        if not raw:
            raise UpcycleError(f"{split} file {path}: holds no examples")
        labels = self._labels(raw, path, split, fix_num_labels, where)
        data = LabeledData(labels=labels, source=str(path), texts=texts, images=images)
        self._splits.note(_digest(data), split, str(path))
        return data

    def _labels(self, raw: list, path: Path, split: str, fix_num_labels: bool,
                where: list[str] | None = None) -> torch.Tensor:
        """Integer class ids ``0..C-1`` or class names. Names come from the model's head
        (``label2id``) or, for a new head, from the data that fixes the class count: the sorted
        names get ids 0..C-1 and are saved into the model's ``id2label``/``label2id``. Integer
        labels that skip a class (``{0,1,2,3,4,9}``) are refused unless the class count was
        given (``num_labels``): a typo must not quietly build a bigger head. Booleans,
        fractions ("1.5", "2.0") and nulls are refused (``where``: "file, line" of each)."""
        where = where or [f"{split} file {path}, example {i + 1}" for i in range(len(raw))]
        as_ids = []
        for i, v in enumerate(raw):
            if isinstance(v, str) and v in self.label2id:
                as_ids.append(None)
                continue
            as_ids.append(_label_id(v, where[i]))
            if as_ids[-1] is None and _is_fraction(v):
                raise UpcycleError(f"{where[i]}: label {v!r} is not an integer class id (write "
                                   f"it without a fraction)")
        if (fix_num_labels and self.num_labels is None and raw
                and all(n is None for n in as_ids)):
            names = sorted({str(v) for v in raw})
            self.label2id = {name: i for i, name in enumerate(names)}
        ids = []
        for i, v in enumerate(raw):
            if isinstance(v, str) and v in self.label2id:
                ids.append(self.label2id[v])
            elif as_ids[i] is not None:
                ids.append(as_ids[i])
            else:
                known = sorted(self.label2id) or "(none named)"
                raise UpcycleError(f"{split} file {path}, example {i + 1}: label {v!r} is neither "
                                   f"an integer nor one of the model's classes {known}")
        labels = torch.tensor(ids, dtype=torch.long)
        if bool((labels < 0).any()):
            raise UpcycleError(f"{split} file {path}: negative label {int(labels.min())}; labels "
                               f"must be 0..C-1 or class names")
        if self.num_labels is None and fix_num_labels:
            present = sorted(set(ids))
            count = present[-1] + 1
            missing = _gaps(present, 11)  # never a set of range(count): a label may be huge
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                raise UpcycleError(
                    f"{split} file {path}: the labels {{{', '.join(map(str, present[:12]))}"
                    f"{', ...' if len(present) > 12 else ''}}} skip {shown}: labels must be "
                    f"0..C-1 (or class names); if the gap is intended pass --num-labels {count}")
            self.num_labels = count
        if self.num_labels is not None:
            bad = labels[labels >= self.num_labels]
            if bad.numel():
                raise UpcycleError(f"{split} file {path}: label {int(bad[0])} is outside the "
                                   f"model's {self.num_labels} classes (0..{self.num_labels - 1})")
        return labels

    def label_info(self) -> dict:
        """The class count and the label mapping, for printing and for report.json."""
        names = ({str(i): name for name, i in sorted(self.label2id.items(), key=lambda kv: kv[1])}
                 if self.label2id else None)
        return {"num_labels": self.num_labels, "id2label": names}

    def _prepare_images(self, arr: np.ndarray, path: Path) -> torch.Tensor:
        channels = int(getattr(self.config, "num_channels", 3))
        size = getattr(self.config, "image_size", None)
        x = torch.as_tensor(np.asarray(arr))
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.ndim != 4:
            raise UpcycleError(f"images in {path}: expected shape (N,H,W), (N,H,W,C) or (N,C,H,W), "
                               f"got {tuple(arr.shape)}")
        x = x.float()
        if arr.dtype == np.uint8 or float(x.max()) > 1.5:
            x = x / 255.0
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != channels:
            raise UpcycleError(f"images in {path}: {x.shape[1]} channels, the model expects "
                               f"{channels}")
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        mean, std = self._image_norm(channels)
        return ((x - mean) / std).contiguous()

    def _image_norm(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = [0.5] * channels, [0.5] * channels
        pre = self.model_dir / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean = cfg.get("image_mean", mean)
            std = cfg.get("image_std", std)
        return (torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1))

    def split(self, data: LabeledData, fraction: float, seed: int = 0
              ) -> tuple[LabeledData, LabeledData]:
        """Carve ``fraction`` of ``data`` off (seeded): returns (rest, carved)."""
        if not 0 < fraction < 1:
            raise UpcycleError(f"split fraction must be in (0, 1), got {fraction}")
        order = np.random.default_rng(seed).permutation(len(data))
        n = max(1, int(round(fraction * len(data))))
        return data.subset(order[n:]), data.subset(order[:n], source=f"{data.source} "
                                                               f"(held-out {fraction:.0%})")

    def batches(self, data: LabeledData, batch_size: int, *, shuffle: bool = False,
                seed: int = 0) -> list[dict]:
        """Model-ready batches (dicts of tensors with ``labels``), tokenised/padded per batch."""
        out = []
        for idx in batch_indices(len(data), batch_size, shuffle=shuffle, seed=seed):
            labels = data.labels[torch.as_tensor(idx)]
            if self.kind == "text":
                enc = self.tokenizer([data.texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                batch = dict(enc)
            else:
                batch = {"pixel_values": data.images[torch.as_tensor(idx)]}
            batch["labels"] = labels
            out.append(batch)
        return out


    # -- the Task protocol: loss, metrics, training data ---------------------------------
    def read_training(self, path: str | os.PathLike) -> LabeledData:
        """The training split: it fixes the class count when the model has no head yet."""
        return self.read(path, split="training", fix_num_labels=True)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return classification_loss(model, batch)

    def evaluate(self, model: nn.Module, batches: list[dict], *,
                 precision: str | None = None) -> dict:
        return evaluate(model, batches, precision=precision)

    def score(self, metrics: dict) -> float:
        """Higher is better: accuracy, ties broken by the lower loss."""
        return metrics["accuracy"] - 1e-6 * metrics["loss"]

    def describe(self, metrics: dict) -> str:
        return f"accuracy {metrics['accuracy']:.4f} (n={metrics['n']}, loss {metrics['loss']:.4f})"

    def collator(self) -> ClassificationCollator:
        return ClassificationCollator(self)

    def dataset(self, data: LabeledData) -> ExampleDataset:
        return ExampleDataset(data)

    def trainer_metrics(self) -> dict:
        """Trainer's ``compute_metrics``/``preprocess_logits_for_metrics``: accuracy."""
        compute, preprocess = accuracy_metrics()
        return {"compute_metrics": compute, "preprocess_logits_for_metrics": preprocess}

    def save_tokenizer(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer (text tasks; image tasks have none) into ``folder``."""
        if self.kind == "text":
            self.tokenizer.save_pretrained(folder)


def _gaps(present: list[int], limit: int) -> list[int]:
    """The first ``limit`` integers in 0..max(present) missing from sorted ``present``."""
    out, expected = [], 0
    for value in present:
        while expected < value and len(out) < limit:
            out.append(expected)
            expected += 1
        if len(out) >= limit:
            break
        expected = value + 1
    return out


def _digest(data: LabeledData) -> str:
    """A content hash of a split's examples (text or image, and label), in any order."""
    labels = data.labels.tolist()
    if data.texts is not None:
        return examples_digest(f"{label}\t{text}".encode() for text, label in
                               zip(data.texts, labels))
    return examples_digest(image.numpy().tobytes() + str(label).encode()
                           for image, label in zip(data.images, labels))


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def move_batch(batch: dict, device: torch.device | str) -> dict:
    """The batch's tensors on ``device`` (other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**model_inputs(batch))
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the model's logits on the batch's labels."""
    return F.cross_entropy(logits_of(model, batch), batch["labels"])


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], *, precision: str | None = None) -> dict:
    """Mean loss and accuracy over batches (summed over ranks when distributed), on the
    model's device, under ``precision`` ("bf16"/"fp16") autocast when given. A rank with no
    batches contributes zero (every rank takes part in the all-reduce)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    acc = torch.float32 if device.type == "mps" else torch.float64
    totals = torch.zeros(3, dtype=acc, device=device)
    for batch in batches:
        batch = move_batch(batch, device)
        with autocast(device, precision):
            logits = logits_of(model, batch)
        totals[0] += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").to(acc)
        totals[1] += (logits.argmax(-1) == batch["labels"]).sum().to(acc)
        totals[2] += len(batch["labels"])
    distributed.all_reduce_sum(totals)
    totals = totals.cpu()
    model.train(was_training)
    n = max(1.0, float(totals[2]))
    return {"loss": float(totals[0]) / n, "accuracy": float(totals[1]) / n, "n": int(totals[2])}


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
