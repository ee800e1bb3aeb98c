"""The embedded default job: fine-tunes of the real MiniLM on BBC News (all offline).

Used by ``upcycle demo`` and ``benchmarks/soup_quality.py``: fixed, seeded train / held-out /
test splits, and a list of fine-tuning recipes varying learning rate, epochs, weight decay
and seed. Fine-tunes are cached: a recipe already trained in the cache is not trained again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..jobs.finetune import cached_record, finetune
from ..tasks import load_task
from ..training.config import TrainingConfig
from .data import bbc_news, minilm_path, split_indices, write_jsonl

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

# The demo's ingredients, in fine-tune order: one epoch each (the cold-cache demo has to fit
# in a few minutes on 2 CPU cores), learning rates and seeds varied. ``upcycle demo
# --ingredients N`` takes more from RECIPES after these.
DEMO_RECIPES = [RECIPES[1], RECIPES[3], RECIPES[0], RECIPES[6]]

SPLIT_SIZES = {"train": 300, "held_out": 200, "test": 400}
MAX_LENGTH = 64  # tokens: the headline and lead of an article, enough to tell its topic


def default_cache() -> Path:
    return Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" / "upcycle"))


def bbc_splits(cache: Path, sizes: dict[str, int] | None = None, seed: int = 0
               ) -> dict[str, Path]:
    """Write (once) seeded, disjoint train / held-out / test JSONL splits of BBC News
    (``sizes``: articles per split, default :data:`SPLIT_SIZES`)."""
    sizes = sizes or SPLIT_SIZES
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


def demo_recipes(n: int) -> list[dict]:
    """The first ``n`` recipes of the demo: :data:`DEMO_RECIPES`, then the rest of RECIPES."""
    rest = [r for r in RECIPES if r not in DEMO_RECIPES]
    return (DEMO_RECIPES + rest)[:n]


def _short_number(x: float) -> str:
    """3e-05 -> 3e-5, 0.0001 -> 1e-4, 1.5e-4 -> 1.5e-4, 0.01 -> 0.01."""
    text = f"{x:.3g}" if not (1e-3 <= abs(x) < 1e3) else f"{x:g}"
    if "e" not in text and x and abs(x) < 1e-3:
        text = f"{x:.2e}"
    mantissa, _, exponent = text.partition("e")
    if not exponent:
        return text
    mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
    return f"{mantissa}e{int(exponent)}"


def recipe_name(recipe: dict) -> str:
    """The short name of a recipe, as the demo's tables call its ingredient: lr1.5e-4-ep1."""
    return f"lr{_short_number(recipe['lr'])}-ep{recipe['epochs']:g}"


def recipe_names(recipes: list[dict]) -> list[str]:
    """:func:`recipe_name` of each recipe, with weight decay and seed added where two would
    otherwise share a name."""
    short = [recipe_name(r) for r in recipes]
    return [s if short.count(s) == 1 else
            f"{s}-wd{_short_number(r['weight_decay'])}-s{r['seed']}"
            for s, r in zip(short, recipes)]


def ingredient_folder(cache: Path, recipe: dict, max_length: int = MAX_LENGTH) -> Path:
    name = "minilm-bbc-lr{lr:g}-ep{epochs}-wd{weight_decay:g}-s{seed}".format(**recipe)
    return Path(cache) / "ingredients" / f"len{max_length}" / name


def make_ingredients(cache: Path, recipes: list[dict], *, max_length: int = MAX_LENGTH,
                     batch_size: int = 16, progress: bool = True, device: str = "auto",
                     log: Callable[[str], None] | None = None) -> list[Path]:
    """Fine-tune MiniLM on the BBC train split once per recipe (cached); return the folders.
    Training runs on ``transformers.Trainer`` (:mod:`upcycle.training`) on ``device``.

    ``progress``: progress bars (one per fine-tune, under one for all). ``log(line)``: one
    plain line per ingredient as it is done (for logs, where bars would not do)."""
    splits = bbc_splits(cache)
    todo = [r for r in recipes if cached_record(ingredient_folder(cache, r, max_length), r) is None]
    if todo:
        task = load_task(minilm_path(), splits["train"], max_length=max_length, head_seed=0)
        train_data = task.read(splits["train"], split="train", fix_num_labels=True)
    names = recipe_names(recipes)
    out = []
    bar = tqdm(total=len(recipes), desc="fine-tuning ingredients", disable=not progress,
               dynamic_ncols=True)
    for i, (recipe, name) in enumerate(zip(recipes, names)):
        folder = ingredient_folder(cache, recipe, max_length)
        start = time.perf_counter()
        cached = recipe not in todo
        if not cached:
            bar.set_postfix_str(name)
            config = TrainingConfig(lr=recipe["lr"], epochs=recipe["epochs"],
                                    weight_decay=recipe["weight_decay"], seed=recipe["seed"],
                                    warmup_ratio=0.1, batch_size=batch_size, device=device,
                                    progress=progress, report_to=[])
            finetune(task, train_data, folder, config=config, overwrite=True)
        bar.update(1)
        if log is not None:
            log(f"ingredient {i + 1}/{len(recipes)} {name}: "
                + ("cached" if cached else f"fine-tuned in {time.perf_counter() - start:.0f} s")
                + f" ({folder})")
        out.append(folder)
    bar.close()
    return out
