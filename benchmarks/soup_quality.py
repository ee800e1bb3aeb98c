"""Soup quality on real fine-tunes: best ingredient, uniform, greedy, learned+, MEHL+.

    .venv/bin/python benchmarks/soup_quality.py              # 12 ingredients
    .venv/bin/python benchmarks/soup_quality.py --n 6        # fewer, faster

Ingredients: all-MiniLM-L6-v2 fully fine-tuned on 300 BBC News articles (first 64 tokens)
with 12 recipes varying learning rate, epochs, weight decay and seed
(upcycle.demo.bbc.RECIPES; cached in $UPCYCLE_CACHE, shared with `upcycle demo`). Soups are
fitted on a 200-article held-out split and reported on a disjoint 400-article test split,
with bootstrap 95% intervals (1000 resamples of the test set). Each method runs in a fresh
subprocess.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from upcycle.jobs.bench import main  # noqa: E402

EPOCHS = 2
K = 4


def _correct(job, state) -> list[int]:
    """Per-example correctness on the test split (for the bootstrap)."""
    import torch

    from upcycle.soup.common import load_state
    from upcycle.tasks.classification import logits_of

    model = job.model()
    load_state(model, state)
    model.eval()
    out = []
    with torch.no_grad():
        for batch in job.batches("test"):
            out += (logits_of(model, batch).argmax(-1) == batch["labels"]).int().tolist()
    return out


def run_worker(spec: dict) -> dict:
    import torch

    from upcycle.demo.bbc import MAX_LENGTH, RECIPES, bbc_splits, default_cache, make_ingredients
    from upcycle.jobs.soup import best_ingredient_row, ingredient_rows, prepare_soup_job, run_method

    torch.manual_seed(0)
    cache = default_cache()
    folders = make_ingredients(cache, RECIPES[: spec["n"]], progress=False)
    splits = bbc_splits(cache)
    job = prepare_soup_job(folders, held_out=splits["held_out"], test=splits["test"],
                           max_length=MAX_LENGTH, batch_size=50, eval_batch_size=100,
                           progress=False)
    if spec["method"] == "best ingredient":
        best = best_ingredient_row(job, ingredient_rows(job))
        index = best["index"]
        state = job.ingredients[index].state_dict()
        row = {k: best[k] for k in ("held_out_accuracy", "test_accuracy")}
        row["picked"] = str(job.ingredients[index].path.name)
    else:
        result, row = run_method(job, spec["method"], model_batch=K, epochs=EPOCHS)
        state = result.state
        row = {k: row[k] for k in ("held_out_accuracy", "test_accuracy", "seconds")}
        if result.method == "greedy":
            row["picked"] = f"{len(result.info['accepted'])} of {spec['n']}"
    row["test_correct"] = _correct(job, state)
    return row


def contenders(args) -> list[dict]:
    from upcycle.demo.bbc import RECIPES, default_cache, make_ingredients

    make_ingredients(default_cache(), RECIPES[: args.n])  # once, in the parent, cached
    return [{"name": m, "method": m, "n": args.n}
            for m in ("best ingredient", "uniform", "greedy", "learned+", "mehl+")]


def summarize(rows: list[dict]) -> str:
    import numpy as np

    rng = np.random.default_rng(0)
    lines = ["", "| method | test acc | bootstrap 95% CI |", "|---|---|---|"]
    for r in rows:
        if "test_correct" not in r:
            continue
        c = np.asarray(r["test_correct"], dtype=float)
        boot = c[rng.integers(0, len(c), size=(1000, len(c)))].mean(axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        r["ci95"] = [float(lo), float(hi)]
        lines.append(f"| {r['name']} | {c.mean():.4f} | [{lo:.4f}, {hi:.4f}] |")
        r.pop("test_correct")
    return "\n".join(lines)


if __name__ == "__main__":
    main(
        Path(__file__).resolve(), contenders, run_worker,
        columns=[("name", "method", ""), ("held_out_accuracy", "held-out acc", ".4f"),
                 ("test_accuracy", "test acc", ".4f"), ("seconds", "soup time (s)", ".1f"),
                 ("peak_rss_mb", "peak RSS (MiB)", ".0f"), ("picked", "picked", "")],
        description=__doc__,
        out_json=Path(__file__).resolve().parent / "results" / "soup_quality.json",
        add_arguments=lambda p: p.add_argument("--n", type=int, default=12),
        summarize=summarize,
    )
    sys.exit(0)
