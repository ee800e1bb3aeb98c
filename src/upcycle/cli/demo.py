"""``upcycle demo``: the embedded default job, end to end on this machine.

Fine-tunes a handful of ingredients from the real MiniLM on BBC News with varied
hyperparameters (cached between runs), soups them with every method, prints the comparison
table (held-out and test accuracy, time and peak memory) and writes everything to --out:
the soups as HuggingFace folders (each with a model card), report.json, README.md and
results.png (test accuracy per method; MEHL-Soup+'s coefficients as a heat-map).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from ..errors import UpcycleError
from ..io.writing import atomic_file, write_json
from ..jobs.bench import format_table
from ..runtime.devices import add_device_arguments
from ..soup.card import method_title, soup_card
from .interrupt import on_interrupt
from .soup import REPORT_COLUMNS

DEMO_METHODS = ("uniform", "greedy", "learned+", "mehl+")
HEADLINE = "mehl+"
DEFAULT_OUT = "demo-out"
INGREDIENT_COLUMNS = [("method", "ingredient", ""), *REPORT_COLUMNS[1:3]]


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


class Steps:
    """The demo's steps: a plain line as each starts and ends, wall and CPU time of each."""

    def __init__(self, total: int):
        self.total, self.done, self.times = total, 0, {}
        self.start_wall, self.start_cpu = time.perf_counter(), cpu_seconds()

    def begin(self, key: str, text: str) -> None:
        self.done += 1
        self._key, self._wall, self._cpu = key, time.perf_counter(), cpu_seconds()
        say(f"{self.done}/{self.total} {text}")

    def end(self, text: str = "") -> None:
        wall, cpu = time.perf_counter() - self._wall, cpu_seconds() - self._cpu
        self.times[self._key] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        say(f"    {text + ' ' if text else ''}({wall:.0f} s)")

    def totals(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.start_wall, 1),
                "cpu_s": round(cpu_seconds() - self.start_cpu, 1)}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def say(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[demo] {line}", file=sys.stdout)  # above any progress bar on the terminal
    sys.stdout.flush()


def bars_wanted(quiet: bool) -> bool:
    """Progress bars only on a terminal: piped to a file, the demo prints plain lines."""
    return not quiet and sys.stderr.isatty()


def folder_name(method: str) -> str:
    return method.replace("+", "-plus")


def command_line(args: argparse.Namespace, n: int, k: int) -> str:
    parts = ["upcycle demo", f"--ingredients {n}", f"-K {k}", f"--epochs {args.epochs}"]
    if args.device != "auto":
        parts.append(f"--device {args.device}")
    return " ".join(parts)


def sentence(row: dict, best: dict, best_name: str) -> str:
    """One sentence: what the headline soup achieved against the best single fine-tune."""
    points = 100 * (row["test_accuracy"] - best["test_accuracy"])
    if abs(points) < 0.05:
        versus = f"matching the best single fine-tune ({best_name})"
    else:
        versus = (f"{abs(points):.1f} points {'above' if points > 0 else 'below'} the best "
                  f"single fine-tune ({best_name}, {100 * best['test_accuracy']:.1f}%)")
    return (f"{method_title(row['method'])} reached {100 * row['test_accuracy']:.1f}% test "
            f"accuracy, {versus}, in {row['seconds']:.0f} s and "
            f"{row['peak_rss_mb'] / 1024:.1f} GiB.")


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "report.json").is_file())):
        raise UpcycleError(f"--out {out}: exists and is not a demo output folder (no "
                           f"report.json); the demo replaces what it writes there, so choose "
                           f"a new folder or remove it")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..demo.bbc import (
        MAX_LENGTH,
        RECIPES,
        SPLIT_SIZES,
        bbc_splits,
        default_cache,
        demo_recipes,
        make_ingredients,
        recipe_names,
    )
    from ..jobs.soup import best_ingredient_row, ingredient_rows, prepare_soup_job, run_method
    from ..runtime.devices import resolve_device

    if not 2 <= args.ingredients <= len(RECIPES):
        raise UpcycleError(f"--ingredients {args.ingredients}: expected 2 to {len(RECIPES)}")
    if args.model_batch < 1:
        raise UpcycleError(f"--model-batch {args.model_batch}: expected a positive integer")
    if args.epochs < 1:
        raise UpcycleError(f"--epochs {args.epochs}: expected a positive integer")
    device = resolve_device(args.device)
    out = Path(args.out)
    check_out(out)
    cache = Path(args.cache) if args.cache else default_cache()
    n = args.ingredients
    k = min(args.model_batch, n)
    recipes = demo_recipes(n)
    names = recipe_names(recipes)
    bars = bars_wanted(args.quiet)
    steps = Steps(5)
    command = command_line(args, n, k)

    steps.begin("fine-tune", f"fine-tuning {n} MiniLM ingredients on "
                             f"{SPLIT_SIZES['train']} BBC News articles, {MAX_LENGTH} tokens "
                             f"(on {device}; cached in {cache})")
    on_interrupt(f"fine-tunes finished so far are cached in {cache / 'ingredients'}; run the "
                 f"demo again to go on from them")
    folders = make_ingredients(cache, recipes, max_length=MAX_LENGTH, progress=bars,
                               device=device, log=None if bars else lambda l: say("    " + l))
    on_interrupt(f"the fine-tunes are cached in {folders[0].parent}; run the demo again to "
                 f"soup them without fine-tuning")
    steps.end(f"ingredients in {folders[0].parent}")

    steps.begin("score", f"scoring the ingredients on {SPLIT_SIZES['held_out']} held-out "
                         f"articles")
    splits = bbc_splits(cache)
    job = prepare_soup_job(folders, held_out=splits["held_out"], test=splits["test"],
                           max_length=MAX_LENGTH, batch_size=50, eval_batch_size=100,
                           progress=bars, device=device)
    ing_rows = ingredient_rows(job, names=names, progress=bars)
    best = best_ingredient_row(job, ing_rows)
    best_name = names[best["index"]]
    best["method"] = f"best ingredient ({best_name})"
    rows = [best]
    for r in ing_rows:
        say(f"    {r['method']}: held-out accuracy {100 * r['held_out_accuracy']:.1f}%")
    steps.end(f"best: {best_name}, test accuracy {100 * best['test_accuracy']:.1f}%")

    steps.begin("soup", "souping with " + ", ".join(DEMO_METHODS))
    soups = {}
    bar = tqdm(DEMO_METHODS, desc="soups", disable=not bars, dynamic_ncols=True)
    for method in bar:
        bar.set_postfix_str(method)
        result, row = run_method(job, method, model_batch=k, epochs=args.epochs)
        rows.append(row)
        soups[method] = result
        say(f"    {method_title(method)}: test accuracy {100 * row['test_accuracy']:.1f}% "
            f"({row['seconds']:.0f} s)")
    bar.close()
    steps.end()

    steps.begin("write", f"writing the soups to {out / 'soups'}")
    table_rows = [best] + rows[1:]
    written = {}
    for method, result in soups.items():
        folder = out / "soups" / folder_name(method)
        card = soup_card(result, [r for r in rows if r["method"] in (method, best["method"])],
                         command, names=names)
        result.save(folder, source_dir=job.source_dir, overwrite=True,
                    extra_files={"README.md": card})
        stale = folder / "train.json"  # copied from the first ingredient with its config
        if stale.is_file():
            stale.unlink()
        written[method] = str(folder)
    steps.end()

    steps.begin("figure", f"drawing {out / 'results.png'}")
    figure = draw_figure(out / "results.png", table_rows, best["method"], soups[HEADLINE], names)
    steps.end("" if figure else "skipped: matplotlib is not installed (pip install "
                                "'upcycle[demo]')")

    line = sentence(rows[1 + DEMO_METHODS.index(HEADLINE)], best, best_name)
    totals = steps.totals()
    report = {
        "command": command, "sentence": line, "device": str(device),
        "ingredients": [{"name": name, "recipe": recipe, "folder": str(folder), **row}
                        for name, recipe, folder, row in zip(names, recipes, folders, ing_rows)],
        "rows": table_rows, "soups": written,
        "summaries": {m: soups[m].summary() for m in DEMO_METHODS},
        "settings": {"splits": SPLIT_SIZES, "max_length": MAX_LENGTH, "model_batch": k,
                     "epochs": args.epochs},
        "times": {**steps.times, "total": totals},
        "figure": str(out / "results.png") if figure else None,
    }
    write_json(out / "report.json", json.loads(json.dumps(report, default=str)))
    with atomic_file(out / "README.md") as tmp:
        tmp.write_text(summary_markdown(report, table_rows, ing_rows))

    print()
    print(format_table(ing_rows, INGREDIENT_COLUMNS))
    print()
    print(format_table(table_rows, REPORT_COLUMNS))
    print("\npeak RSS is this process's high-water mark so far (it only grows down the table); "
          "benchmarks/soup_memory.py measures each method in a fresh process.\n")
    say(f"fine-tuned ingredients: {folders[0].parent}/ ({', '.join(f.name for f in folders)})")
    say(f"soups (HF folders with model cards): {out / 'soups'}/"
        f"{{{','.join(folder_name(m) for m in DEMO_METHODS)}}}")
    say(f"report: {out / 'report.json'}, summary: {out / 'README.md'}"
        + (f", figure: {out / 'results.png'}" if figure else ""))
    say(f"done in {totals['wall_s']:.0f} s ({totals['cpu_s']:.0f} s of CPU time)")
    print(line)
    return 0


def draw_figure(path: Path, rows: list[dict], best_method: str, headline, names) -> bool:
    from ..demo.figure import have_matplotlib, results_figure

    if not have_matplotlib():
        return False
    results_figure(path, [{**r, "method": method_title(r["method"])} if "ingredient" not in
                          r["method"] else r for r in rows],
                   best_method=best_method, coefficients=headline.coefficients,
                   ingredient_names=names, blocks=headline.blocks or [],
                   coefficients_title=f"{method_title(headline.method)} coefficients C "
                                      f"(ingredients x blocks)")
    return True


def summary_markdown(report: dict, rows: list[dict], ing_rows: list[dict]) -> str:
    lines = ["# upcycle demo", "", report["sentence"], "", "```bash", report["command"], "```",
             "", "## Ingredients (held-out split)", "", format_table(ing_rows, INGREDIENT_COLUMNS),
             "", "Fine-tuned checkpoints: " + ", ".join(f"`{i['folder']}`"
                                                        for i in report["ingredients"]),
             "", "## Soups", "", format_table(rows, REPORT_COLUMNS), "",
             "Soups (HuggingFace folders, each with its model card): "
             + ", ".join(f"`{v}`" for v in report["soups"].values()), ""]
    if report.get("figure"):
        lines += ["![results](results.png)", ""]
    t = report["times"]["total"]
    lines += [f"Time: {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU.", ""]
    return "\n".join(lines)
