"""Soups of language-model fine-tunes (full and LoRA) on real text: perplexity, time, memory.

    .venv/bin/python benchmarks/lm_soup.py --quick     # small sizes (minutes on a CPU)
    .venv/bin/python benchmarks/lm_soup.py             # ~2.6M-parameter base, 10 ingredients

A byte-level BPE tokenizer and a small Llama-style base (tied embeddings) are trained on BBC
News articles, then N ingredients are fine-tuned from it with transformers.Trainer: full
fine-tunes and peft LoRA adapters (r=8 on every projection), each on a topic-skewed mix of a
separate article pool with its own learning rate and seed (benchmarks/lm_setup.py; cached with
the recipe recorded, so a rerun skips them). Contenders, each in a fresh subprocess:
the base, the best single ingredient (picked on held-out), uniform, greedy, task arithmetic
(base + lambda * sum_i (theta_i - base), lambda picked on held-out from a grid), learned+ and
MEHL+ (fitted on the held-out articles with the causal-LM token loss). LoRA adapters enter
every soup as base + scale * B @ A, formed one tensor at a time (upcycle.io.lora).
Reported: held-out and test perplexity (test articles disjoint from everything else), a
bootstrap 95% interval of the test perplexity (1000 resamples of test blocks), the soup's
time and the process's peak RSS.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from upcycle.jobs.bench import main  # noqa: E402

LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
METHODS = ("base", "best ingredient", "uniform", "greedy", "task arithmetic", "learned+", "mehl+")


def _rows(model, batches) -> tuple[list[float], list[int]]:
    """Summed token loss and target-token count of every test block (for the bootstrap)."""
    import torch
    import torch.nn.functional as F

    losses, counts = [], []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            tok = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                  reduction="none")
            losses += tok.sum(1).tolist()
            counts += (targets != -100).sum(1).tolist()
    return losses, counts


def _task_arithmetic(base, ingredients, score):
    """base + lambda * sum_i (theta_i - base) = base + lambda * N * (mean - base), lambda from
    LAMBDAS by held-out ``score`` (higher is better); streamed one tensor at a time."""
    import torch

    from upcycle.soup import uniform_soup

    mean = uniform_soup(ingredients).state
    n = len(ingredients)
    tried = []
    best = None
    for lam in LAMBDAS:
        state = {}
        for name, m in mean.items():
            b = base.get(name)
            if b.is_floating_point():
                state[name] = (b.double() + lam * n * (m.double() - b.double())).to(b.dtype)
            else:
                state[name] = b
        s = score(state)
        tried.append({"lambda": lam, "held_out_loss": -s})
        if best is None or s > best[0]:
            best = (s, lam, state)
        del state
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return best[2], {"lambda": best[1], "grid": tried}


def run_worker(spec: dict) -> dict:
    import math

    import torch

    from upcycle.io import Ingredient
    from upcycle.io.ingredients import open_ingredients
    from upcycle.soup import (
        LearnedConfig,
        MehlConfig,
        greedy_soup,
        learned_soup,
        mehl_soup,
        uniform_soup,
    )
    from upcycle.soup.common import load_state
    from upcycle.tasks.causal_lm import CausalLMTask, causal_lm_loss, evaluate

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    paths = spec["paths"]
    task = CausalLMTask(paths["base"], max_length=spec["seq"])
    held = task.batches(task.read(paths["held_out"], split="held-out"), spec["batch"])
    test = task.batches(task.read(paths["test"], split="test"), spec["batch"])
    model = task.load_model()

    def held_loss(state) -> float:
        load_state(model, state)
        return evaluate(model, held)["loss"]

    method = spec["method"]
    row: dict = {}
    start = time.perf_counter()
    if method == "base":
        state = Ingredient(paths["base"]).state_dict()
    else:
        ings = open_ingredients(paths["ingredients"], base=paths["base"])
        if method == "best ingredient":
            losses = [held_loss(ing.state_dict()) for ing in ings]
            best = min(range(len(ings)), key=losses.__getitem__)
            state = ings[best].state_dict()
            row["picked"] = ings[best].path.name
        elif method == "uniform":
            state = uniform_soup(ings).state
        elif method == "greedy":
            result = greedy_soup(ings, lambda s: -held_loss(s))
            state = result.state
            row["picked"] = f"{len(result.info['accepted'])} of {len(ings)}"
        elif method == "task arithmetic":
            state, info = _task_arithmetic(Ingredient(paths["base"]), ings,
                                           lambda s: -held_loss(s))
            row["picked"] = f"lambda={info['lambda']}"
            row["grid"] = info["grid"]
        elif method == "learned+":
            state = learned_soup(ings, model, held, loss_fn=causal_lm_loss,
                                 config=LearnedConfig(epochs=spec["epochs"])).state
        elif method == "mehl+":
            state = mehl_soup(ings, model, held, loss_fn=causal_lm_loss,
                              config=MehlConfig(model_batch=min(spec["K"], len(ings)),
                                                epochs=spec["epochs"])).state
        else:
            raise ValueError(method)
    row["seconds"] = time.perf_counter() - start
    load_state(model, state)
    h = evaluate(model, held)
    t = evaluate(model, test)
    row.update({"held_out_ppl": h["perplexity"], "test_ppl": t["perplexity"],
                "test_loss": t["loss"], "test_tokens": t["tokens"]})
    row["test_block_loss"], row["test_block_tokens"] = _rows(model, test)
    assert math.isclose(sum(row["test_block_loss"]) / sum(row["test_block_tokens"]), t["loss"],
                        rel_tol=1e-4)
    return row


def sizes_of(args):
    """The sizes a run uses: the preset (``--quick``: lm_setup.QUICK) with the ``--<size>``
    overrides of :func:`add_size_arguments`."""
    from lm_setup import QUICK, Sizes

    sizes = QUICK if args.quick else Sizes()
    over = {f.name: getattr(args, f.name) for f in fields(Sizes)
            if getattr(args, f.name) is not None}
    return Sizes(**{**asdict(sizes), **over})


def cache_name(args, stem: str = "lm_soup") -> str:
    """``lm_soup[-<family>][-quick]``: the folder under the cache root (no family part for
    llama, as before there were families); with ``stem``, a results file's name."""
    family = getattr(args, "family", None) or "llama"
    return stem + ("" if family == "llama" else f"-{family}") + ("-quick" if args.quick else "")


def default_out(stem: str) -> Path:
    """results/<stem>[-<family>][-quick].json for this command line's ``--family``/``--quick``."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--quick", action="store_true")
    pre.add_argument("--family", default=None)
    args, _ = pre.parse_known_args()
    return Path(__file__).resolve().parent / "results" / f"{cache_name(args, stem)}.json"


def contenders(args) -> list[dict]:
    from lm_setup import prepare

    sizes = sizes_of(args)
    cache = Path(args.cache or Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" /
                                                   "upcycle")) / cache_name(args))
    paths = prepare(cache, sizes, log=lambda m: print(m, file=sys.stderr, flush=True))
    common = {"paths": paths, "seq": sizes.seq, "batch": sizes.batch, "K": args.K,
              "epochs": args.epochs, "threads": int(os.environ.get("UPCYCLE_THREADS", "1")),
              "n": sizes.n}
    return [{"name": m, "method": m, **common} for m in METHODS]


def summarize(rows: list[dict]) -> str:
    """Bootstrap over test blocks (1000 resamples, the same resamples for every method): each
    method's test perplexity interval, and the paired interval of its difference to the best
    single ingredient (negative: the soup is better)."""
    import numpy as np

    rows_with = [r for r in rows if "test_block_loss" in r]
    for r in rows:
        r.pop("paths", None)
    if not rows_with:
        return ""
    n_blocks = len(rows_with[0]["test_block_loss"])
    idx = np.random.default_rng(0).integers(0, n_blocks, size=(1000, n_blocks))
    boots = {}
    for r in rows_with:
        loss = np.asarray(r.pop("test_block_loss"))
        tok = np.asarray(r.pop("test_block_tokens"), dtype=float)
        boots[r["name"]] = np.exp(loss[idx].sum(1) / tok[idx].sum(1))
    ref = boots.get("best ingredient")
    lines = ["", "| method | test ppl | bootstrap 95% CI | vs best ingredient (paired 95% CI) |",
             "|---|---|---|---|"]
    for r in rows_with:
        boot = boots[r["name"]]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        r["test_ppl_ci95"] = [float(lo), float(hi)]
        cell = "–"
        if ref is not None and r["name"] != "best ingredient":
            d = boot - ref
            dlo, dhi = np.percentile(d, [2.5, 97.5])
            r["vs_best_ingredient_ci95"] = [float(dlo), float(dhi)]
            cell = f"[{dlo:+.3f}, {dhi:+.3f}]"
        lines.append(f"| {r['name']} | {r['test_ppl']:.3f} | [{lo:.3f}, {hi:.3f}] | {cell} |")
    return "\n".join(lines)


def _arguments(parser) -> None:

    parser.add_argument("--quick", action="store_true", help="small sizes (lm_setup.QUICK)")
    parser.add_argument("--cache", default=None, help="where the base and ingredients are "
                        "cached (default $UPCYCLE_CACHE/lm_soup[-<family>][-quick]); one "
                        "folder per family and size: another recipe retrains it there")
    parser.add_argument("--K", type=int, default=5, help="MEHL's model batch")
    parser.add_argument("--epochs", type=int, default=3, help="learned+/MEHL+ epochs")
    add_size_arguments(parser)


def add_size_arguments(parser) -> None:
    """One ``--<size>`` flag per field of lm_setup.Sizes (default: the preset's)."""
    from lm_setup import Sizes

    for f in fields(Sizes):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default),
                            default=None, help=f"override the size {f.name}")


SOUP_COLUMNS = [("name", "method", ""), ("held_out_ppl", "held-out ppl", ".3f"),
                ("test_ppl", "test ppl", ".3f"), ("seconds", "soup time (s)", ".1f"),
                ("peak_rss_mb", "peak RSS (MiB)", ".0f"), ("picked", "picked", "")]
"""The table's columns (merge_quality.py's too)."""


if __name__ == "__main__":
    main(
        Path(__file__).resolve(), contenders, run_worker,
        columns=SOUP_COLUMNS,
        description=__doc__,
        out_json=default_out("lm_soup"),
        add_arguments=_arguments,
        summarize=summarize,
    )
    sys.exit(0)
