"""SNELL's transient memory: one training step of a single fp32 Linear(4096 -> 11008).

Issue #11: each SNELL layer used to build its whole delta_W (kernel, |K|, mask, delta_W and
their gradients) at once, a transient of 7-9x the weight in every recompute mode. The
default 'backward' path now builds delta_W a block of rows at a time (SnellConfig.block_mb)
for the exact threshold, the product with the input and the backward. Target: SNELL's peak
above peft LoRA's <= 1x the weight's bytes (180 MB), at <= 1.5x LoRA's step time.

Contenders, each in a fresh subprocess (upcycle.jobs.bench): the frozen layer alone (no adapter,
the floor), peft LoRA r = 8, SNELL r = 8, s = 0.5 blocked (block_mb 1, 4, 16, 64; the default is 4 on a CPU, 16 on CUDA),
the default block with SnellConfig.compile (each pass's elementwise work in one
torch.compiled loop per block; its one-time compile runs in an extra step before the
measured ones), and SNELL's two
whole-matrix paths (recompute 'checkpoint' and 'none'). A step is forward,
loss = mean(y^2), backward and an AdamW step on the adapter, on x of shape (1, tokens, 4096).

Memory per contender, both as what the step adds above the RSS before it:
- peak RSS of the process (Linux VmHWM, reset just before the measured steps), and
- the allocator-independent peak of live tensor bytes (upcycle.runtime.memory.LiveTensorBytes, a
  dispatch-mode count of tensor storages, run for one extra step, last; torch.compile does
  not run under a dispatch mode, so with compile=True this counts the same passes as plain
  torch operations, an upper bound; on CUDA also torch.cuda.max_memory_allocated).
Time: median seconds per step over the timed steps (after --warmup untimed steps, in which
AdamW creates its states and SNELL's threshold window settles: it needs a few steps of
history, and training runs thousands), torch on one
thread (the benchmark CPU is a shared 2-core machine); every contender runs --rounds times
in alternating order and the best round counts (load from other jobs only slows a run).

    python benchmarks/snell_spike.py                 # ~10 min on a shared 2-core CPU
    python benchmarks/snell_spike.py --tokens 1024 --tag tokens1024
    python benchmarks/snell_spike.py --input-grad --tag input_grad   # x.requires_grad

Writes benchmarks/results/snell_spike.{json,md}.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
D_IN, D_OUT = 4096, 11008


class _One(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.lin = layer

    def forward(self, x):
        return self.lin(x)


def _build(spec: dict, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = _One(nn.Linear(D_IN, D_OUT, device=device))
    model.requires_grad_(False)
    method = spec["method"]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["lin"]))
    elif method == "snell":
        from upcycle.tune.snell import SnellConfig, get_snell_model

        model = get_snell_model(model, SnellConfig(
            r=8, sparsity=0.5, target_modules=["lin"], modules_to_save=[], dropout=0.0,
            drop_path=0.0, recompute=spec["recompute"], block_mb=spec.get("block_mb"),
            compile=bool(spec.get("compile"))))
    return model.train()


def _malloc_trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def run_worker(spec: dict) -> dict:
    from upcycle.runtime.devices import resolve_device
    from upcycle.runtime.memory import LiveTensorBytes, current_rss_mb, peak_rss_mb, reset_peak_rss

    torch.set_num_threads(1)
    device = resolve_device(spec["device"])
    model = _build(spec, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, spec["tokens"], D_IN, generator=g).to(device)
    if spec.get("input_grad"):  # a layer inside a network: its input needs a gradient too
        x.requires_grad_(True)

    def step():
        y = model(x)
        loss = y.pow(2).mean()
        if params:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    weight_mb = D_IN * D_OUT * 4 / 2**20
    compile_s = None
    if spec.get("compile"):  # the one-time torch.compile, outside the step's figures
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
    _malloc_trim()  # give freed heap back, so the start RSS is what is alive
    rss_start = current_rss_mb()
    reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_start = torch.cuda.memory_allocated()
    times = []
    warmup = spec.get("warmup", 1)
    # the first steps warm up: AdamW's states, and SNELL's threshold window, which needs a
    # few steps of history before it is used (ThresholdHint)
    for _ in range(spec["steps"] + warmup):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_peak = peak_rss_mb() if reset else None
    result = {
        "weight_mb": weight_mb,
        "trainable": sum(p.numel() for p in params),
        "rss_start_mb": rss_start,
        "step_peak_rss_mb": step_peak,
        "rss_added_mb": step_peak - rss_start if step_peak is not None else None,
        "s_per_step": statistics.median(times[warmup:]),
        "first_step_s": times[0],
        "compile_step_s": compile_s,
    }
    if device.type == "cuda":
        result["cuda_added_mb"] = (torch.cuda.max_memory_allocated() - cuda_start) / 2**20
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                      row_limit=20, max_name_column_width=40)
    # last: under this dispatch mode SNELL's compiled passes run as plain torch operations
    # (torch.compile does not run under one), so with compile=True this figure is the eager
    # form's; the RSS figures are the compiled step's
    with LiveTensorBytes() as live:
        step()
    result["live_added_mb"] = live.peak / 2**20
    return result


def contenders(args) -> list[dict]:
    base = {"device": args.device, "tokens": args.tokens, "steps": args.steps,
            "warmup": args.warmup, "input_grad": args.input_grad}
    specs = [{**base, "name": "frozen layer, no adapter", "method": "none"},
             {**base, "name": "peft LoRA r=8", "method": "lora"}]
    from upcycle.runtime.devices import resolve_device
    from upcycle.tune.snell import DEFAULT_BLOCK_MB

    default_mb = DEFAULT_BLOCK_MB.get(resolve_device(args.device).type, DEFAULT_BLOCK_MB["cpu"])
    for mb in (1.0, 4.0, 16.0, 64.0):
        specs.append({**base, "name": f"SNELL blocked, block_mb={mb:g}"
                      + (" (default)" if mb == default_mb else ""), "method": "snell",
                      "recompute": "backward", "block_mb": mb})
    specs.append({**base, "name": f"SNELL blocked, block_mb={default_mb:g}, compile=True",
                  "method": "snell", "recompute": "backward", "block_mb": default_mb,
                  "compile": True})
    for mode in ("checkpoint", "none"):
        specs.append({**base, "name": f"SNELL whole delta_W, recompute={mode}",
                      "method": "snell", "recompute": mode})
    return specs


_SPEC_KEYS = ("device", "tokens", "steps", "warmup", "input_grad", "recompute", "block_mb",
              "compile")

COLUMNS = [
    ("name", "contender", ""),
    ("rss_added_mb", "step peak RSS - start (MB)", ".0f"),
    ("cuda_added_mb", "CUDA max allocated - start (MB)", ".0f"),
    ("live_added_mb", "peak live tensors (MB)", ".0f"),
    ("above_lora_x_weight", "above LoRA, x weight (RSS or, on CUDA, max allocated / live)",
     ""),
    ("s_per_step", "s/step (best round)", ".4f"),
    ("time_vs_lora", "time / LoRA", ".2f"),
]


def _aggregate(spec: dict, runs: list[dict]) -> dict:
    """Memory: the largest figure over the rounds; time: the best round's median (the
    shared CPU only ever slows a run down)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {**spec, "error": runs[-1].get("error", "no result")}
    row = {**spec, "weight_mb": good[0]["weight_mb"], "trainable": good[0]["trainable"],
           "rounds": len(good)}
    for key in ("rss_added_mb", "live_added_mb", "cuda_added_mb"):
        values = [r[key] for r in good if r.get(key) is not None]
        row[key] = max(values) if values else None
    row["s_per_step"] = min(r["s_per_step"] for r in good)
    row["s_per_step_rounds"] = [r["s_per_step"] for r in good]
    return row


def _annotate(rows: list[dict]) -> None:
    lora = next((r for r in rows if r.get("method") == "lora" and "error" not in r), None)
    if lora is None:
        return
    for r in rows:
        if "error" in r:
            continue
        w = r["weight_mb"]
        # on a GPU the process's RSS is host memory (CUDA libraries loading lazily): the
        # device figure there is CUDA max allocated
        key = "cuda_added_mb" if r.get("cuda_added_mb") is not None else "rss_added_mb"
        rss = ((r[key] - lora[key]) / w
               if r.get(key) is not None and lora.get(key) is not None else None)
        live = (r["live_added_mb"] - lora["live_added_mb"]) / w
        r["above_lora_rss_x"] = rss
        r["above_lora_live_x"] = live
        r["above_lora_x_weight"] = (f"{rss:+.2f} / {live:+.2f}" if rss is not None
                                    else f"– / {live:+.2f}")
        r["time_vs_lora"] = r["s_per_step"] / lora["s_per_step"]


def _summarize(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r.get("method") != "snell" or "error" in r:
            continue
        ok_mem = r["above_lora_live_x"] <= 1 and (r["above_lora_rss_x"] is None
                                                  or r["above_lora_rss_x"] <= 1)
        ok_time = r["time_vs_lora"] <= 1.5
        lines.append(f"- {r['name']}: peak above LoRA {r['above_lora_x_weight']} x the weight "
                     f"(target <= 1: {'met' if ok_mem else 'NOT met'}); step time "
                     f"{r['time_vs_lora']:.2f}x LoRA's (target <= 1.5: "
                     f"{'met' if ok_time else 'NOT met'})")
    return "\n".join(lines)


def main() -> None:
    import argparse

    from upcycle.io.writing import atomic_file, write_json
    from upcycle.jobs.bench import format_table, run_contender, worker_entry

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per step (batch 1)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (AdamW's states; SNELL's threshold window "
                             "needs a few steps of history)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run every contender this many times, alternating the order")
    parser.add_argument("--only", default=None, help="only contenders whose name has this")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--input-grad", action="store_true",
                        help="x requires a gradient (a layer inside a network: one more "
                             "weight-sized product in backward for every contender)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of each contender (torch.profiler)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="render the table of a saved run (its JSON) again; runs nothing")
    args = parser.parse_args()
    if args.worker:
        worker_entry(run_worker, args.worker)
        return
    argv = sys.argv
    if args.from_json:
        import json

        saved = json.loads(Path(args.from_json).read_text())
        argv, runs = saved["argv"], saved["runs"]
        args = parser.parse_args(argv[1:])
        specs = [{k: v for k, v in r.items() if k in ("name", "method") or k in _SPEC_KEYS}
                 for r in saved["rows"]]
        rounds = 0
    else:
        specs = [s for s in contenders(args) if not args.only or args.only in s["name"]
                 or s["method"] == "lora"]
        for spec in specs:
            spec["profile"] = args.profile
        runs = {s["name"]: [] for s in specs}
        rounds = args.rounds
    for i in range(rounds):
        for spec in (specs if i % 2 == 0 else specs[::-1]):
            print(f"[bench] round {i + 1}: {spec['name']} ...", file=sys.stderr, flush=True)
            result = run_contender(__file__, spec)
            if "error" in result:
                print(f"[bench]   failed: {result['error']}", file=sys.stderr, flush=True)
            runs[spec["name"]].append({k: v for k, v in result.items() if k != "spec"})
    rows = [_aggregate(spec, runs[spec["name"]]) for spec in specs]
    _annotate(rows)
    table = format_table(rows, COLUMNS)
    summary = _summarize(rows)
    print(table + "\n\n" + summary)
    out_json = RESULTS / f"snell_spike{'_' + args.tag if args.tag else ''}.json"
    write_json(out_json, {"rows": rows, "runs": runs, "table": table, "argv": argv})
    command = "python benchmarks/snell_spike.py " + " ".join(argv[1:])
    text = (f"Command: `{command.strip()}`\n\n"
            f"One step of a single fp32 Linear({D_IN} -> {D_OUT}) (weight "
            f"{D_IN * D_OUT * 4 / 2**20:.0f} MiB), x of shape (1, {args.tokens}, {D_IN}), "
            f"device {args.device}, torch {torch.__version__}, one thread, "
            f"{'x requires grad, ' if args.input_grad else ''}{args.rounds} "
            f"rounds (memory: the largest; time: the best round's median of {args.steps} "
            f"steps after {args.warmup} warm-up steps). Memory is what the step adds above the start (MiB); 'above LoRA' is "
            f"(SNELL - LoRA) / weight bytes.\n\n" + table + "\n\n" + summary + "\n")
    if args.profile:
        for spec in specs:
            for run in runs[spec["name"]][:1]:
                if run.get("profile"):
                    text += (f"\nProfile of one step, {spec['name']} (self CPU time):\n\n```\n"
                             f"{run['profile']}```\n")
    with atomic_file(out_json.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    print(f"results written to {out_json} and {out_json.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
