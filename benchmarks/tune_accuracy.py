"""Accuracy of the tuning methods on the real MiniLM and BBC News (issue #13).

Contenders: full fine-tuning, peft LoRA (r = 8 on query/value, and on all linear layers),
SNELL (r = 8, s = 0.5, its paper's settings), SHERL (M = 1 and M = 2) and LST. Two
settings: ``--setting 256`` (full articles, 256 tokens) and ``--setting 32`` (the harder
one, 32 tokens). The split is fixed (BBC News shuffled with seed 0, cut 60/20/20 into
train / held-out / test; ``--train-size`` etc. keep only the first N of each part).

For every (method, learning rate, seed) a fresh subprocess trains through
:func:`upcycle.jobs.finetune.train_task` (``transformers.Trainer``: AdamW with batch 16,
weight decay 0.01 on matrices, constant lr, no clipping), evaluates on held-out after every
epoch, keeps the best epoch and stops after ``--patience`` epochs without improvement or at
``--max-epochs``.
The test accuracy reported is that of the best-held-out epoch (the test split is scored
at each improving epoch, equivalent to reloading the best state, and never used to choose).
Every method gets a learning-rate grid of the same size; the lr chosen per method is the
one with the best held-out accuracy (mean over seeds). The table gives, at that lr, test
accuracy mean +- std over seeds, a bootstrap 95% interval (1000 resamples of the test
examples, each example's correctness averaged over seeds), trainable parameters, peak RSS
during training (Linux VmHWM reset at the first step) and median seconds per epoch.

Runs are cached in ``--cache`` (one JSON per (setting, method, lr, seed, sizes, epoch cap,
patience)); a rerun reports from the cache without retraining. torch runs with one thread.

    .venv/bin/python benchmarks/tune_accuracy.py --setting 32 --seeds 0,1,2
    .venv/bin/python benchmarks/tune_accuracy.py --setting 32 --seeds 0 --train-size 600 \\
        --held-out-size 200 --test-size 400 --max-epochs 4 --patience 1   # reduced run

Writes benchmarks/results/tune_accuracy_<setting>[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

BATCH = 16
EVAL_BATCH = 32
SPLIT = (0.6, 0.2, 0.2)
METHODS = {  # name -> (family, build options)
    "full": ("full", {}),
    "lora-qv": ("lora", {"targets": ["query", "value"]}),
    "lora-all": ("lora", {"targets": "all-linear"}),
    "snell": ("snell", {"r": 8, "sparsity": 0.5}),
    "sherl-m1": ("sherl", {"late_layers": 1}),
    "sherl-m2": ("sherl", {"late_layers": 2}),
    "lst": ("lst", {}),
}
DEFAULT_LRS = {
    "full": "2e-5,5e-5,1e-4",
    "lora": "3e-4,1e-3,3e-3",
    "snell": "3e-4,1e-3,3e-3",
    "sherl": "3e-4,1e-3,3e-3",
    "lst": "3e-4,1e-3,3e-3",
}


# -- data and contenders ----------------------------------------------------------------------
def fixed_splits(sizes: dict):
    """(texts, labels) of train / held_out / test: a fixed shuffle (seed 0) cut 60/20/20, each
    part truncated to its size (None = all)."""
    from upcycle.demo.data import bbc_news, split_indices

    texts, labels, _ = bbc_news()
    parts = split_indices(len(texts), SPLIT, seed=0)
    out = {}
    for name, idx in zip(("train", "held_out", "test"), parts):
        n = sizes.get(name)
        idx = idx[:n] if n else idx
        out[name] = ([texts[i] for i in idx], [labels[i] for i in idx])
    return out


def build(spec: dict, model):
    from upcycle.tune import TUNERS
    from upcycle.tune.adapter import count_parameters

    family, opts = METHODS[spec["method"]]
    head = ["classifier"]
    if family in TUNERS:  # SNELL, SHERL: through the registry, as `upcycle tune` does
        tuner = TUNERS[family]
        tuned = tuner.get_model(model, tuner.config_class(**opts))
    elif family == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        tuned = model
    elif family == "lora":
        from peft import LoraConfig, get_peft_model

        tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=opts["targets"],
                                                 modules_to_save=head))
    elif family == "lst":
        from upcycle.tune.lst import LstConfig, get_lst_model

        tuned = get_lst_model(model, LstConfig())
    else:  # pragma: no cover
        raise ValueError(family)
    return tuned, count_parameters(tuned)[0]


def run_worker(spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from upcycle.demo.data import minilm_path
    from upcycle.jobs.finetune import train_task
    from upcycle.runtime.memory import peak_cuda_mb, peak_rss_mb, reset_peak_rss
    from upcycle.tasks.classification import (
        ClassificationTask,
        LabeledData,
        logits_of,
        move_batch,
    )
    from upcycle.training.config import TrainingConfig

    torch.set_num_threads(1)
    seed = spec["seed"]
    device = torch.device(spec.get("device", "cpu"))
    task = ClassificationTask(minilm_path(), "text", num_labels=5, max_length=spec["setting"],
                              head_seed=seed)
    data = {name: LabeledData(labels=torch.tensor(y), source=f"bbc:{name}", texts=x)
            for name, (x, y) in fixed_splits(spec["sizes"]).items()}
    model = task.load_model()
    torch.manual_seed(seed)
    tuned, trainable = build(spec, model)
    tuned.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    held_batches = task.batches(data["held_out"], EVAL_BATCH)
    test_batches = task.batches(data["test"], EVAL_BATCH)

    def test_correct() -> list[int]:
        tuned.eval()
        out = []
        with torch.no_grad():
            for batch in test_batches:
                batch = move_batch(batch, device)
                out += (logits_of(tuned, batch).argmax(-1) == batch["labels"]).int().tolist()
        return out

    curve, losses, epoch_s, step_losses = [], [], [], []
    best = {"accuracy": -1.0, "epoch": -1, "bad": 0, "correct": None}

    class EpochEnd(TrainerCallback):
        """After each epoch: the held-out accuracy, the test answers of an improving epoch,
        and the stop after ``patience`` epochs without improvement."""

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            step_losses.clear()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                step_losses.append(logs["loss"])

        def on_epoch_end(self, args, state, control, **kwargs):
            epoch = len(curve)
            epoch_s.append(time.perf_counter() - self.start)
            losses.append(sum(step_losses) / max(1, len(step_losses)))
            acc = task.evaluate(tuned, held_batches)["accuracy"]
            curve.append(acc)
            print(f"[worker] {spec['method']} lr={spec['lr']} seed={seed} epoch {epoch + 1}: "
                  f"loss {losses[-1]:.4f} held-out {acc:.4f} ({epoch_s[-1]:.1f}s)",
                  file=sys.stderr, flush=True)
            if acc > best["accuracy"]:
                best.update(accuracy=acc, epoch=epoch, bad=0, correct=test_correct())
            else:
                best["bad"] += 1
                control.should_training_stop = best["bad"] >= spec["patience"]
            tuned.train()

    # the protocol: AdamW (weight decay 0.01), constant lr, no clipping, batch BATCH
    config = TrainingConfig(epochs=spec["max_epochs"], lr=spec["lr"], weight_decay=0.01,
                            grad_clip=None, batch_size=BATCH, logging_steps=1, seed=seed,
                            device=device, progress=False, report_to=[])
    constant = lambda optimizer, total: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        optimizer, lambda step: 1.0)
    exact = reset_peak_rss()
    train_task(tuned, task, data["train"], config, schedule=constant, callbacks=[EpochEnd()])
    result = {
        "held_out_curve": curve,
        "train_loss_curve": losses,
        "best_epoch": best["epoch"] + 1,
        "epochs_run": len(curve),
        "held_out_accuracy": best["accuracy"],
        "test_accuracy": sum(best["correct"]) / len(best["correct"]),
        "test_correct": best["correct"],
        "trainable": trainable,
        "peak_rss_mb": peak_rss_mb(),
        "peak_is_training_only": exact,
        "s_per_epoch": statistics.median(epoch_s),
        "epoch_seconds": epoch_s,
        "threads": torch.get_num_threads(),
        "loop": "upcycle.jobs.finetune.train_task",
    }
    cuda = peak_cuda_mb()
    if cuda is not None:
        result["peak_cuda_mb"] = cuda
    return result


# -- orchestration ----------------------------------------------------------------------------
def cache_path(cache: Path, spec: dict) -> Path:
    key = {k: spec[k] for k in ("setting", "method", "lr", "seed", "sizes", "max_epochs",
                                "patience")}
    if spec.get("device", "cpu") != "cpu":  # CPU runs keep their old keys
        key["device"] = spec["device"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"{spec['setting']}-{spec['method']}-lr{spec['lr']:g}-s{spec['seed']}-{digest}.json"


def parse_lrs(args) -> dict[str, list[float]]:
    grids = {fam: [float(v) for v in getattr(args, f"lr_{fam}").split(",") if v.strip()]
             for fam in DEFAULT_LRS}
    sizes = {len(g) for g in grids.values()}
    if len(sizes) != 1:
        raise SystemExit("tune_accuracy: error: every --lr-* grid must have the same size "
                         f"(got {({f: len(g) for f, g in grids.items()})})")
    return grids


def summarize(records: list[dict], methods: list[str]) -> tuple[list[dict], str]:
    import numpy as np

    rng = np.random.default_rng(0)
    rows, lines = [], []
    for method in methods:
        mine = [r for r in records if r["method"] == method and "error" not in r]
        if not mine:
            continue
        by_lr: dict[float, list[dict]] = {}
        for r in mine:
            by_lr.setdefault(r["lr"], []).append(r)
        held = {lr: statistics.mean(r["held_out_accuracy"] for r in rs) for lr, rs in by_lr.items()}
        lr = max(held, key=lambda k: (held[k], -k))
        rs = by_lr[lr]
        tests = [r["test_accuracy"] for r in rs]
        c = np.mean([np.asarray(r["test_correct"], dtype=float) for r in rs], axis=0)
        boot = c[rng.integers(0, len(c), size=(1000, len(c)))].mean(axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        rows.append({
            "method": method, "lr": lr, "seeds": len(rs),
            "lrs_tried": {f"{k:g}": round(v, 4) for k, v in sorted(held.items())},
            "held_out": held[lr], "test_mean": statistics.mean(tests),
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "ci95": [float(lo), float(hi)], "trainable": rs[0]["trainable"],
            "peak_rss_mb": statistics.mean(r["peak_rss_mb"] for r in rs),
            "peak_cuda_mb": (statistics.mean(r["peak_cuda_mb"] for r in rs)
                             if all(r.get("peak_cuda_mb") for r in rs) else None),
            "s_per_epoch": statistics.mean(r["s_per_epoch"] for r in rs),
            "epochs": [r["epochs_run"] for r in rs], "best_epoch": [r["best_epoch"] for r in rs],
        })
    cuda = bool(rows) and all(r["peak_cuda_mb"] for r in rows)
    key, what = ("peak_cuda_mb", "CUDA max allocated") if cuda else ("peak_rss_mb", "peak RSS")
    lines.append("| method | lr (held-out pick) | held-out acc | test acc (mean ± std) | "
                 f"bootstrap 95% CI | trainable params | {what} (MiB) | s / epoch | "
                 "epochs run (best) | held-out per lr |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['held_out']:.4f} | {r['test_mean']:.4f} ± "
            f"{r['test_std']:.4f} | [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] | "
            f"{r['trainable']:,} | {r[key]:.0f} | {r['s_per_epoch']:.2f} | "
            f"{','.join(map(str, r['epochs']))} ({','.join(map(str, r['best_epoch']))}) | "
            f"{' '.join(f'{k}: {v:.3f}' for k, v in r['lrs_tried'].items())} |")
    lines += [""] + verdicts(rows, key, what)
    return rows, "\n".join(lines)


def verdicts(rows: list[dict], key: str, what: str) -> list[str]:
    """The issue's targets, against each LoRA: SNELL test acc >= LoRA's at <= 1.05x its
    memory; SHERL within 1 point of LoRA at <= 0.5x its memory."""
    by = {r["method"]: r for r in rows}
    out = []
    for lora in ("lora-qv", "lora-all"):
        ref = by.get(lora)
        if ref is None:
            continue
        for name, gap, mem in (("snell", 0.0, 1.05), ("sherl-m1", 0.01, 0.5),
                               ("sherl-m2", 0.01, 0.5)):
            r = by.get(name)
            if r is None:
                continue
            d = r["test_mean"] - ref["test_mean"]
            ratio = r[key] / ref[key]
            acc_ok, mem_ok = d >= -gap - 1e-9, ratio <= mem
            want = "≥ LoRA's" if gap == 0 else "within 1 point of LoRA's"
            out.append(f"- {name} vs {lora}: test accuracy {d * 100:+.2f} points (target {want}: "
                       f"{'met' if acc_ok else 'missed'}); {what} {ratio:.2f}x (target ≤ {mem}x: "
                       f"{'met' if mem_ok else 'missed'})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--setting", type=int, choices=(32, 256), default=256)
    parser.add_argument("--seeds", default="0,1,2")
    for fam, default in DEFAULT_LRS.items():
        parser.add_argument(f"--lr-{fam}", default=default,
                            help=f"learning-rate grid of {fam} (comma-separated)")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--held-out-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated method names to run")
    parser.add_argument("--cache", default=str(HERE / "results" / "tune_accuracy_cache"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (each its own process; on one GPU they share it, "
                             "so s / epoch is then only comparable within the table)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--no-train", action="store_true",
                        help="report from the cache only (missing runs are left out)")
    args = parser.parse_args()
    if args.worker:
        from upcycle.jobs.bench import worker_entry

        worker_entry(run_worker, args.worker)
        return
    from upcycle.io.writing import write_json
    from upcycle.jobs.bench import run_contender

    grids = parse_lrs(args)
    methods = list(METHODS)
    if args.only:
        wanted = [m.strip() for m in args.only.split(",")]
        unknown = [m for m in wanted if m not in METHODS]
        if unknown:
            raise SystemExit(f"tune_accuracy: error: --only: unknown method {unknown[0]!r} "
                             f"(known: {', '.join(METHODS)})")
        methods = [m for m in methods if m in wanted]
    sizes = {"train": args.train_size, "held_out": args.held_out_size, "test": args.test_size}
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    records, todo = [], []
    for method in methods:
        for lr in grids[METHODS[method][0]]:
            for seed in seeds:
                spec = {"setting": args.setting, "method": method, "lr": lr, "seed": seed,
                        "sizes": sizes, "max_epochs": args.max_epochs,
                        "patience": args.patience, "device": args.device}
                path = cache_path(cache, spec)
                if path.is_file():
                    records.append(json.loads(path.read_text()))
                elif not args.no_train:
                    todo.append((spec, path))
    lock = threading.Lock()

    def one(spec: dict, path: Path) -> None:
        print(f"[bench] {spec['method']} lr={spec['lr']:g} seed={spec['seed']} ...",
              file=sys.stderr, flush=True)
        result = run_contender(Path(__file__).resolve(), spec)
        record = {**spec, "jobs": args.jobs, **{k: v for k, v in result.items() if k != "spec"}}
        if "error" in record:
            print(f"[bench]   failed: {record['error']}", file=sys.stderr, flush=True)
        else:
            write_json(path, record)
            print(f"[bench]   {spec['method']} lr={spec['lr']:g} seed={spec['seed']}: held-out "
                  f"{record['held_out_accuracy']:.4f} test {record['test_accuracy']:.4f} "
                  f"({record['wall_s']:.0f}s)", file=sys.stderr, flush=True)
        with lock:
            records.append(record)
            # the table so far, so that an interrupted run still leaves a report
            _report(args, sizes, seeds, grids, records, methods)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(one, spec, path) for spec, path in todo]:
            future.result()
    _report(args, sizes, seeds, grids, records, methods, final=True)


def _report(args, sizes, seeds, grids, records, methods, final: bool = False) -> None:
    from upcycle.io.writing import atomic_file, write_json

    rows, table = summarize(records, methods)
    stem = f"tune_accuracy_{args.setting}" + (f"_{args.tag}" if args.tag else "")
    protocol = (f"setting {args.setting} tokens; sizes {sizes} (None = the whole 60/20/20 part); "
                f"seeds {seeds}; lr grids {json.dumps(grids)}; max epochs {args.max_epochs}, "
                f"patience {args.patience}; batch {BATCH}, AdamW wd 0.01, constant lr; "
                f"device {args.device}, 1 torch thread")
    jobs = max((r.get("jobs", 1) for r in records), default=1)
    if jobs > 1:
        protocol += (f"; up to {jobs} runs at a time on the device, so s / epoch compares "
                     f"methods within this table only")
    done = sum(1 for r in records if "error" not in r)
    expected = len(seeds) * sum(len(grids[METHODS[m][0]]) for m in methods)
    md = (f"# tune_accuracy, setting {args.setting}\n\n{protocol}\n\n"
          f"runs done: {done} of {expected}{'' if final else ' (in progress)'}\n\n{table}\n")
    if final:
        print(md)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    with atomic_file(results / f"{stem}.md") as tmp:
        Path(tmp).write_text(md)
    slim = [{k: v for k, v in r.items() if k != "test_correct"} for r in records]
    write_json(results / f"{stem}.json", {"protocol": protocol, "argv": sys.argv, "rows": rows,
                                          "runs": slim, "table": table})


if __name__ == "__main__":
    main()
