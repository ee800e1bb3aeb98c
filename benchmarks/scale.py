"""The verbs on a model of the size their users run: a Llama-shaped model of >= 1B parameters
in bf16 on this CPU, every contender in a fresh process, one table per section.

    .venv/bin/python benchmarks/scale.py                    # every section, full size
    .venv/bin/python benchmarks/scale.py --section lemon    # LEMON only
    .venv/bin/python benchmarks/scale.py --size mid         # 0.3B: in memory runs too
    .venv/bin/python benchmarks/scale.py --quick            # tiny model (seconds; the test)

Sections (:data:`SECTIONS`; a section is a source model, named contenders and a table):

* ``lemon``: ``upcycle grow`` (:func:`upcycle.jobs.grow.run_grow`, lossless check included)
  growing the source to >= 1.5x its parameters, streamed (the default) vs in memory
  (``--in-memory``). Each contender is a fresh process: its peak RSS (VmHWM) and wall time.
  The in-memory contender is started only when its predicted need (:func:`in_memory_need`)
  is under ``--memory-budget`` (this machine's 24 GB are shared); otherwise the prediction
  is recorded instead. Both write float32 (the job's output dtype).

* ``mehl``: MEHL-Soup+ over N = 8 fine-tunes of the source (:func:`upcycle.soup.mehl_soup`,
  bf16 model, fp32 coefficients), one round each: out of core (``--directions out-of-core``)
  at K = 2 and K = 8, resident at K = 2 and Learned-Soup+ (started only when their predicted
  need, :func:`mehl_need`, is under ``--memory-budget``; else the prediction is recorded).
  Per contender: peak RSS, the peak of the bytes of live tensors (allocator-independent,
  ``LiveTensors`` of ``soup_memory.py``) and the time of the round's held-out epoch.

The source is synthetic: random bf16 weights (std 0.02; norms 1 + N(0, 0.1)) in a Llama
layout, written tensor by tensor as sharded safetensors into a temporary folder in ``/tmp``
(the free space is checked first) and removed at the end. The MEHL ingredients are synthetic
too: the source plus a structured perturbation per ingredient (a random rank-1 update of each
matrix of norm 5% of the matrix's, seeded per ingredient), and the held-out data is random
tokens (:data:`MEHL_DATA`): the figures are memory and time, not quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # soup_memory's LiveTensors

import torch  # noqa: E402

from upcycle.io.shards import ShardWriter, TensorEntry  # noqa: E402
from upcycle.io.writing import write_json  # noqa: E402
from upcycle.jobs.bench import RESULT_PREFIX, format_table, run_contender  # noqa: E402
from upcycle.runtime.memory import current_rss_mb, peak_rss_mb  # noqa: E402

GB = 1e9

# -- the source model --------------------------------------------------------------------------

FULL = {"vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632,
        "max_position_embeddings": 2048}
"""TinyLlama-1.1B's shape."""
FULL_TARGET = {"hidden_size": 2560, "layers": 28}
"""Heads 40 (head_dim 64), key/value heads 5, intermediate 7040: ~1.8x the parameters."""
MID = {**FULL, "num_hidden_layers": 4}
MID_TARGET = {"hidden_size": 2560, "layers": 5}
"""The full width with 4 layers (0.3B): small enough for the in-memory contender to run, to
check its predicted need against its measured peak."""
QUICK = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 160,
         "max_position_embeddings": 64}
QUICK_TARGET = {"hidden_size": 96, "layers": 3}


def _llama_config(dims: dict):
    from transformers import LlamaConfig

    config = LlamaConfig(**dims, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    return config


def _empty(config):
    from transformers import LlamaForCausalLM

    from upcycle.grow.growth import empty_weights

    with empty_weights():
        return LlamaForCausalLM(config)


def write_source(folder: Path, dims: dict, *, seed: int = 0, max_shard_bytes: int = 2 * 10**9
                 ) -> int:
    """A Llama of ``dims`` with random bf16 weights, written one tensor at a time (sharded
    safetensors + config); returns its parameter count."""
    config = _llama_config(dims)
    model = _empty(config)
    params = dict(model.named_parameters())
    entries = [TensorEntry(k, tuple(p.shape), torch.bfloat16) for k, p in params.items()]
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder, entries, max_shard_bytes=max_shard_bytes) as writer:
        for name, p in params.items():
            if p.ndim == 1:  # norms
                value = 1 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                value = 0.02 * torch.randn(p.shape, generator=gen)
            writer.write(name, value.to(torch.bfloat16))
            del value
    config.save_pretrained(folder)
    return sum(p.numel() for p in params.values())


def write_ingredient(src: Path, folder: Path, index: int) -> None:
    """Ingredient ``index``: the source plus a rank-1 update u v^T of each matrix with
    ||u v^T|| = 5% of ||W|| (u, v seeded by ``index``), vectors unchanged; one tensor at a
    time, same shards and config as the source."""
    from upcycle.io.checkpoints import Ingredient

    source = Ingredient(src)
    names = source.keys()
    entries = [TensorEntry(k, source.shape(k), source.dtype(k)) for k in names]
    gen = torch.Generator().manual_seed(1000 + index)
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder, entries, max_shard_bytes=2 * 10**9) as writer:
        for name in names:
            w = source.get(name)
            if w.ndim == 2:
                u = torch.randn(w.shape[0], 1, generator=gen)
                v = torch.randn(1, w.shape[1], generator=gen)
                scale = 0.05 * torch.linalg.vector_norm(w.float()) / (u.norm() * v.norm())
                w = (w.float() + scale * (u @ v)).to(w.dtype)
            writer.write(name, w)
            del w
    shutil.copy(src / "config.json", folder / "config.json")


def grown_parameters(dims: dict, target: dict) -> int:
    """The grown model's parameter count (from its config, nothing built)."""
    from upcycle.grow import plan_expansion
    from upcycle.grow.growth import grown_config

    source = _empty(_llama_config(dims))
    plan = plan_expansion(source, hidden_size=target["hidden_size"],
                          num_layers=target["layers"])
    from upcycle.models.families import LLAMA

    return sum(p.numel() for p in _empty(grown_config(source.config, LLAMA, plan)).parameters())


def in_memory_need(n_source: int, n_grown: int) -> float:
    """Bytes the in-memory path holds at its peak: the source loaded in float32 (4 n_source),
    the grown model (4 n_grown) and the expanded state dict it is loaded from (4 n_grown),
    plus ~0.6 GB of interpreter, torch and transformers."""
    return 4 * n_source + 8 * n_grown + 0.6 * GB


def streamed_floor(dims: dict, target: dict) -> float:
    """The streamed path's floor: ~0.6 GB of imports, then the larger of (the tensors outside
    the layers: source and grown embeddings and head in float32) and (one source layer and
    the two target layers grown from it, float32, with ~2x that in transient noise and
    splits)."""
    d, D, V = dims["hidden_size"], target["hidden_size"], dims["vocab_size"]
    f = dims["intermediate_size"]
    F = round(f * D / d)
    kv = dims["num_key_value_heads"] * d // dims["num_attention_heads"]
    KV = kv * D // d
    layer = 2 * d * d + 2 * d * kv + 3 * d * f
    grown_layer = 2 * D * D + 2 * D * KV + 3 * D * F
    outside = 2 * V * (d + D)
    return 0.6 * GB + 4 * max(outside, layer + 2 * grown_layer * 2)


# -- the contenders ------------------------------------------------------------------------------

MEHL_N = 8
MEHL_DATA = {"batches": 4, "tokens": 16}
"""Held-out data of the MEHL section: 4 batches of one sequence of 16 random tokens (one
round = one held-out epoch = 4 coefficient steps). Short: bf16 matrix products run ~6x slower
than fp32 on a CPU without AVX-512 (this one), ~5 minutes a step at 128 tokens; the
activations are not what this section measures."""


def mehl_need(n_params: int, method: str, k: int, n: int, largest: int = 0) -> float:
    """Bytes a contender holds at its peak (bf16 model): the model (2 per parameter) and
    ~1 GB of interpreter, torch, transformers and transients, plus
    out of core: the init merge's fp64 accumulator and fp64 read of its ``largest`` tensor
    (16 per element of it: the merge is written into the anchor's file as it is made, and
    the fit holds two 64 MiB pieces; keep-best's snapshot is a file);
    resident: the anchor, K fp32 directions and keep-best's fp32 snapshot (4 (K + 2));
    learned+: N ingredients held in fp32 with the mixed model and its gradient
    (4 (N + 2) x 1.1, as soup_memory.py's LEARNED_FACTOR)."""
    if method == "out-of-core":
        return 2 * n_params + 16 * largest + 1.0 * GB
    kept = {"resident": 4 * (k + 2), "learned+": 4.4 * (n + 2)}[method]
    return (2 + kept) * n_params + 1.0 * GB


def mehl_worker(spec: dict) -> dict:
    from soup_memory import LiveTensors
    from transformers import LlamaForCausalLM

    from upcycle.io.ingredients import open_ingredients
    from upcycle.soup import LearnedConfig, MehlConfig, learned_soup, mehl_soup

    model = LlamaForCausalLM.from_pretrained(spec["src"], dtype=torch.bfloat16)
    with torch.no_grad():  # the weights in private memory before "start"
        for p in model.parameters():
            p.data = p.data.clone()
    ingredients = open_ingredients(spec["ingredients"])
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(MEHL_DATA["batches"]):
        ids = torch.randint(0, vocab, (1, spec["tokens"]), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    rounds: list[dict] = []

    class _Stop(Exception):
        pass

    def one_round(record: dict) -> None:
        rounds.append(record)
        raise _Stop

    # One held-out epoch of 4 steps measures memory and time; the few-steps warning is moot.
    warnings.filterwarnings("ignore", message=".*coefficient step")
    start_rss = current_rss_mb()
    start = time.perf_counter()
    try:
        with LiveTensors(model) as live:
            if spec["method"] == "learned+":
                learned_soup(ingredients, model, batches, config=LearnedConfig(epochs=1))
                epoch_s = time.perf_counter() - start - live.overhead
            else:
                mehl_soup(ingredients, model, batches, callback=one_round,
                          config=MehlConfig(model_batch=spec["k"], epochs=1,
                                            directions=spec["method"]))
    except _Stop:
        pass
    if spec["method"] != "learned+":
        epoch_s = rounds[0]["seconds"] - live.fit_overhead  # the round's steps only
    return {"status": "done", "peak_rss_gb": peak_rss_mb() * 2**20 / GB,
            "start_rss_gb": start_rss * 2**20 / GB, "live_gb": live.peak_live / GB,
            "activations_gb": live.peak_activations / GB, "epoch_s": epoch_s,
            "total_s": time.perf_counter() - start}

def lemon_worker(spec: dict) -> dict:
    from upcycle.jobs.grow import GrowJob, run_grow

    job = GrowJob(model=spec["src"], out=spec["out"], hidden_size=spec["hidden_size"],
                  layers=spec["layers"], in_memory=spec["in_memory"], quiet=True,
                  max_shard_size=2 * 10**9)
    start_rss = current_rss_mb()
    start = time.perf_counter()
    lines: list[str] = []
    result = run_grow(job, say=lines.append)
    wall = time.perf_counter() - start
    out = Path(spec["out"])
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"wall_s": wall, "peak_rss_gb": peak_rss_mb() * 2**20 / GB,
            "start_rss_gb": start_rss * 2**20 / GB, "output_gb": size / GB,
            "max_rel": result.report["max_rel_difference"], "status": "done", "log": lines}


@dataclass
class Section:
    title: str
    columns: list[tuple[str, str, str]]


SECTIONS = {
    "lemon": Section(
        title="LEMON: grow the model to >= 1.5x its parameters (upcycle grow, check included)",
        columns=[("name", "contender", ""), ("status", "status", ""),
                 ("peak_rss_gb", "peak RSS (GB)", ".2f"),
                 ("predicted_gb", "predicted need (GB)", ".1f"), ("wall_s", "time (s)", ".0f"),
                 ("output_gb", "output (GB)", ".2f"), ("max_rel", "max rel. difference", ".1e")]),
}
SECTIONS["mehl"] = Section(
    title=f"MEHL-Soup+: one round over N = {MEHL_N} fine-tunes (bf16 model, fp32 coefficients)",
    columns=[("name", "contender", ""), ("status", "status", ""),
             ("peak_rss_gb", "peak RSS (GB)", ".2f"), ("live_gb", "live tensors (GB)", ".2f"),
             ("predicted_gb", "predicted need (GB)", ".1f"),
             ("epoch_s", "held-out epoch (s)", ".0f"), ("total_s", "total (s)", ".0f")])
WORKERS = {"lemon": lemon_worker, "mehl": mehl_worker}


def lemon_contenders(src: Path, work: Path, dims: dict, target: dict, n_source: int,
                     n_grown: int) -> list[dict]:
    common = {"section": "lemon", "src": str(src), "hidden_size": target["hidden_size"],
              "layers": target["layers"], "n_source": n_source, "n_grown": n_grown}
    return [
        {**common, "name": "streamed (default)", "in_memory": False, "out": str(work / "s"),
         "predicted_gb": streamed_floor(dims, target) / GB},
        {**common, "name": "in memory (--in-memory)", "in_memory": True, "out": str(work / "m"),
         "predicted_gb": in_memory_need(n_source, n_grown) / GB},
    ]


def mehl_contenders(src: Path, work: Path, dims: dict, target: dict, n_source: int,
                    n_grown: int, mehl_k: str | None = None) -> list[dict]:
    paths = []
    for i in range(MEHL_N):
        folder = work / f"ingredient-{i}"
        if not folder.exists():
            write_ingredient(src, folder, i)
        paths.append(str(folder))
    tokens = min(MEHL_DATA["tokens"], dims["max_position_embeddings"])
    largest = dims["hidden_size"] * max(dims["vocab_size"], dims["intermediate_size"])
    common = {"section": "mehl", "src": str(src), "ingredients": paths, "tokens": tokens}
    out = []
    ks = [int(k) for k in (mehl_k or f"2,{MEHL_N}").split(",")]
    for method, k in [("out-of-core", k) for k in ks] + [("resident", ks[0]),
                                                         ("learned+", None)]:
        name = f"learned+ (N = {MEHL_N})" if k is None else f"MEHL+ {method}, K = {k}"
        out.append({**common, "name": name, "method": method, "k": k, "budgeted": True,
                    "predicted_gb": mehl_need(n_source, method, k or 0, MEHL_N,
                                              largest) / GB})
    return out


# -- the run -------------------------------------------------------------------------------------

def _check_disk(where: Path, need: float) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        sys.exit(f"scale.py: {where} has {free / GB:.1f} GB free, the run needs "
                 f"{need / GB:.1f} GB (source, MEHL's ingredients, one grown model at a time)")


def run(args: argparse.Namespace) -> dict:
    dims, target = {"quick": (QUICK, QUICK_TARGET), "mid": (MID, MID_TARGET),
                    "full": (FULL, FULL_TARGET)}[args.size]
    n_grown = grown_parameters(dims, target)
    n_source_est = sum(p.numel() for p in _empty(_llama_config(dims)).parameters())
    sections = [args.section] if args.section else list(SECTIONS)
    ingredients = 2 * n_source_est * MEHL_N if "mehl" in sections else 0
    _check_disk(Path(args.workdir), 2 * n_source_est + 4 * n_grown + ingredients + 0.5 * GB)
    work = Path(tempfile.mkdtemp(prefix="upcycle-scale-", dir=args.workdir))
    results = {"argv": sys.argv, "size": args.size, "source": dims, "target": target,
               "machine": f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
               "sections": {}}
    try:
        src = work / "source"
        start = time.perf_counter()
        n_source = write_source(src, dims)
        print(f"[scale] source: Llama {n_source / 1e9:.3f}B parameters in bf16, written in "
              f"{time.perf_counter() - start:.0f}s; grown: {n_grown / 1e9:.3f}B "
              f"({n_grown / n_source:.2f}x)", file=sys.stderr, flush=True)
        results.update(n_source=n_source, n_grown=n_grown)
        for name in sections:
            extra = {"mehl_k": args.mehl_k} if name == "mehl" and getattr(
                args, "mehl_k", None) else {}
            specs = {"lemon": lemon_contenders, "mehl": mehl_contenders}[name](
                src, work, dims, target, n_source, n_grown, **extra)
            rows = []
            for spec in specs:
                print(f"[scale] {name}: {spec['name']} ...", file=sys.stderr, flush=True)
                if (spec.get("in_memory") or spec.get("budgeted")) \
                        and spec["predicted_gb"] * GB > args.memory_budget * GB:
                    rows.append({**spec, "status": f"not run: predicted need over the "
                                                   f"{args.memory_budget:g} GB budget"})
                    continue
                result = run_contender(__file__, spec)
                row = {**spec, **{k: v for k, v in result.items() if k != "spec"}}
                if "error" in result:
                    row["status"] = "failed (see JSON)"
                rows.append(row)
                if "out" in spec:
                    shutil.rmtree(spec["out"], ignore_errors=True)
            table = format_table(rows, SECTIONS[name].columns)
            print(f"\n{SECTIONS[name].title}\n\n{table}")
            results["sections"][name] = {"rows": rows, "table": table}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        write_json(args.out, results)
        print(f"results written to {args.out}", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=["full", "mid", "quick"], default="full",
                        help="full: 1.1B -> 2.1B; mid: 4 layers of the full width (both "
                             "contenders run); quick: tiny (seconds)")
    parser.add_argument("--quick", dest="size", action="store_const", const="quick",
                        help="--size quick")
    parser.add_argument("--section", choices=list(SECTIONS), default=None)
    parser.add_argument("--memory-budget", type=float, default=10.0, metavar="GB",
                        help="run an in-memory contender only when its predicted need is "
                             "below this")
    parser.add_argument("--mehl-k", default=None, metavar="K,K",
                        help=f"MEHL section: the K of the out-of-core contenders (default "
                             f"2,{MEHL_N}; the resident one takes the first)")
    parser.add_argument("--workdir", default="/tmp", help="where the temporary models go")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        result = WORKERS[spec["section"]](spec)
        print(RESULT_PREFIX + json.dumps({"spec": spec, **result}, default=float), flush=True)
        return
    run(args)


if __name__ == "__main__":
    main()
