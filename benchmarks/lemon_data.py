"""The corpora of ``lemon_savings.py``: BBC News as characters (GPT-2) or WordPiece tokens
(BERT, masked-LM targets)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

from upcycle.demo.data import bbc_news, split_indices  # noqa: E402
from upcycle.io.writing import atomic_file  # noqa: E402

WORDPIECE_VOCAB = 2048
MASK_PROB = 0.15


@functools.lru_cache(maxsize=1)
def _articles() -> tuple[list[str], list[str]]:
    texts, _, _ = bbc_news()
    train_idx, held_idx = split_indices(len(texts), (0.9, 0.1), seed=0)
    return [texts[i] for i in train_idx], [texts[i] for i in held_idx]


def _char_corpus() -> dict:
    train, held = _articles()
    chars = sorted({c for t in train + held for c in t})
    # printable ASCII keeps the vocabulary small; anything else maps to one "other" id
    vocab = [c for c in chars if 32 <= ord(c) < 127]
    index = {c: i + 1 for i, c in enumerate(vocab)}

    def encode(texts) -> np.ndarray:
        joined = "\n".join(texts)
        return np.fromiter((index.get(c, 0) for c in joined), dtype=np.int64, count=len(joined))

    return {"train": encode(train), "held": encode(held), "vocab": len(vocab) + 1}


def _wordpiece_corpus(cache: Path, vocab_size: int = WORDPIECE_VOCAB) -> dict:
    """A WordPiece tokenizer of ``vocab_size`` trained on the training articles (cached in
    ``cache`` so that every contender of a run uses the same one), and both token streams."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    train, held = _articles()
    path = cache / "wordpiece.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, show_progress=False,
            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.train_from_iterator(train, trainer)
        with atomic_file(path) as tmp:
            tok.save(str(tmp))
    sep = tok.token_to_id("[SEP]")

    def encode(texts) -> np.ndarray:
        ids = []
        for enc in tok.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(sep)
        return np.asarray(ids, dtype=np.int64)

    return {"train": encode(train), "held": encode(held), "vocab": tok.get_vocab_size(),
            "mask_id": tok.token_to_id("[MASK]"), "n_special": 5}


@functools.lru_cache(maxsize=2)
def corpus(family: str, cache: str, vocab_size: int = WORDPIECE_VOCAB) -> dict:
    """GPT-2: characters; BERT: WordPiece tokens of a ``vocab_size`` vocabulary."""
    return _char_corpus() if family == "gpt2" else _wordpiece_corpus(Path(cache), vocab_size)


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab: int,
                n_special: int, prob: float = MASK_PROB) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking: select ``prob`` of the positions (at least one per batch); of those,
    80% become ``mask_id``, 10% a random non-special token, 10% stay. Returns (inputs,
    labels) with labels -100 where not selected."""
    selected = rng.random(ids.shape) < prob
    if not selected.any():
        selected.flat[rng.integers(ids.size)] = True
    labels = np.where(selected, ids, -100)
    roll = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[selected & (roll < 0.8)] = mask_id
    swap = selected & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = rng.integers(n_special, vocab, size=int(swap.sum()))
    return inputs, labels


class Batches(torch.utils.data.Dataset):
    """``n`` ready-made batches of random windows of ``stream``; batch ``i`` depends only on
    (seed, i), so it is built when asked for (no list of thousands of batches in memory)."""

    def __init__(self, data: dict, stream: np.ndarray, n: int, st: dict, seed: int,
                 mlm: bool):
        self.data, self.stream, self.n, self.st, self.seed, self.mlm = (
            data, stream, n, st, seed, mlm)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        context, batch = self.st["context"], self.st["batch"]
        starts = rng.integers(0, len(self.stream) - context - 1, size=batch)
        ids = np.stack([self.stream[s:s + context] for s in starts])
        if not self.mlm:
            # the first position is never a target (the model shifts the labels); marking it
            # -100 makes Trainer's token count (num_items_in_batch) the true B x (T - 1), so
            # its loss is the mean over the targets, like the model's own
            labels = ids.copy()
            labels[:, 0] = -100
            return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        d = self.data
        inputs, labels = mask_tokens(ids, rng, mask_id=d["mask_id"], vocab=d["vocab"],
                                     n_special=d["n_special"])
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


