"""SHERL vs full fine-tuning, LoRA, LST and SNELL: peak training memory, time, accuracy.

    python benchmarks/sherl_memory.py            # everything (~15-20 min on 2 busy CPU cores)
    python benchmarks/sherl_memory.py --steps 10 --only "seq 128"

Contenders, each in a fresh process (upcycle.jobs.bench), all trained for the same number of
steps at batch 32 with AdamW + cosine schedule (upcycle.training.fit, transformers.Trainer):

- real all-MiniLM-L6-v2 (6 layers, hidden 384) on BBC News (5 classes), inputs truncated /
  padded to 128 and to 256 tokens; accuracy on a fixed 160-article test subset;
- a small ViT (6 layers, hidden 128, 28x28 MNIST, patch 4 -> 50 tokens). No pretrained ViT
  is available offline, so the parent first pretrains it briefly on MNIST digits 0-4 (cached
  in the temp folder); the contenders transfer it to digits 5-9 with a new head.

Each contender uses BENCH_THREADS torch threads (default 1).

Memory: the peak resident set size *while training* (Linux VmHWM, reset with
/proc/self/clear_refs right before the first step), and that peak minus the RSS just before
training ("training extra": the activations, gradients and optimizer state). Writes
benchmarks/results/sherl_memory.json and the table to benchmarks/results/sherl_memory.md.
"""

from __future__ import annotations

import gc
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH = 32
TEXT_TEST = 160
VIT_TEST = 500
VIT_DIR = Path(tempfile.gettempdir()) / "upcycle-sherl-bench-vit-v1"
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
"""Torch threads per contender. 1 by default: on a shared, oversubscribed CPU more threads
spin-wait on each other and small ops get many times slower (set BENCH_THREADS on a quiet
machine)."""

# method -> learning rate (each method's usual range; fixed, not tuned on the test set)
LR = {"full": 1e-4, "lora": 1e-3, "lst": 3e-3, "snell": 1e-3, "sherl": 3e-3}

COLUMNS = [
    ("name", "contender", ""),
    ("train_peak_rss_mb", "peak RSS in training (MB)", ".0f"),
    ("train_extra_mb", "training extra (MB)", ".0f"),
    ("peak_cuda_mb", "CUDA max allocated (MB)", ".0f"),
    ("vs_lora", "peak / LoRA's", ".2f"),
    ("s_per_step", "s / step", ".3f"),
    ("test_accuracy", "test acc.", ".3f"),
    ("trainable", "trainable params", ","),
]


# ---------------------------------------------------------------------------------------------
# memory readings
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------
def text_setup(seq: int, steps: int, seed: int = 0):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from upcycle.demo.data import bbc_news, minilm_path, split_indices

    texts, labels, classes = bbc_news()
    train_idx, test_idx = split_indices(len(texts), (0.8, 0.2), seed=0)
    tok = AutoTokenizer.from_pretrained(minilm_path())

    def batches(index, shuffle_seed=None):
        import numpy as np

        index = np.asarray(index)
        if shuffle_seed is not None:
            index = np.random.default_rng(shuffle_seed).permutation(index)
        out = []
        for start in range(0, len(index), BATCH):
            part = index[start:start + BATCH]
            enc = tok([texts[i] for i in part], padding="max_length", truncation=True,
                      max_length=seq, return_tensors="pt")
            enc = dict(enc)
            enc["labels"] = torch.tensor([labels[i] for i in part])
            out.append(enc)
        return out

    train_batches = batches(train_idx[: steps * BATCH], shuffle_seed=seed)
    train_batches = [b for b in train_batches if len(b["labels"]) == BATCH]
    test_batches = batches(test_idx[:TEXT_TEST])
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(),
                                                               num_labels=len(classes))
    return model.eval(), train_batches, test_batches


def _mnist_tensors():
    import torch

    from upcycle.demo.data import mnist

    images, labels = mnist()
    x = torch.as_tensor(images).float().div(255.0).sub(0.5).div(0.5)[:, None]
    return x, torch.as_tensor(labels)


def vit_config():
    from transformers import ViTConfig

    return ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=128,
                     num_hidden_layers=6, num_attention_heads=4, intermediate_size=256,
                     num_labels=5)


def pretrain_vit(steps: int = 200) -> Path:
    """A small ViT pretrained on MNIST digits 0-4 (the 'pretrained backbone'), cached."""
    if (VIT_DIR / "config.json").is_file():
        return VIT_DIR
    import torch
    import torch.nn.functional as F
    from transformers import ViTForImageClassification

    from upcycle.io.writing import atomic_dir

    print("[bench] pretraining the small ViT on MNIST digits 0-4 ...", file=sys.stderr, flush=True)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    x, y = _mnist_tensors()
    keep = y < 5
    x, y = x[keep], y[keep]
    model = ViTForImageClassification(vit_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((model.eval()(pixel_values=x[:1000]).logits.argmax(-1) == y[:1000]).float()
                    .mean())
    print(f"[bench]   pretrained ViT: train accuracy on digits 0-4 {acc:.3f}", file=sys.stderr)
    with atomic_dir(VIT_DIR, overwrite=True) as tmp:
        model.save_pretrained(tmp)
    return VIT_DIR


def vit_setup(steps: int, seed: int = 0):
    import torch
    from transformers import ViTForImageClassification

    x, y = _mnist_tensors()
    keep = y >= 5
    x, y = x[keep], y[keep] - 5
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test_idx, train_idx = order[:VIT_TEST], order[VIT_TEST:]
    gen = torch.Generator().manual_seed(seed)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=gen)]
    train_batches = [{"pixel_values": x[train_idx[s:s + BATCH]], "labels": y[train_idx[s:s + BATCH]]}
                     for s in range(0, min(len(train_idx), steps * BATCH) - BATCH + 1, BATCH)]
    test_batches = [{"pixel_values": x[test_idx[s:s + 100]], "labels": y[test_idx[s:s + 100]]}
                    for s in range(0, VIT_TEST, 100)]
    model = ViTForImageClassification.from_pretrained(VIT_DIR)
    torch.manual_seed(seed)
    model.classifier.reset_parameters()  # a new head for the new task
    return model.eval(), train_batches, test_batches


def build(method: str, model, spec: dict):
    from upcycle.tune.adapter import count_parameters

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        tuned = model
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        head = ["classifier"]
        tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["query", "value"],
                                                 modules_to_save=head))
    elif method == "lst":
        from upcycle.tune.lst import LstConfig, get_lst_model

        tuned = get_lst_model(model, LstConfig(reduction=8))
    elif method == "snell":
        from upcycle.tune.snell import SnellConfig, get_snell_model

        tuned = get_snell_model(model, SnellConfig())
    elif method == "sherl":
        from upcycle.tune.sherl import SherlConfig, get_sherl_model

        tuned = get_sherl_model(model, SherlConfig(late_layers=spec["late_layers"], reduction=4))
    else:
        raise ValueError(method)
    return tuned, count_parameters(tuned)[0]


def run_worker(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from upcycle.runtime.memory import current_rss_mb
    from upcycle.tasks.classification import evaluate
    from upcycle.training.config import TrainingConfig
    from upcycle.training.fit import first_item, fit

    torch.set_num_threads(THREADS)
    steps = spec["steps"]
    if spec["backbone"] == "minilm":
        model, train_batches, test_batches = text_setup(spec["seq"], steps)
    else:
        model, train_batches, test_batches = vit_setup(steps)
    torch.manual_seed(0)
    tuned, trainable = build(spec["method"], model, spec)
    stamps = []
    config = TrainingConfig(max_steps=steps, lr=LR[spec["method"]], weight_decay=0.01,
                            warmup_ratio=0.1, batch_size=1, device=spec.get("device", "cpu"),
                            progress=False)

    class Stamp(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    gc.collect()
    rss_before = current_rss_mb()
    from upcycle.runtime.memory import peak_rss_mb, reset_peak_rss

    exact = reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fit(tuned, train_batches, config, data_collator=first_item, callbacks=[Stamp()])
    train_peak = peak_rss_mb()
    cuda_peak = (torch.cuda.max_memory_allocated() / 2**20
                 if str(spec.get("device", "cpu")).startswith("cuda") else None)
    times = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    steady = times[1:] if len(times) > 1 else times  # the first step warms up kernels
    metrics = evaluate(tuned, test_batches)
    return {
        "train_peak_rss_mb": train_peak,
        "train_extra_mb": train_peak - rss_before,
        "rss_before_train_mb": rss_before,
        "peak_is_training_only": exact,
        "s_per_step": sum(steady) / len(steady),
        "train_seconds": result.seconds,
        "first_loss": result.step_losses[0],
        "final_loss": result.last_loss,
        "test_accuracy": metrics["accuracy"],
        "test_n": metrics["n"],
        "trainable": trainable,
        "lr": config.lr,
        "threads": torch.get_num_threads(),
        "peak_cuda_mb": cuda_peak,
    }


# ---------------------------------------------------------------------------------------------
# contenders and report
# ---------------------------------------------------------------------------------------------
METHODS = [("LoRA r=8 (peft)", "lora", None), ("SHERL M=1", "sherl", 1),
           ("SHERL M=2", "sherl", 2), ("full fine-tuning", "full", None),
           ("LST r=8", "lst", None), ("SNELL r=8", "snell", None)]


def snell_available() -> bool:
    try:
        from upcycle.tune.snell import SnellConfig, get_snell_model  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


def contenders(args) -> list[dict]:
    methods = [m for m in METHODS if m[1] != "snell" or snell_available()]
    # the headline group (seq 256) first, so an interrupted run still answers the target
    text = [{"name": f"MiniLM BBC seq {seq}: {label}", "backbone": "minilm", "seq": seq,
             "method": method, "late_layers": late, "steps": args.steps, "device": args.device}
            for seq in (256, 128) for label, method, late in methods]
    vit = [] if args.no_vit else [
        {"name": f"ViT MNIST: {label}", "backbone": "vit", "seq": 50, "method": method,
         "late_layers": late, "steps": args.steps, "device": args.device}
        for label, method, late in methods]
    specs = text[:len(methods)] + vit + text[len(methods):]
    if args.only:
        wanted = args.only.split("|")
        specs = [s for s in specs if any(w in s["name"] for w in wanted)]
    return specs


def add_vs_lora(rows: list[dict]) -> None:
    """'peak / LoRA's': each row's training peak over LoRA's in the same group."""
    key = peak_key(rows)
    lora = {r["name"].split(":")[0]: r for r in rows
            if r.get("method") == "lora" and r.get(key)}
    for row in rows:
        ref = lora.get(row["name"].split(":")[0])
        if ref and row.get(key):
            row["vs_lora"] = row[key] / ref[key]


def peak_key(rows: list[dict]) -> str:
    """The memory figure compared: CUDA max allocated on a GPU, else peak RSS in training."""
    return "peak_cuda_mb" if any(r.get("peak_cuda_mb") for r in rows) else "train_peak_rss_mb"


def verdict(rows: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in rows}
    lora, sherl = by_name.get("MiniLM BBC seq 256: LoRA r=8 (peft)"), \
        by_name.get("MiniLM BBC seq 256: SHERL M=1")
    lines = []
    key = peak_key(rows)
    what = "CUDA max allocated" if key == "peak_cuda_mb" else "peak RSS in training"
    if lora and sherl and "test_accuracy" in lora and "test_accuracy" in sherl:
        half = sherl[key] <= 0.5 * lora[key]
        close = sherl["test_accuracy"] >= lora["test_accuracy"] - 0.01
        lines.append(
            f"Target (seq 256, SHERL M=1 vs LoRA): {what} "
            f"{sherl[key]:.0f} vs {lora[key]:.0f} MB "
            f"({sherl['vs_lora']:.2f}x; target <= 0.5x: {'met' if half else 'MISSED'}); test "
            f"accuracy {sherl['test_accuracy']:.3f} vs {lora['test_accuracy']:.3f} (target: "
            f"within 1 point: {'met' if close else 'MISSED'})")
    failed = [r["name"] for r in rows if "error" in r]
    if failed:
        lines.append("Failed contenders: " + ", ".join(failed))
    return lines


def main() -> list[dict]:
    import argparse

    from upcycle.jobs import bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=16,
                        help="training steps per contender at batch 32 (default 16)")
    parser.add_argument("--only", default=None,
                        help="run only contenders whose name contains this ('a|b': either)")
    parser.add_argument("--no-vit", action="store_true", help="skip the ViT part")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda[:N]; on CUDA the table adds torch.cuda.max_memory_"
                             "allocated during training and the ratios use it")
    parser.add_argument("--out", default=str(RESULTS / "sherl_memory.json"), help="JSON results")
    parser.add_argument("--md", default=str(RESULTS / "sherl_memory.md"), help="the table")
    args = parser.parse_args()
    if args.worker:
        bench.worker_entry(run_worker, args.worker)
        return []
    specs = contenders(args)
    if not snell_available():
        print("[bench] upcycle.tune.snell is not importable: SNELL left out", file=sys.stderr)
    rows = []
    for spec in specs:
        if spec["backbone"] == "vit":
            pretrain_vit()
        print(f"[bench] {spec['name']} ...", file=sys.stderr, flush=True)
        result = bench.run_contender(__file__, spec)
        if "error" in result:
            print(f"[bench]   failed: {result['error']}", file=sys.stderr, flush=True)
        else:
            print(f"[bench]   peak {result['train_peak_rss_mb']:.0f} MB, "
                  f"{result['s_per_step']:.3f} s/step, acc {result['test_accuracy']:.3f}",
                  file=sys.stderr, flush=True)
        rows.append({**spec, **{k: v for k, v in result.items() if k != "spec"}})
        text = report(rows, args, done=len(rows) == len(specs))
    print(text)
    print(f"results written to {args.out} and {args.md}", file=sys.stderr)
    return rows


def report(rows: list[dict], args, done: bool) -> str:
    """Write the JSON and the Markdown table (also after each contender: partial results)."""
    from upcycle.io.writing import write_json
    from upcycle.jobs.bench import format_table

    add_vs_lora(rows)
    command = shlex.join(["python", "benchmarks/sherl_memory.py", *sys.argv[1:]])
    table = format_table(rows, COLUMNS)
    notes = verdict(rows)
    if not done:
        notes.append("(partial: the run is still going or was interrupted)")
    text = "\n".join([table, "", *notes]) if notes else table
    write_json(args.out, {"rows": rows, "table": table, "notes": notes, "command": command,
                          "complete": done})
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(f"Command: `{command}` ({args.steps} steps at batch {BATCH}; "
                             f"lr {LR})\n\n{text}\n")
    return text


if __name__ == "__main__":
    main()
