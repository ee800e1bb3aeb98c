"""The embedded default job: fine-tunes of the real MiniLM on BBC News (all offline).

Used by ``upcycle demo`` and ``benchmarks/soup_quality.py``: fixed, seeded train / held-out /
test splits, and a list of fine-tuning recipes varying learning rate, epochs, weight decay
and seed. Fine-tunes are cached: a recipe already trained in the cache is not trained again.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from ..datasets import bbc_news, minilm_path, split_indices, write_jsonl
from ..training import TrainingConfig
from . import load_task
from .finetune import cached_record, finetune

# lr, epochs, weight decay, seed: the "varied hyperparameters" of a soup's ingredients.
RECIPES = [
    {"lr": 8e-5, "epochs": 1, "weight_decay": 0.01, "seed": 0},
    {"lr": 1.5e-4, "epochs": 1, "weight_decay": 0.1, "seed": 2},
    {"lr": 5e-5, "epochs": 2, "weight_decay": 0.0, "seed": 1},
    {"lr": 1e-4, "epochs": 1, "weight_decay": 0.0, "seed": 4},
    {"lr": 3e-5, "epochs": 2, "weight_decay": 0.01, "seed": 3},
    {"lr": 6e-5, "epochs": 1, "weight_decay": 0.05, "seed": 5},
    {"lr": 2e-4, "epochs": 1, "weight_decay": 0.01, "seed": 6},
    {"lr": 4e-5, "epochs": 2, "weight_decay": 0.1, "seed": 7},
    {"lr": 1.2e-4, "epochs": 2, "weight_decay": 0.0, "seed": 8},
    {"lr": 7e-5, "epochs": 1, "weight_decay": 0.01, "seed": 9},
    {"lr": 2.5e-5, "epochs": 2, "weight_decay": 0.05, "seed": 10},
    {"lr": 1e-4, "epochs": 2, "weight_decay": 0.1, "seed": 11},
]

SPLIT_SIZES = {"train": 300, "held_out": 200, "test": 400}
MAX_LENGTH = 64  # tokens: the headline and lead of an article, enough to tell its topic


def default_cache() -> Path:
    return Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" / "upcycle"))


def bbc_splits(cache: Path, sizes: dict[str, int] = SPLIT_SIZES, seed: int = 0) -> dict[str, Path]:
    """Write (once) seeded, disjoint train / held-out / test JSONL splits of BBC News."""
    folder = Path(cache) / f"bbc-news-{sizes['train']}-{sizes['held_out']}-{sizes['test']}-s{seed}"
    paths = {name: folder / f"{name}.jsonl" for name in sizes}
    if all(p.is_file() for p in paths.values()):
        return paths
    texts, labels, _ = bbc_news()
    total = sum(sizes.values())
    order = split_indices(len(texts), (total / len(texts), 1 - total / len(texts)), seed)[0]
    start = 0
    for name, n in sizes.items():
        idx = order[start:start + n]
        write_jsonl(paths[name], [texts[i] for i in idx], [labels[i] for i in idx])
        start += n
    return paths


def make_ingredients(cache: Path, recipes: list[dict], *, max_length: int = MAX_LENGTH,
                     batch_size: int = 16, progress: bool = True, device: str = "auto"
                     ) -> list[Path]:
    """Fine-tune MiniLM on the BBC train split once per recipe (cached); return the folders.
    Training runs on ``transformers.Trainer`` (:mod:`upcycle.training`) on ``device``."""
    splits = bbc_splits(cache)
    task = load_task(minilm_path(), splits["train"], max_length=max_length, head_seed=0)
    train_data = task.read(splits["train"], split="train", fix_num_labels=True)
    out = []
    for recipe in tqdm(recipes, desc="fine-tuning ingredients", disable=not progress):
        name = "minilm-bbc-lr{lr:g}-ep{epochs}-wd{weight_decay:g}-s{seed}".format(**recipe)
        folder = Path(cache) / "ingredients" / f"len{max_length}" / name
        if cached_record(folder, recipe) is None:
            config = TrainingConfig(lr=recipe["lr"], epochs=recipe["epochs"],
                                    weight_decay=recipe["weight_decay"], seed=recipe["seed"],
                                    warmup_ratio=0.1, batch_size=batch_size, device=device,
                                    progress=progress)
            finetune(task, train_data, folder, config=config, overwrite=True)
        out.append(folder)
    return out
