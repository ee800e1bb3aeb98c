"""Tuning a decoder LM: peft LoRA and QLoRA vs SNELL, SHERL and full fine-tuning.

    python benchmarks/tune_llm.py             # Llama shape (~10-15 min on one busy CPU core)
    python benchmarks/tune_llm.py --quick     # tiny shapes: a smoke run (what the test runs)
    python benchmarks/tune_llm.py --only "SNELL|LoRA"

The model is Llama-shaped and *synthetic*: ``LlamaForCausalLM`` with random weights (seed 0;
nothing is downloaded), hidden 1024, intermediate 2816, 4 layers, 16 heads, vocab 32000,
untied head, saved once to a temporary folder and reloaded by each contender with
``from_pretrained`` (fp32, or ``BitsAndBytesConfig`` 4-bit: nf4, double quantization,
compute dtype fp32). Training: batch 4 x seq 256 (1024 tokens per step) of fixed random
token ids, next-token loss, AdamW (lr 1e-4), no gradient checkpointing. Random weights and
tokens make the losses meaningless: this measures memory and time only.

Contenders, each in a fresh process (upcycle.jobs.bench), at the same adapter dropout
(``--dropout``, default 0; SNELL's DropPath 0):

- peft LoRA r=8 on q, k, v, o, gate, up, down (fp32 base) and peft QLoRA (the same on the
  4-bit base);
- SNELL r=8 (sparsity 0.5) on the same modules, on the fp32 and on the 4-bit base;
- SHERL M=1 on the causal LM (fp32 base, reduction 4);
- full fine-tuning (fp32).

Per contender: the peak RSS of the process (Linux VmHWM, loading included), the training
extra (the peak while training minus the RSS just before it, every weight read once before:
activations, gradients, optimizer state and allocator slack), the bytes saved for backward in one step (the distinct storages packed by
``torch.autograd.graph.saved_tensors_hooks``, parameters excluded), and the median seconds
per step over ``--steps`` steps after ``--warmup`` warm-up steps. Ratios are against LoRA on
the same base (QLoRA for a 4-bit base). Targets (issue #20): SNELL <= 1.05x LoRA's memory
and <= 1.8x its step time; SHERL <= 0.6x LoRA's memory. A contender that fails (e.g. a
method not supporting a base yet) is an error row, not a crash.

Each contender uses BENCH_THREADS torch threads (default 1). Writes
benchmarks/results/tune_llm.json and the table to benchmarks/results/tune_llm.md.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
"""Torch threads per contender (1: the benchmark CPU is shared; see sherl_memory.py)."""

SHAPES = {
    "full": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
             "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
             "seq": 256, "batch": 4},
    "quick": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256,
              "seq": 32, "batch": 2},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
LR = 1e-4
LORA_FP32, LORA_4BIT = "peft LoRA r=8", "peft QLoRA r=8"

# (name, method, base, reference contender for the ratios, target: (memory, time) or None)
CONTENDERS = [
    (LORA_FP32, "lora", "fp32", LORA_FP32, None),
    (LORA_4BIT, "lora", "bnb-4bit", LORA_4BIT, None),
    ("SNELL r=8", "snell", "fp32", LORA_FP32, (1.05, 1.8)),
    ("SNELL r=8 (4-bit base)", "snell", "bnb-4bit", LORA_4BIT, (1.05, 1.8)),
    ("SHERL M=1", "sherl", "fp32", LORA_FP32, (0.6, None)),
    ("full fine-tuning", "full", "fp32", LORA_FP32, None),
]

COLUMNS = [
    ("name", "contender", ""),
    ("base", "base", ""),
    ("rss_before_train_mb", "RSS before training (MB)", ".0f"),
    ("peak_rss_mb", "peak RSS (MB)", ".0f"),
    ("train_extra_mb", "training extra (MB)", ".0f"),
    ("saved_mb", "saved for backward (MB)", ".1f"),
    ("s_per_step", "s / step", ".2f"),
    ("vs_ref", "peak / extra / saved / time vs ref", ""),
    ("target", "target", ""),
    ("trainable", "trainable params", ","),
    ("error_short", "error", ""),
]


# ---------------------------------------------------------------------------------------------
# the synthetic model
# ---------------------------------------------------------------------------------------------
def model_config(shape: dict):
    from transformers import LlamaConfig

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return LlamaConfig(**{k: shape[k] for k in keys}, max_position_embeddings=max(
        512, shape["seq"]), tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=0)


def synthetic_model_dir(shape: dict) -> Path:
    """A random-weight Llama of this shape saved once (seed 0) in the temp folder."""
    key = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"upcycle-tune-llm-{key}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaForCausalLM

    from upcycle.io.writing import atomic_dir

    print(f"[bench] building the synthetic Llama in {folder} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(shape))
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
    return folder


def load_base(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if spec["base"] == "bnb-4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)


def build(spec: dict, model):
    method, dropout = spec["method"], spec["dropout"]
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                                lora_dropout=dropout, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))
    if method == "snell":
        from upcycle.tune.snell import SnellConfig, get_snell_model

        return get_snell_model(model, SnellConfig(r=RANK, target_modules=TARGETS,
                                                  modules_to_save=[], dropout=dropout,
                                                  drop_path=0.0))
    if method == "sherl":
        from upcycle.tune.sherl import SherlConfig, get_sherl_model

        return get_sherl_model(model, SherlConfig(late_layers=1, reduction=4))
    raise ValueError(method)


# ---------------------------------------------------------------------------------------------
# one contender (in its own process)
# ---------------------------------------------------------------------------------------------
class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the context
    (``saved_tensors_hooks``), the given parameters' storages excluded."""

    def __init__(self, parameters):
        self.skip = {_storage_key(p) for p in parameters}
        self.sizes: dict = {}

    def pack(self, tensor):
        key = _storage_key(tensor)
        if key is not None and key not in self.skip:
            self.sizes[key] = _storage_bytes(tensor)
        return tensor

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def _storage_key(tensor):
    try:
        storage = tensor.untyped_storage()
        return (storage.data_ptr(), tensor.device.type) if storage.nbytes() else None
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without one
        return ("id", id(tensor))


def _storage_bytes(tensor) -> int:
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return tensor.numel() * tensor.element_size()


def touch(model) -> None:
    """Read every parameter once: ``from_pretrained`` may leave weights memory-mapped and
    not yet resident, and they would count as training memory when the first step reads
    them."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            try:
                p.detach().sum()
            except (RuntimeError, NotImplementedError, TypeError):  # a quantized subclass
                pass


def run_worker(spec: dict) -> dict:
    import torch

    from upcycle.runtime.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
    from upcycle.tune.adapter import count_parameters

    torch.set_num_threads(THREADS)
    model = load_base(spec)
    torch.manual_seed(0)
    tuned = build(spec, model)
    tuned.train()
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, spec["vocab_size"], (spec["batch"], spec["seq"]), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> float:
        loss = tuned(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    touch(tuned)
    gc.collect()
    load_peak = peak_rss_mb()
    rss_before = current_rss_mb()
    exact = reset_peak_rss()
    losses = [step() for _ in range(spec["warmup"])]
    with SavedBytes(tuned.parameters()) as saved:
        losses.append(step())
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    train_peak = peak_rss_mb()
    return {
        "peak_rss_mb": max(load_peak, train_peak),
        "load_peak_rss_mb": load_peak,
        "train_peak_rss_mb": train_peak,
        "train_extra_mb": train_peak - rss_before,
        "rss_before_train_mb": rss_before,
        "peak_is_training_only": exact,
        "saved_mb": saved.total / 2**20,
        "s_per_step": statistics.median(times),
        "step_times": times,
        "losses": losses,
        "trainable": count_parameters(tuned)[0],
        "threads": torch.get_num_threads(),
        "tokens_per_step": spec["batch"] * spec["seq"],
    }


# ---------------------------------------------------------------------------------------------
# contenders and report
# ---------------------------------------------------------------------------------------------
def contenders(args) -> list[dict]:
    shape = SHAPES["quick" if args.quick else "full"]
    folder = str(synthetic_model_dir(shape))
    specs = [{"name": name, "method": method, "base": base, "ref": ref, "targets": target,
              "dropout": args.dropout, "steps": args.steps, "warmup": args.warmup,
              "model_dir": folder, **shape}
             for name, method, base, ref, target in CONTENDERS]
    if args.only:
        wanted = args.only.split("|")
        specs = [s for s in specs if any(w in s["name"] for w in wanted)]
    return specs


def short_error(text: str) -> str:
    """The exception line of a worker's traceback, shortened for the table."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = next((ln for ln in reversed(lines) if "Error" in ln.split(":")[0]
                  or "Exception" in ln.split(":")[0]), lines[-1] if lines else text)
    found = found.replace("|", "/")
    return found if len(found) <= 160 else found[:157] + "..."


def add_comparisons(rows: list[dict]) -> None:
    """Each row's ratios to its reference contender and its target verdict."""
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        if "error" in row:
            row["error_short"] = short_error(row["error"])
        ref = by_name.get(row["ref"])
        if row["name"] == row["ref"] or ref is None or "error" in ref or "error" in row:
            row["vs_ref"] = "(reference)" if row["name"] == row["ref"] else None
            row["target"] = _target_text(row["targets"], None, None)
            continue
        ratios = {k: row[k] / ref[k] if ref.get(k) else None
                  for k in ("peak_rss_mb", "train_extra_mb", "saved_mb", "s_per_step")}
        row["ratios"] = {**ratios, "ref": ref["name"]}
        row["vs_ref"] = " / ".join("–" if v is None else f"{v:.2f}x" for v in ratios.values())
        row["target"] = _target_text(row["targets"], ratios["peak_rss_mb"],
                                     ratios["s_per_step"])
        if row["target"]:
            row["target_met"] = "MISSED" not in row["target"]


def _target_text(target, memory, time_ratio) -> str | None:
    if not target:
        return None
    mem_max, time_max = target
    parts = [f"peak <= {mem_max}x" + ("" if memory is None else
                                      f": {'met' if memory <= mem_max else 'MISSED'}")]
    if time_max is not None:
        parts.append(f"time <= {time_max}x" + ("" if time_ratio is None else
                                               f": {'met' if time_ratio <= time_max else 'MISSED'}"))
    return "; ".join(parts)


def report(rows: list[dict], args, done: bool) -> str:
    """Write the JSON and the Markdown table (also after each contender: partial results)."""
    from upcycle.io.writing import write_json
    from upcycle.jobs.bench import format_table

    add_comparisons(rows)
    command = shlex.join(["python", "benchmarks/tune_llm.py", *sys.argv[1:]])
    shape = SHAPES["quick" if args.quick else "full"]
    setting = (f"synthetic random-weight Llama (hidden {shape['hidden_size']}, intermediate "
               f"{shape['intermediate_size']}, {shape['num_hidden_layers']} layers, vocab "
               f"{shape['vocab_size']}), batch {shape['batch']} x seq {shape['seq']}, "
               f"dropout {args.dropout}, {args.warmup} warm-up + {args.steps} timed steps, "
               f"{THREADS} torch thread(s), CPU")
    table = format_table(rows, COLUMNS)
    notes = ["Ratios (peak RSS / training extra / saved for backward / s per step) are "
             "against LoRA on the same base (QLoRA for the 4-bit base)."]
    failed = [r["name"] for r in rows if "error" in r]
    if failed:
        notes.append("Failed contenders (error rows): " + ", ".join(failed))
    if not done:
        notes.append("(partial: the run is still going or was interrupted)")
    text = "\n".join([setting, "", table, "", *notes])
    write_json(args.out, {"rows": rows, "table": table, "notes": notes, "command": command,
                          "setting": setting, "complete": done})
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(f"Command: `{command}`\n\n{text}\n")
    return text


def main() -> list[dict]:
    import argparse

    from upcycle.jobs import bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per contender (default 3; --quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (default 1)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="adapter dropout of LoRA and SNELL (default 0)")
    parser.add_argument("--only", default=None,
                        help="run only contenders whose name contains this ('a|b': either)")
    parser.add_argument("--out", default=None,
                        help="JSON results (default benchmarks/results/tune_llm[-quick].json)")
    parser.add_argument("--md", default=None, help="the table (default: next to --out, .md)")
    args = parser.parse_args()
    if args.worker:
        bench.worker_entry(run_worker, args.worker)
        return []
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    if args.out is None:
        args.out = str(RESULTS / ("tune_llm-quick.json" if args.quick else "tune_llm.json"))
    if args.md is None:
        args.md = str(Path(args.out).with_suffix(".md"))
    specs = contenders(args)
    rows: list[dict] = []
    text = ""
    for spec in specs:
        print(f"[bench] {spec['name']} ...", file=sys.stderr, flush=True)
        result = bench.run_contender(__file__, spec)
        if "error" in result:
            print(f"[bench]   failed: {short_error(result['error'])}", file=sys.stderr,
                  flush=True)
        else:
            print(f"[bench]   peak {result['peak_rss_mb']:.0f} MB, saved "
                  f"{result['saved_mb']:.1f} MB, {result['s_per_step']:.2f} s/step",
                  file=sys.stderr, flush=True)
        rows.append({**spec, **{k: v for k, v in result.items() if k != "spec"}})
        text = report(rows, args, done=len(rows) == len(specs))
    print(text)
    print(f"results written to {args.out} and {args.md}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
