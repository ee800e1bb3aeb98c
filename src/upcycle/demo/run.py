"""The demo job: fine-tune a handful of ingredients from the real MiniLM on BBC News with
varied hyperparameters (cached between runs), soup them with every method, and write the
soups (HuggingFace folders with model cards), report.json, README.md and results.png (test
accuracy per method; MEHL-Soup+'s coefficients as a heat-map) to the output folder.

``upcycle demo`` (and ``make demo``) parse the flags into a :class:`DemoConfig`, call
:func:`run_demo` and print its tables; the soups come from :mod:`upcycle.jobs.soup`, the
fine-tunes from :mod:`upcycle.jobs.finetune`, as for every other user of them.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import UpcycleError
from ..io.outputs import check_not_input
from ..io.writing import atomic_file, write_json
from ..jobs.bench import format_table
from ..jobs.soup import (
    REPORT_COLUMNS,
    best_ingredient_row,
    ingredient_rows,
    prepare_soup_job,
    run_method,
)
from ..runtime.devices import resolve_device
from ..soup.card import method_title, soup_card
from . import bbc
from .figure import have_matplotlib, results_figure

DEMO_METHODS = ("uniform", "greedy", "learned+", "mehl+")
HEADLINE = "mehl+"
DEFAULT_OUT = "demo-out"
INGREDIENT_COLUMNS = [("method", "ingredient", ""), *REPORT_COLUMNS[1:3]]


@dataclass
class DemoConfig:
    out: str | Path = DEFAULT_OUT
    """Folder for the soups, report.json, README.md and results.png (replaced on each run)."""
    cache: str | Path | None = None
    """Cache folder for the data and the fine-tunes (default: $UPCYCLE_CACHE or
    ~/.cache/upcycle)."""
    ingredients: int = 4
    """Number of fine-tunes (2 to 12)."""
    model_batch: int = 2
    """MEHL model batch K (at most the number of ingredients)."""
    epochs: int = 2
    """Held-out epochs of Learned-Soup+ (and per MEHL round)."""
    device: str = "auto"
    progress: bool = False
    """Progress bars (on a terminal); otherwise plain lines."""


@dataclass
class DemoResult:
    report: dict
    rows: list[dict]
    """The comparison table: the best ingredient, then one row per soup method."""
    ingredient_rows: list[dict]
    folders: list[Path]
    figure: bool
    out: Path = field(default_factory=Path)


class Steps:
    """The demo's steps: a plain line as each starts and ends, wall and CPU time of each."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.done, self.times, self.say = total, 0, {}, say
        self.start_wall, self.start_cpu = time.perf_counter(), cpu_seconds()

    def begin(self, key: str, text: str) -> None:
        self.done += 1
        self._key, self._wall, self._cpu = key, time.perf_counter(), cpu_seconds()
        self.say(f"{self.done}/{self.total} {text}")

    def end(self, text: str = "") -> None:
        wall, cpu = time.perf_counter() - self._wall, cpu_seconds() - self._cpu
        self.times[self._key] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        self.say(f"    {text + ' ' if text else ''}({wall:.0f} s)")

    def totals(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.start_wall, 1),
                "cpu_s": round(cpu_seconds() - self.start_cpu, 1)}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def folder_name(method: str) -> str:
    return method.replace("+", "-plus")


def command_line(config: DemoConfig, n: int, k: int) -> str:
    parts = ["upcycle demo", f"--ingredients {n}", f"-K {k}", f"--epochs {config.epochs}"]
    if config.device != "auto":
        parts.append(f"--device {config.device}")
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


def check_out(out: Path, cache: Path | None = None) -> None:
    """``--out``: a new folder or an earlier demo's, and neither the cache (where the
    ingredients are) nor a folder holding it or inside it."""
    if cache is not None:
        check_not_input(out, [("--cache", cache)])
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "report.json").is_file())):
        raise UpcycleError(f"--out {out}: exists and is not a demo output folder (no "
                           f"report.json); the demo replaces what it writes there, so choose "
                           f"a new folder or remove it")


def check_config(config: DemoConfig) -> None:
    if not 2 <= config.ingredients <= len(bbc.RECIPES):
        raise UpcycleError(f"--ingredients {config.ingredients}: expected 2 to "
                           f"{len(bbc.RECIPES)}")
    if config.model_batch < 1:
        raise UpcycleError(f"--model-batch {config.model_batch}: expected a positive integer")
    if config.epochs < 1:
        raise UpcycleError(f"--epochs {config.epochs}: expected a positive integer")


def _nothing(_: str | None) -> None:
    pass


def run_demo(config: DemoConfig, *, say: Callable[[str], None] = _nothing,
             on_interrupt: Callable[[str | None], None] = _nothing) -> DemoResult:
    """Run the demo end to end; ``say`` gets its progress lines, ``on_interrupt`` what Ctrl-C
    should tell the user as the run goes on."""
    check_config(config)
    device = resolve_device(config.device)
    out = Path(config.out)
    cache = Path(config.cache) if config.cache else bbc.default_cache()
    check_out(out, cache)
    n = config.ingredients
    k = min(config.model_batch, n)
    recipes = bbc.demo_recipes(n)
    names = bbc.recipe_names(recipes)
    bars = config.progress
    steps = Steps(5, say)
    command = command_line(config, n, k)

    steps.begin("fine-tune", f"fine-tuning {n} MiniLM ingredients on "
                             f"{bbc.SPLIT_SIZES['train']} BBC News articles, "
                             f"{bbc.MAX_LENGTH} tokens (on {device}; cached in {cache})")
    on_interrupt(f"fine-tunes finished so far are cached in {cache / 'ingredients'}; run the "
                 f"demo again to go on from them")
    folders = bbc.make_ingredients(cache, recipes, max_length=bbc.MAX_LENGTH, progress=bars,
                                   device=device,
                                   log=None if bars else lambda line: say("    " + line))
    on_interrupt(f"the fine-tunes are cached in {folders[0].parent}; run the demo again to "
                 f"soup them without fine-tuning")
    steps.end(f"ingredients in {folders[0].parent}")

    steps.begin("score", f"scoring the ingredients on {bbc.SPLIT_SIZES['held_out']} held-out "
                         f"articles")
    splits = bbc.bbc_splits(cache)
    job = prepare_soup_job(folders, held_out=splits["held_out"], test=splits["test"],
                           max_length=bbc.MAX_LENGTH, batch_size=25, eval_batch_size=100,
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
        result, row = run_method(job, method, model_batch=k, epochs=config.epochs)
        rows.append(row)
        soups[method] = result
        say(f"    {method_title(method)}: test accuracy {100 * row['test_accuracy']:.1f}% "
            f"({row['seconds']:.0f} s)")
    bar.close()
    steps.end()

    steps.begin("write", f"writing the soups to {out / 'soups'}")
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
    figure = draw_figure(out / "results.png", rows, best["method"], soups[HEADLINE], names)
    steps.end("" if figure else "skipped: matplotlib is not installed (pip install "
                                "'upcycle[demo]')")

    totals = steps.totals()
    report = {
        "command": command, "sentence": sentence(rows[1 + DEMO_METHODS.index(HEADLINE)], best,
                                                 best_name),
        "device": str(device),
        "ingredients": [{"name": name, "recipe": recipe, "folder": str(folder), **row}
                        for name, recipe, folder, row in zip(names, recipes, folders, ing_rows)],
        "rows": rows, "soups": written,
        "summaries": {m: soups[m].summary() for m in DEMO_METHODS},
        "settings": {"splits": bbc.SPLIT_SIZES, "max_length": bbc.MAX_LENGTH, "model_batch": k,
                     "epochs": config.epochs},
        "times": {**steps.times, "total": totals},
        "figure": str(out / "results.png") if figure else None,
    }
    write_json(out / "report.json", json.loads(json.dumps(report, default=str)))
    with atomic_file(out / "README.md") as tmp:
        tmp.write_text(summary_markdown(report, rows, ing_rows))
    return DemoResult(report, rows, ing_rows, folders, figure, out)


def draw_figure(path: Path, rows: list[dict], best_method: str, headline, names) -> bool:
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
