"""``upcycle demo``: the embedded default job, end to end on this machine.

Fine-tunes a handful of ingredients from the real MiniLM on BBC News with varied
hyperparameters (cached between runs), then soups them with every method and prints the
comparison table: held-out and test accuracy, time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..bench import format_table
from ..checkpoints import write_json
from .soup import REPORT_COLUMNS

DEMO_METHODS = ("uniform", "greedy", "learned+", "mehl+")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fine-tune MiniLM on BBC News a few times and soup the runs",
                       description=__doc__)
    p.add_argument("--cache", default=None, help="cache folder (default: $UPCYCLE_CACHE or "
                                                 "~/.cache/upcycle)")
    p.add_argument("--ingredients", type=int, default=4, help="number of fine-tunes (max 12)")
    p.add_argument("--model-batch", "-K", type=int, default=2, help="MEHL model batch K")
    p.add_argument("--epochs", type=int, default=2, help="held-out epochs (per MEHL round)")
    p.add_argument("--out", default=None, help="also write the MEHL-Soup+ soup here (HF folder)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tasks.bbc import MAX_LENGTH, RECIPES, bbc_splits, default_cache, make_ingredients
    from ..tasks.soup_job import best_ingredient_row, ingredient_rows, prepare_soup_job, run_method

    cache = Path(args.cache) if args.cache else default_cache()
    n = max(2, min(args.ingredients, len(RECIPES)))
    progress = not args.quiet
    start = time.perf_counter()
    print(f"[demo] cache: {cache}")
    print(f"[demo] 1/3 fine-tuning {n} MiniLM ingredients on BBC News (cached after the first run)")
    folders = make_ingredients(cache, RECIPES[:n], progress=progress)
    splits = bbc_splits(cache)
    print("[demo] 2/3 scoring the ingredients on the held-out split")
    job = prepare_soup_job(folders, held_out=splits["held_out"], test=splits["test"],
                           max_length=MAX_LENGTH, batch_size=50, eval_batch_size=100,
                           progress=progress)
    ing_rows = ingredient_rows(job)
    rows = [best_ingredient_row(job, ing_rows)]
    print("[demo] 3/3 souping with " + ", ".join(DEMO_METHODS))
    soups = {}
    for method in DEMO_METHODS:
        result, row = run_method(job, method, model_batch=min(args.model_batch, n),
                                 epochs=args.epochs)
        rows.append(row)
        soups[method] = result
    print()
    print(format_table(ing_rows, REPORT_COLUMNS[:4]))
    print()
    print(format_table(rows, REPORT_COLUMNS))
    print("\npeak RSS is this process's high-water mark so far (it only grows down the table); "
          "benchmarks/soup_memory.py measures each method in a fresh process.")
    report_path = cache / "demo-report.json"
    write_json(report_path, json.loads(json.dumps(
        {"rows": rows, "ingredients": ing_rows,
         "mehl+": soups["mehl+"].summary()}, default=str)))
    if args.out:
        soups["mehl+"].save(args.out, source_dir=job.source_dir, overwrite=True)
        print(f"[demo] MEHL-Soup+ written to {args.out}")
    print(f"[demo] report: {report_path}  ({time.perf_counter() - start:.0f} s)")
    return 0
