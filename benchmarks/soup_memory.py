"""Peak memory and time of Learned-Soup+ vs MEHL-Soup+ as the number of ingredients grows.

    .venv/bin/python benchmarks/soup_memory.py            # N in {4, 8, 16, 32}, K = 4
    .venv/bin/python benchmarks/soup_memory.py --quick    # N in {4, 8}

Ingredients: MiniLM-sized BERT classifiers (the real all-MiniLM-L6-v2 plus a 5-class head),
each a perturbed copy (Gaussian noise of 1% of each tensor's std, seeded) saved as
.safetensors in the cache. Held-out: BBC News articles (128 tokens, batch 32). Every
contender runs in a fresh subprocess for the same number of held-out epochs (1 per MEHL
round, 1 for learned+) and reports its peak RSS, the RSS before the soup started (imports,
one model, data) and the time per held-out epoch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from upcycle.bench import main  # noqa: E402

HELD_OUT = 128
BATCH = 32
K = 4


def cache_dir() -> Path:
    from upcycle.tasks.bbc import default_cache

    return default_cache() / "bench-soup-memory"


def make_ingredients(n: int) -> list[Path]:
    """Perturbed copies of MiniLM with a 5-class head, made once and cached."""
    import torch
    from safetensors.torch import save_file

    from upcycle.datasets import minilm_path
    from upcycle.tasks import ClassificationTask

    folder = cache_dir() / "ingredients"
    paths = [folder / f"minilm-perturbed-{i:02d}.safetensors" for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    task = ClassificationTask(minilm_path(), "text", num_labels=5)
    state = task.load_model().state_dict()
    for i, p in enumerate(paths):
        if p.is_file():
            continue
        g = torch.Generator().manual_seed(i)
        noisy = {k: (v + 0.01 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=g))
                 if v.is_floating_point() and v.numel() > 1 else v.clone()
                 for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in noisy.items()}, str(p))
    return paths


def run_worker(spec: dict) -> dict:
    import torch

    from upcycle.checkpoints import open_ingredients
    from upcycle.datasets import minilm_path
    from upcycle.memory import current_rss_mb, peak_rss_mb
    from upcycle.soup import LearnedConfig, MehlConfig, learned_soup, mehl_soup
    from upcycle.tasks import ClassificationTask, LabeledData

    torch.manual_seed(0)
    n = spec["n"]
    paths = [cache_dir() / "ingredients" / f"minilm-perturbed-{i:02d}.safetensors"
             for i in range(n)]
    ingredients = open_ingredients(paths)
    task = ClassificationTask(minilm_path(), "text", num_labels=5)
    model = task.load_model()
    from upcycle.datasets import bbc_news

    texts, labels, _ = bbc_news()
    data = LabeledData(labels=torch.tensor(labels[:: len(labels) // HELD_OUT][:HELD_OUT]),
                       source="bbc", texts=texts[:: len(texts) // HELD_OUT][:HELD_OUT])
    batches = task.batches(data, BATCH)
    rss_before = current_rss_mb()
    start = time.perf_counter()
    if spec["method"] == "learned+":
        learned_soup(ingredients, model, batches, config=LearnedConfig(epochs=1))
        epochs = 1
    else:
        result = mehl_soup(ingredients, model, batches, config=MehlConfig(model_batch=K, epochs=1))
        epochs = len(result.history)
    seconds = time.perf_counter() - start
    return {"rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
            "soup_peak_mb": peak_rss_mb() - rss_before, "seconds": seconds,
            "held_out_epochs": epochs, "s_per_epoch": seconds / epochs}


def contenders(args) -> list[dict]:
    sizes = [4, 8] if args.quick else [4, 8, 16, 32]
    make_ingredients(max(sizes))
    out = []
    for n in sizes:
        out.append({"name": f"learned+ N={n}", "method": "learned+", "n": n})
        out.append({"name": f"mehl+ N={n} K={K}", "method": "mehl+", "n": n})
    return out


def summarize(rows: list[dict]) -> str:
    by = {(r["method"], r["n"]): r for r in rows if "error" not in r}
    lines = []
    for n in sorted({r["n"] for r in rows}):
        a, b = by.get(("learned+", n)), by.get(("mehl+", n))
        if a and b:
            lines.append(f"N={n}: learned+ / mehl+ peak RSS = {a['peak_rss_mb'] / b['peak_rss_mb']:.1f}x"
                         f" (above start: {a['soup_peak_mb'] / max(1, b['soup_peak_mb']):.1f}x), "
                         f"time per held-out epoch {a['s_per_epoch']:.1f} s vs "
                         f"{b['s_per_epoch']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main(
        Path(__file__).resolve(), contenders, run_worker,
        columns=[("name", "contender", ""), ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
                 ("soup_peak_mb", "peak above start (MiB)", ".0f"),
                 ("s_per_epoch", "s / held-out epoch", ".1f"),
                 ("held_out_epochs", "held-out epochs", "d"), ("seconds", "total (s)", ".1f")],
        description=__doc__,
        out_json=Path(__file__).resolve().parent / "results" / "soup_memory.json",
        add_arguments=lambda p: p.add_argument("--quick", action="store_true"),
        summarize=summarize,
    )
    sys.exit(0)
