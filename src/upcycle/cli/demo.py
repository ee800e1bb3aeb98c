"""``upcycle demo``: the embedded default job, end to end on this machine.

Fine-tunes a handful of ingredients from the real MiniLM on BBC News with varied
hyperparameters (cached between runs), soups them with every method, prints the comparison
table (held-out and test accuracy, time and peak memory) and writes everything to --out:
the soups as HuggingFace folders (each with a model card), report.json, README.md and
results.png (test accuracy per method; MEHL-Soup+'s coefficients as a heat-map).
"""

from __future__ import annotations

import argparse
import sys

from tqdm.auto import tqdm

from ..demo.run import (
    DEFAULT_OUT,
    DEMO_METHODS,
    INGREDIENT_COLUMNS,
    DemoConfig,
    folder_name,
    run_demo,
)
from ..jobs.bench import format_table
from ..jobs.soup import REPORT_COLUMNS
from ..runtime.devices import add_device_arguments
from .interrupt import on_interrupt


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fine-tune MiniLM on BBC News a few times and soup the runs",
                       description=__doc__)
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="folder for the soups, report.json, README.md and results.png "
                        "(replaced on each run)")
    p.add_argument("--cache", default=None, metavar="DIR", help="cache folder for the data and the fine-tunes "
                                                 "(default: $UPCYCLE_CACHE or ~/.cache/upcycle)")
    p.add_argument("--ingredients", type=int, default=4, metavar="N", help="number of fine-tunes (2 to 12)")
    p.add_argument("--model-batch", "-K", type=int, default=2, metavar="K",
                   help="MEHL model batch K (at most the number of ingredients)")
    p.add_argument("--epochs", type=int, default=2, metavar="E",
                   help="held-out epochs of Learned-Soup+ (and per MEHL round)")
    add_device_arguments(p, dtype=False, mixed_precision=False)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def say(line: str) -> None:
    tqdm.write(f"[demo] {line}", file=sys.stdout)  # above any progress bar on the terminal
    sys.stdout.flush()


def bars_wanted(quiet: bool) -> bool:
    """Progress bars only on a terminal: piped to a file, the demo prints plain lines."""
    return not quiet and sys.stderr.isatty()


def run(args: argparse.Namespace) -> int:
    config = DemoConfig(out=args.out, cache=args.cache, ingredients=args.ingredients,
                        model_batch=args.model_batch, epochs=args.epochs, device=args.device,
                        progress=bars_wanted(args.quiet))
    done = run_demo(config, say=say, on_interrupt=on_interrupt)
    out, report = done.out, done.report
    print()
    print(format_table(done.ingredient_rows, INGREDIENT_COLUMNS))
    print()
    print(format_table(done.rows, REPORT_COLUMNS))
    print("\npeak RSS is this process's high-water mark so far (it only grows down the table); "
          "benchmarks/soup_memory.py measures each method in a fresh process.\n")
    folders = done.folders
    say(f"fine-tuned ingredients: {folders[0].parent}/ ({', '.join(f.name for f in folders)})")
    say(f"soups (HF folders with model cards): {out / 'soups'}/"
        f"{{{','.join(folder_name(m) for m in DEMO_METHODS)}}}")
    say(f"report: {out / 'report.json'}, summary: {out / 'README.md'}"
        + (f", figure: {out / 'results.png'}" if done.figure else ""))
    total = report["times"]["total"]
    say(f"done in {total['wall_s']:.0f} s ({total['cpu_s']:.0f} s of CPU time)")
    print(report["sentence"])
    return 0
