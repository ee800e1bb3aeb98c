"""Every merge, greedy, learned+ and MEHL+ on the LM fine-tunes of lm_soup.py: which start
(``--init``) a learned soup should take, and whether learning beats the fixed-weight merges.

    .venv/bin/python benchmarks/merge_quality.py --quick     # small sizes (minutes on a CPU)
    .venv/bin/python benchmarks/merge_quality.py             # lm_soup's full sizes
    .venv/bin/python benchmarks/merge_quality.py --quick --family qwen2   # the second family

The base and the N ingredients (full fine-tunes and peft LoRA adapters of a small model on
topic-skewed BBC News mixes) are lm_soup's (benchmarks/lm_setup.py, same cache): ``--family
llama`` (default) or ``qwen2`` (grouped-query attention, q/k/v biases; its LoRA adapters also
train the tied embedding/head, as a LoRA on it or saved whole, through peft's
``ensure_weight_tying``). Results go to results/merge_quality[-qwen2][-quick].json.
Contenders, each in a fresh process through the soup job (:func:`upcycle.jobs.soup.run_method`,
the code ``upcycle soup`` runs): the base, the best ingredient (on held-out), every fixed-weight
merge (uniform, linear with weights softmax(-held-out loss / 0.01), task arithmetic, TIES,
DARE linear/TIES, SLERP of the two best ingredients, Model Stock; lambda and density picked on
held-out from a small grid, the grid's time included), greedy over the ingredients and over
ingredients + merges, learned+ and MEHL+ from several starts (``--init``). Reported: held-out
and test perplexity, a bootstrap 95% interval of test perplexity (1000 resamples of test
blocks, paired against the best ingredient), soup time and the process's peak RSS.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from upcycle.jobs.bench import main  # noqa: E402

GRIDS = {
    "task-arithmetic": {"lambda_": (0.3, 0.5, 1.0)},
    "ties": {"density": (0.5,), "lambda_": (0.5, 1.0)},
    "dare-linear": {"density": (0.5,), "lambda_": (0.5, 1.0)},
    "dare-ties": {"density": (0.5,), "lambda_": (0.5, 1.0)},
}
"""Settings picked on held-out for each merge (the others use their defaults)."""
MERGES = ("uniform", "linear", "task-arithmetic", "ties", "dare-linear", "dare-ties", "slerp",
          "model-stock")
INITS = ("uniform", "task-arithmetic", "ties", "model-stock")
"""The starts the learned soups are run from (MEHL+ from each; learned+ from uniform and the
start whose merge is best on held-out)."""


def _job(paths: dict, spec: dict, ingredients=None):
    from upcycle.jobs.soup import prepare_soup_job

    return prepare_soup_job(ingredients or paths["ingredients"], held_out=paths["held_out"],
                            test=paths["test"], base=paths["base"], need_base=True,
                            max_length=spec["seq"], batch_size=spec["batch"], progress=False,
                            device="cpu", task="causal-lm")


def _pick(job, method: str, fixed: dict | None = None) -> tuple[dict, float, list]:
    """The merge's settings from :data:`GRIDS` with the lowest held-out loss (and the time the
    grid took, and what was tried)."""
    from upcycle.jobs.soup import run_method

    grid = GRIDS.get(method, {})
    tried, best, seconds = [], None, 0.0
    for values in itertools.product(*grid.values()) if grid else [()]:
        settings = {**(fixed or {}), **dict(zip(grid, values))}
        result, row = run_method(job, method, **settings)
        seconds += row["seconds"]
        tried.append({**settings, "held_out_loss": row["held_out_loss"]})
        if best is None or row["held_out_loss"] < best[1]:
            best = (settings, row["held_out_loss"])
    return best[0], seconds, tried


def _linear_weights(job) -> list[float]:
    losses = [m["loss"] for m in job.ingredient_metrics]
    low = min(losses)
    w = [math.exp(-(x - low) / 0.01) for x in losses]
    return [x / sum(w) for x in w]


def run_worker(spec: dict) -> dict:
    import torch
    from lm_soup import _rows

    from upcycle.jobs.soup import best_ingredient_row, ingredient_rows, run_method
    from upcycle.soup.common import load_state

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    paths = spec["paths"]
    kind, method = spec["kind"], spec["method"]
    job = _job(paths, spec)
    out: dict = {}
    start = time.perf_counter()
    settings = dict(spec.get("settings", {}))
    uses_scores = kind == "best" or method in ("linear", "slerp", "greedy") or \
        settings.get("init") in ("linear", "slerp")
    if uses_scores:  # each ingredient's held-out loss (greedy starts from them)
        ing_rows = ingredient_rows(job)
    if kind == "base":
        from upcycle.io import Ingredient

        state = Ingredient(paths["base"]).state_dict()
        row = {}
    elif kind == "best":
        row = best_ingredient_row(job, ing_rows)
        state = job.ingredients[row["index"]].state_dict()
        out["picked"] = job.ingredients[row["index"]].path.name
    else:
        if method == "linear" or settings.get("init") == "linear":
            settings["weights"] = _linear_weights(job)
        if method == "slerp" or settings.get("init") == "slerp":
            top = sorted(range(len(ing_rows)), key=lambda i: ing_rows[i]["held_out_loss"])[:2]
            job = _job(paths, spec, [paths["ingredients"][i] for i in sorted(top)])
            out["picked"] = "+".join(Path(paths["ingredients"][i]).name for i in sorted(top))
        grid_seconds = 0.0
        if kind == "merge":
            best, grid_seconds, out["grid"] = _pick(job, method, settings)
            settings = best
        elif settings.get("init") not in (None, "uniform"):
            best, grid_seconds, out["grid"] = _pick(job, settings["init"])
            settings = {**best, **settings}
        result, row = run_method(job, method, **settings)
        row["seconds"] += grid_seconds
        state = result.state
        shown = {k: v for k, v in settings.items() if k in ("lambda_", "density", "candidates")}
        if shown:
            out["picked"] = ", ".join(f"{k.rstrip('_')}={v}" for k, v in shown.items())
        kept = result.info.get("keep_best")
        if kept is not None:
            out["keep_best"] = kept
            if not kept["improved"]:
                out["picked"] = (out.get("picked", "") + " start kept").strip()
        if "accepted" in result.info:
            out["picked"] = f"{len(result.info['accepted'])} of {len(result.ingredients)}"
    seconds = time.perf_counter() - start if kind == "best" else row.get("seconds", 0.0)
    model = job.model()
    load_state(model, state)
    held = job.task.evaluate(model, job.batches("held_out"))
    test = job.task.evaluate(model, job.batches("test"))
    out.update({"seconds": seconds, "held_out_ppl": held["perplexity"],
                "test_ppl": test["perplexity"], "test_loss": test["loss"]})
    out["test_block_loss"], out["test_block_tokens"] = _rows(model, job.batches("test"))
    assert math.isclose(sum(out["test_block_loss"]) / sum(out["test_block_tokens"]),
                        test["loss"], rel_tol=1e-4)
    return out


def contenders(args) -> list[dict]:
    import lm_soup

    sizes = lm_soup.sizes_of(args)
    common = {k: v for k, v in lm_soup.contenders(args)[0].items()  # lm_soup's cache and sizes
              if k in ("paths", "seq", "batch", "threads")}
    fit = {"epochs": args.epochs}
    mehl = {**fit, "model_batch": min(args.K, sizes.n)}
    inits = args.inits.split(",")
    out = [{"name": "base", "kind": "base", "method": "base"},
           {"name": "best ingredient", "kind": "best", "method": "best"}]
    out += [{"name": m, "kind": "merge", "method": m} for m in args.merges.split(",")]
    out += [{"name": "greedy", "kind": "fit", "method": "greedy"},
            {"name": "greedy (ingredients + merges)", "kind": "fit", "method": "greedy",
             "settings": {"candidates": ["ingredients", *args.greedy_merges.split(",")],
                          "density": 0.5, "lambda_": 0.5}}]
    out += [{"name": f"learned+ (init {i})", "kind": "fit", "method": "learned+",
             "settings": {**fit, "init": i}} for i in args.learned_inits.split(",")]
    out += [{"name": f"mehl+ (init {i})", "kind": "fit", "method": "mehl+",
             "settings": {**mehl, "init": i}} for i in inits]
    return [{**c, **common} for c in out]


def _arguments(parser) -> None:
    from lm_soup import _arguments as lm_arguments

    lm_arguments(parser)
    parser.add_argument("--merges", default=",".join(MERGES),
                        help="the fixed-weight merges to run (comma-separated)")
    parser.add_argument("--inits", default=",".join(INITS),
                        help="the starts MEHL+ is run from (comma-separated)")
    parser.add_argument("--learned-inits", default="uniform,ties",
                        help="the starts learned+ is run from (comma-separated)")
    parser.add_argument("--greedy-merges", default="uniform,task-arithmetic,ties,model-stock",
                        help="the merges greedy may add besides the ingredients")


if __name__ == "__main__":
    from lm_soup import SOUP_COLUMNS, default_out, summarize

    main(
        Path(__file__).resolve(), contenders, run_worker,
        columns=SOUP_COLUMNS,
        description=__doc__,
        out_json=default_out("merge_quality"),
        add_arguments=_arguments,
        summarize=summarize,
    )
    sys.exit(0)
