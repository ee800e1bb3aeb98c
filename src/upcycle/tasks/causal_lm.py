"""A causal language-modelling job: a HF ``*ForCausalLM`` folder + text data + token loss.

Data files:
- ``.txt``: one document per line (blank lines skipped); with ``chunk=True`` the whole file is
  one stream (lines joined by newlines), for long texts whose lines are not documents;
- ``.jsonl`` / ``.csv`` with a ``text`` field, or with ``prompt`` and ``completion`` fields
  (the loss is then taken on the completion tokens only).

Documents are tokenised, closed with the EOS token and, for plain text, packed into blocks of
``max_length`` tokens (``pack=False``: one document per example, truncated). Labels are the
input ids with ``-100`` on padding and prompt tokens; the model shifts them (``labels[:, 1:]``
are the targets). A tokenizer without a pad token gets EOS as its pad token (and the model's
config its ``pad_token_id``).

The loss is the mean over target tokens; :func:`evaluate` sums token losses and token counts
over batches and ranks, so the held-out loss is the global mean over target tokens, never a
mean of per-batch means.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..errors import UpcycleError
from ..io.checkpoints import error_line, load_pretrained, read_config_json
from ..io.model_files import check_no_custom_code
from ..runtime import distributed
from ..runtime.devices import autocast, model_device
from .base import (
    SplitRegistry,
    batch_indices,
    cut_text,
    examples_digest,
    load_model_config,
    read_rows,
    text_limit,
)

LM_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")
IGNORE_INDEX = -100


def is_causal_lm(model_dir: str | os.PathLike) -> bool:
    """True when the folder's config names a ``*ForCausalLM`` (or ``*LMHeadModel``) class."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return False
    archs = read_config_json(model_dir, f"model {model_dir}").get("architectures") or []
    if not isinstance(archs, list):
        return False
    return any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def position_limit(config) -> int | None:
    """The model's maximum sequence length from its config, when it records one."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class LMData:
    """Tokenised examples of one split: ``input_ids`` and ``labels`` per example."""
    input_ids: list[list[int]]
    labels: list[list[int]]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, index, source: str | None = None) -> LMData:
        index = [int(i) for i in np.asarray(index).reshape(-1)]
        return LMData([self.input_ids[i] for i in index], [self.labels[i] for i in index],
                      source or self.source)

    def target_tokens(self) -> int:
        """Tokens that carry a loss (after the shift)."""
        return sum(sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in self.labels)


# -- reading files -------------------------------------------------------------------------------

def _read_txt(path: Path, split: str) -> list[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; names the first undecodable line."""
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UpcycleError(f"{split} file {path}, line {lineno}: not UTF-8 text "
                                   f"({exc.reason} at byte {exc.start})") from exc
            lines.append((lineno, line.rstrip("\r\n")))
    if not any(line.strip() for _, line in lines):
        raise UpcycleError(f"{split} file {path}: is empty (expected one document per line)")
    return lines


def _read_rows(path: Path, split: str) -> list[tuple[int, dict]]:
    """(line number, row) of a JSONL or CSV file."""
    rows = read_rows(path, split, f"{split} file {path}")
    if not rows:
        raise UpcycleError(f"{split} file {path}: is empty (expected rows with 'text', or with "
                           f"'prompt' and 'completion')")
    return rows


def read_documents(path: str | os.PathLike, *, split: str = "data", chunk: bool = False
                   ) -> list[tuple[str | None, str]]:
    """The file's examples as (prompt, text) pairs; prompt is None for plain text."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LM_SUFFIXES:
        raise UpcycleError(f"{split} file {path}: unknown format {suffix!r} for a language model "
                           f"(expected .txt, or .jsonl/.csv with 'text' or 'prompt'/'completion')")
    if not path.is_file():
        raise UpcycleError(f"{split} file {path}: no such file")
    if suffix == ".txt":
        lines = _read_txt(path, split)
        if chunk:
            return [(None, "\n".join(line for _, line in lines))]
        return [(None, line) for _, line in lines if line.strip()]
    rows = _read_rows(path, split)
    first_line, first = rows[0]
    if not isinstance(first, dict):
        raise UpcycleError(f"{split} file {path}, line {first_line}: expected an object with "
                           f"'text', or with 'prompt' and 'completion'")
    paired = "text" not in first and ("prompt" in first or "completion" in first)
    docs = []
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise UpcycleError(f"{split} file {path}, line {lineno}: expected an object, got "
                               f"{type(row).__name__}")
        if paired:
            missing = [k for k in ("prompt", "completion") if row.get(k) is None]
            if missing:
                raise UpcycleError(f"{split} file {path}, line {lineno}: no {missing[0]!r} field "
                                   f"(the file's first row has 'prompt'/'completion', so every "
                                   f"row needs both)")
            _check_string(row, ("prompt", "completion"), path, split, lineno)
            docs.append((row["prompt"], row["completion"]))
        else:
            if row.get("text") is None:
                raise UpcycleError(f"{split} file {path}, line {lineno}: no 'text' field "
                                   f"(expected 'text', or 'prompt' and 'completion')")
            _check_string(row, ("text",), path, split, lineno)
            docs.append((None, row["text"]))
    return docs


def _check_string(row: dict, fields: tuple[str, ...], path: Path, split: str,
                  lineno: int) -> None:
    """Text fields must be strings: a number or a list is not trained on as its repr."""
    for field in fields:
        if not isinstance(row[field], str):
            kind = json.dumps(row[field]) if isinstance(row[field], bool) else \
                f"a {type(row[field]).__name__}"
            raise UpcycleError(f"{split} file {path}, line {lineno}: {field!r} is {kind}, "
                               f"expected a string")


def _pieces(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, each cut at the start of a run of
    whitespace in the piece's second half when there is one (so byte-level BPE tokenises the
    pieces as it tokenises the whole), else at ``limit``; a text within the limit is one
    piece."""
    out, start = [], 0
    while len(text) - start > limit:
        end, half = start + limit, start + limit // 2
        cut = max(text.rfind(c, half, end + 1) for c in " \n\t")
        while cut > half and text[cut - 1].isspace():
            cut -= 1
        if cut <= half:
            cut = end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


# -- the task ------------------------------------------------------------------------------------

class CausalLMTask:
    """A HF causal-LM folder plus its data handling, token loss and perplexity.

    ``base_dir`` is where to look for the tokenizer when ``model_dir`` has none (e.g. a
    fine-tune saved without it). ``max_length`` defaults to min(512, the model's position
    limit) and may not exceed that limit.
    """
    kind = "causal_lm"
    name = "causal-lm"
    metric_names = ("loss", "perplexity")

    def __init__(self, model_dir: str | os.PathLike, *, base_dir: str | os.PathLike | None = None,
                 max_length: int | None = None, pack: bool = True, chunk: bool = False):

        self.model_dir = Path(model_dir)
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.config = load_model_config(self.model_dir)
        limit = position_limit(self.config)
        if max_length is None:
            max_length = min(512, limit) if limit else 512
        if max_length < 2:
            raise UpcycleError(f"max_length must be >= 2 tokens, got {max_length}")
        if limit is not None and max_length > limit:
            raise UpcycleError(f"max_length {max_length} exceeds the position limit of model "
                               f"{self.model_dir} ({limit} tokens)")
        self.max_length = max_length
        self.pack = pack
        self.chunk = chunk
        self.tokenizer = self._load_tokenizer()
        self._splits = SplitRegistry()

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        tried = [d for d in (self.model_dir, self.base_dir) if d is not None]
        tokenizer = None
        for folder in tried:
            if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                    "vocab.json", "tokenizer.model")):
                check_no_custom_code(folder, f"tokenizer in {folder}")
                try:
                    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
                    break
                except Exception as exc:  # a broken tokenizer file: say which
                    raise UpcycleError(f"tokenizer in {folder}: cannot be loaded: "
                                       f"{error_line(exc)}") from exc
        if tokenizer is None:
            where = " or ".join(str(d) for d in tried)
            raise UpcycleError(f"no tokenizer in {where} (expected tokenizer.json or "
                               f"tokenizer_config.json; save it with tokenizer.save_pretrained"
                               f"{'' if self.base_dir else ', or pass the base model'})")
        if tokenizer.eos_token_id is None:
            raise UpcycleError(f"tokenizer of {self.model_dir}: has no EOS token (needed to end "
                               f"documents)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if len(tokenizer) > self.config.vocab_size:
            raise UpcycleError(f"tokenizer of {self.model_dir}: {len(tokenizer)} tokens, the "
                               f"model's vocabulary has {self.config.vocab_size}")
        return tokenizer

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # -- model -----------------------------------------------------------------------------
    def load_model(self, *, dtype: torch.dtype | None = None) -> nn.Module:
        """The causal LM, in eval mode, on CPU, with ``config.pad_token_id`` set."""
        from transformers import AutoModelForCausalLM

        kwargs = {} if dtype is None else {"dtype": dtype}
        model = load_pretrained(AutoModelForCausalLM, self.model_dir, role="model", **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = self.pad_token_id
        return model.eval()

    # -- data ------------------------------------------------------------------------------
    def read(self, path: str | os.PathLike, *, split: str = "data") -> LMData:
        """Read, tokenise and pack (or truncate) one split."""
        path = Path(path)
        docs = read_documents(path, split=split, chunk=self.chunk)
        data = self.encode(docs, source=str(path))
        if not len(data) or not data.target_tokens():
            raise UpcycleError(f"{split} file {path}: holds no tokens to predict")
        self._splits.note(examples_digest(
            np.asarray(ids + [-1] + labels, dtype=np.int64).tobytes()
            for ids, labels in zip(data.input_ids, data.labels)), split, str(path))
        return data

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts`` (no special tokens), tokenised a bounded batch at a time:
        at most about ``8 * max_length * CHARS_PER_TOKEN`` characters per call."""
        budget = 8 * text_limit(self.max_length)
        out: list[list[int]] = []
        group: list[str] = []
        size = 0
        for text in texts + [None]:
            if group and (text is None or size + len(text) > budget):
                out.extend(self.tokenizer(group, add_special_tokens=False)["input_ids"])
                group, size = [], 0
            if text is not None:
                group.append(text)
                size += len(text)
        return out

    def encode(self, docs: list[tuple[str | None, str]], *, source: str = "<texts>") -> LMData:
        """Tokenise (prompt, text) pairs: plain texts (prompt None) are packed or truncated;
        paired ones are one example each, the prompt unlabelled (cut from the left when too
        long)."""
        eos, n = self.tokenizer.eos_token_id, self.max_length
        ids_out: list[list[int]] = []
        labels_out: list[list[int]] = []
        plain = [t for p, t in docs if p is None]
        if plain:
            if self.pack:  # every token is used: long documents are tokenised piece by piece
                pieces = [_pieces(t, text_limit(n)) for t in plain]
                flat = iter(self._tokenize([piece for doc in pieces for piece in doc]))
                encoded = [[t for _ in doc for t in next(flat)] + [eos] for doc in pieces]
            else:  # truncated: what lies beyond max_length tokens is never read
                encoded = [ids + [eos] for ids in self._tokenize([cut_text(t, n)
                                                                  for t in plain])]
            if self.pack:
                stream = [t for ids in encoded for t in ids]
                for start in range(0, len(stream), n):
                    block = stream[start:start + n]
                    if len(block) >= 2:
                        ids_out.append(block)
                        labels_out.append(list(block))
            else:
                for ids in encoded:
                    ids_out.append(ids[:n])
                    labels_out.append(list(ids[:n]))
        paired = [(p, t) for p, t in docs if p is not None]
        if paired:
            # cut before tokenising (see CHARS_PER_TOKEN): a prompt keeps its end
            prompts = self._tokenize([cut_text(p, n, keep="end") for p, _ in paired])
            comps = self._tokenize([cut_text(t, n) for _, t in paired])
            for p_ids, c_ids in zip(prompts, comps):
                c_ids = (c_ids + [eos])[:n - 1]
                p_ids = p_ids[-(n - len(c_ids)):] if p_ids else []
                ids_out.append(p_ids + c_ids)
                labels_out.append([IGNORE_INDEX] * len(p_ids) + c_ids)
        return LMData(ids_out, labels_out, source)

    def split(self, data: LMData, fraction: float, seed: int = 0) -> tuple[LMData, LMData]:
        """Carve ``fraction`` of ``data`` off (seeded): returns (rest, carved)."""
        if not 0 < fraction < 1:
            raise UpcycleError(f"split fraction must be in (0, 1), got {fraction}")
        if len(data) < 2:
            raise UpcycleError(f"{data.source}: {len(data)} example(s), too few to split off a "
                               f"held-out part (use a longer file or a smaller max_length)")
        order = np.random.default_rng(seed).permutation(len(data))
        n = min(len(data) - 1, max(1, int(round(fraction * len(data)))))
        return data.subset(order[n:]), data.subset(order[:n], source=f"{data.source} "
                                                               f"(held-out {fraction:.0%})")

    def batches(self, data: LMData, batch_size: int, *, shuffle: bool = False,
                seed: int = 0) -> list[dict]:
        """Right-padded batches: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on
        padding and prompts)."""
        out = []
        for idx in batch_indices(len(data), batch_size, shuffle=shuffle, seed=seed):
            width = max(len(data.input_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)
            labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                k = len(data.input_ids[i])
                ids[row, :k] = torch.tensor(data.input_ids[i])
                labels[row, :k] = torch.tensor(data.labels[i])
                mask[row, :k] = 1
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        return out


    # -- the Task protocol: loss, metrics, training data ---------------------------------
    def read_training(self, path: str | os.PathLike) -> LMData:
        return self.read(path, split="training")

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return causal_lm_loss(model, batch)

    def evaluate(self, model: nn.Module, batches: list[dict], *,
                 precision: str | None = None) -> dict:
        with autocast(model_device(model), precision):
            return evaluate(model, batches)

    def score(self, metrics: dict) -> float:
        """Higher is better: minus the held-out token loss."""
        return -metrics["loss"]

    def describe(self, metrics: dict) -> str:
        return (f"perplexity {metrics['perplexity']:.3f} (loss {metrics['loss']:.4f}, "
                f"{metrics['tokens']} tokens)")

    def collator(self) -> CausalLMCollator:
        return CausalLMCollator(self)

    def dataset(self, data: LMData) -> LMExampleDataset:
        return LMExampleDataset(data)

    def trainer_metrics(self) -> dict:
        """Nothing beyond Trainer's own evaluation loss (the token loss)."""
        return {}

    def save_tokenizer(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer, with its pad token (EOS when it had none)."""
        self.tokenizer.save_pretrained(folder)


# -- loss and evaluation -------------------------------------------------------------------------

LOGITS_BUDGET = 2**22
"""The most logits (positions x vocabulary) that exist at once while the LM loss is computed:
the head and the cross-entropy run over chunks of max(1, LOGITS_BUDGET // vocab) positions
of the final hidden states (16 MiB of fp32 logits), whatever the batch, the sequence length
or the held-out size."""
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                    "output_multiplier_scale")
"""Config fields of families whose forward transforms the logits after the head: their loss
is computed from the model's own logits (whole)."""


def _backbone_and_head(model: nn.Module):
    """(the transformer under the LM head, the head) of a HF ``*ForCausalLM`` whose logits
    are ``head(backbone(...)[0])``; (None, None) for anything else (a wrapped model, a head
    that transforms its logits)."""
    prefix = getattr(type(model), "base_model_prefix", None)
    # direct children only: a wrapper (peft) forwards attribute reads to the model it wraps
    backbone = model._modules.get(prefix) if isinstance(prefix, str) and prefix else None
    get_head = getattr(type(model), "get_output_embeddings", None)
    head = get_head(model) if callable(get_head) and backbone is not None else None
    config = getattr(model, "config", None)
    if (not isinstance(backbone, nn.Module) or type(head) is not nn.Linear
            or not any(child is head for child in model.children())
            or config is None or any(getattr(config, k, None) not in (None, 1, 1.0)
                                     for k in _HEAD_TRANSFORMS)):
        return None, None
    return backbone, head


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: fp32, or fp64 when the model computes in fp64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunk_loss(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_upcast(head(hidden)), targets, reduction="sum")


def _token_losses(model: nn.Module, batch: dict, reduction: str) -> tuple[torch.Tensor, int]:
    """The summed (or mean) next-token cross-entropy of a batch and its number of targets.
    A HF causal LM's head and loss run over chunks of positions (:data:`LOGITS_BUDGET`), only
    where a target is, so the (batch, seq, vocab) logits never exist; under autograd each
    chunk's logits are recomputed in the backward pass rather than kept."""
    device = model_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    targets = batch["labels"][:, 1:]
    count = int((targets != IGNORE_INDEX).sum())
    backbone, head = _backbone_and_head(model)
    if backbone is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits = _upcast((out.logits if hasattr(out, "logits") else out[0])[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        keep = targets != IGNORE_INDEX
        hidden, wanted = hidden[:, :-1][keep], targets[keep]
        step = max(1, LOGITS_BUDGET // head.out_features)
        loss = _upcast(hidden.sum() * 0)  # (keeps the graph when no position has a target)
        for start in range(0, len(wanted), step):
            h, t = hidden[start:start + step], wanted[start:start + step]
            if torch.is_grad_enabled() and h.requires_grad:
                loss = loss + torch.utils.checkpoint.checkpoint(_chunk_loss, head, h, t,
                                                                use_reentrant=False)
            else:
                loss = loss + _chunk_loss(head, h, t)
    if reduction == "mean":
        loss = loss / max(count, 1)
    return loss, count


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (``labels[:, 1:] != -100``)."""
    return _token_losses(model, batch, "mean")[0]


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict]) -> dict:
    """Token-mean loss and perplexity over batches (token sums all-reduced over ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        loss, count = _token_losses(model, batch, "sum")
        totals[0] += float(loss)
        totals[1] += count
    distributed.all_reduce_sum(totals)
    model.train(was_training)
    tokens = int(totals[1])
    loss = float(totals[0]) / max(1, tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


def load_lm_task(model_dir: str | os.PathLike, *, base_dir: str | os.PathLike | None = None,
                 max_length: int | None = None, pack: bool = True,
                 chunk: bool = False) -> CausalLMTask:
    """The causal-LM task for a model folder (see :class:`CausalLMTask`)."""
    return CausalLMTask(model_dir, base_dir=base_dir, max_length=max_length, pack=pack,
                        chunk=chunk)


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
