"""``upcycle tune``: fine-tune a HF classification model with a memory-efficient method.

    upcycle tune --method snell --model HF_DIR --data train.jsonl --out runs/snell \\
        [--r 8 --sparsity 0.5] [--held-out FILE | --held-out-fraction 0.1] [--test FILE] [--merge]

Trains on ``--data`` (the task formats of ``upcycle soup``: CSV/JSONL text or NPZ images),
reports the held-out (and test) metric, training time and peak memory, and writes into
``--out``: ``adapter/`` (the method's adapter folder), ``merged/`` with ``--merge`` (a plain
HF model folder that ``from_pretrained`` loads) and ``report.json``. Under ``torchrun`` it
trains data-parallel (DDP; gloo on CPU, NCCL on GPU) and only rank 0 writes.

Each method is one entry of :data:`METHODS`: its argument group and a function that turns
the loaded HF model into the tuned model (an ``nn.Module`` with the HF forward, plus
``save_pretrained(dir, overwrite=)`` and ``print_trainable_parameters()``;
``merge_and_unload()`` when it supports ``--merge``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..errors import UpcycleError


@dataclass(frozen=True)
class TuneMethod:
    help: str
    add_arguments: Callable[[argparse._ArgumentGroup], None]
    build: Callable[[nn.Module, argparse.Namespace], nn.Module]
    """(loaded HF classification model, parsed args) -> the tuned model."""
    default_lr: float


# -- SNELL ------------------------------------------------------------------------------------

def _snell_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--r", type=int, default=8, help="rank of A and B (default 8)")
    group.add_argument("--num-pieces", type=int, default=2,
                       help="pieces of the piecewise-linear kernel; r must be divisible by it")
    group.add_argument("--sparsity", type=float, default=0.5,
                       help="fraction of each delta_W zeroed every step, in [0, 1); 0 = dense "
                            "kernelized LoRA (default 0.5)")
    group.add_argument("--sparsify-mode", choices=("reference", "paper"), default="reference",
                       help="'reference' (released code, default) or 'paper' (Eq. 5 soft "
                            "threshold)")
    group.add_argument("--learnable-coeffs", action="store_true",
                       help="train the kernel's piece coefficients (default: fixed +-0.1)")
    group.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                       help="modules to adapt (names or dotted endings); default: the model "
                            "family's q, k, v, attention output and MLP matrices")
    group.add_argument("--target-regex", default=None, metavar="REGEX",
                       help="modules to adapt, as one regex over full module names")
    group.add_argument("--modules-to-save", nargs="*", default=None, metavar="NAME",
                       help="modules trained in full and saved (default: the classifier head)")
    group.add_argument("--dropout", type=float, default=0.1,
                       help="dropout on the adapter input (default 0.1)")
    group.add_argument("--drop-path", type=float, default=0.1,
                       help="DropPath on the adapter output (default 0.1)")
    group.add_argument("--no-recompute", action="store_true",
                       help="store delta_W for backward instead of recomputing it (more memory)")


def _build_snell(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from ..tune.snell import SnellConfig, get_snell_model

    if args.target_modules and args.target_regex:
        raise UpcycleError("give --target-modules or --target-regex, not both")
    config = SnellConfig(
        r=args.r, num_pieces=args.num_pieces, sparsity=args.sparsity,
        sparsify_mode=args.sparsify_mode, learnable_coeffs=args.learnable_coeffs,
        target_modules=args.target_regex or args.target_modules,
        modules_to_save=args.modules_to_save, dropout=args.dropout, drop_path=args.drop_path,
        recompute=not args.no_recompute,
    )
    return get_snell_model(model, config)


# -- SHERL ------------------------------------------------------------------------------------

def _sherl_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--late-layers", type=int, default=1, metavar="M",
                       help="the last M pretrained layers form the late route (default 1)")
    group.add_argument("--reduction", type=int, default=4,
                       help="MTSA inner width = hidden size / reduction (default 4)")
    group.add_argument("--train-late-layers", action="store_true",
                       help="also train the late pretrained layers (default: frozen)")
    group.add_argument("--taps", type=int, nargs="+", default=None, metavar="I",
                       help="hidden states fed to the MTSA: 0 = embedding output, i = output of "
                            "early layer i (default: all of them)")


def _build_sherl(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from ..tune.sherl import SherlConfig, get_sherl_model

    config = SherlConfig(late_layers=args.late_layers, taps=args.taps, reduction=args.reduction,
                         train_late_layers=args.train_late_layers)
    return get_sherl_model(model, config)


METHODS: dict[str, TuneMethod] = {
    "snell": TuneMethod(help="SNELL: sparse tuning with kernelized LoRA",
                        add_arguments=_snell_arguments, build=_build_snell, default_lr=1e-3),
    "sherl": TuneMethod(help="SHERL: frozen early route fused by an MTSA, then the last "
                             "pretrained layers (memory-efficient)",
                        add_arguments=_sherl_arguments, build=_build_sherl, default_lr=3e-3),
}


# -- the command -------------------------------------------------------------------------------

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="fine-tune a classifier with little memory (SNELL, SHERL)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--method", required=True, choices=sorted(METHODS),
                        help="the tuning method")
    parser.add_argument("--model", required=True, metavar="HF_DIR",
                        help="HuggingFace model folder (with or without a classification head)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="training data: .csv/.jsonl with text,label or .npz with "
                             "images,labels")
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--held-out", metavar="FILE", default=None,
                      help="held-out data for the reported metric")
    held.add_argument("--held-out-fraction", type=float, default=0.1,
                      help="fraction of --data held out when --held-out is not given")
    parser.add_argument("--test", metavar="FILE", default=None,
                        help="test data, only reported (never used for any choice)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the held-out split, the shuffling, a new head and the "
                             "adapter init")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: the method's, SNELL 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.01,
                        help="AdamW weight decay on matrices")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="global batch size (split over ranks under torchrun)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="token limit for text tasks")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: adapter/, merged/ (with --merge), report.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--merge", action="store_true",
                        help="also write merged/: a plain HF model folder with the update "
                             "folded in")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, method in sorted(METHODS.items()):
        method.add_arguments(parser.add_argument_group(f"{name} options", method.help))
    parser.set_defaults(func=run)


def _global_batches(task, data, batch_size: int, seed: int, world: int) -> list[dict]:
    """Shuffled global batches; each rank tokenises only its contiguous share of each batch,
    so every rank takes the same number of steps."""
    order = np.random.default_rng(seed).permutation(len(data))
    batches = []
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        if len(index) < world:  # too small to give every rank an example
            continue
        mine = distributed.shard(index)
        batches.append(task.batches(data.subset(mine), len(mine))[0])
    if not batches:
        raise UpcycleError(f"training data {data.source}: {len(data)} examples give no batch of "
                           f"at least {world} (one per rank)")
    return batches


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UpcycleError(f"output {out} already exists and is not empty; pass --overwrite to "
                           f"replace it")


def _save_merged(merged: nn.Module, task, folder: Path) -> None:
    from ..checkpoints import copy_model_files

    folder.mkdir(parents=True)
    copy_model_files(task.model_dir, folder)  # tokenizer / preprocessor files
    merged.save_pretrained(folder, safe_serialization=True)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import atomic_dir, write_json
    from ..memory import current_rss_mb, peak_rss_mb
    from ..tasks import classification_loss, evaluate, load_task, logits_of
    from ..train import TrainConfig, train
    from ..tune.common import count_parameters

    method = METHODS[args.method]
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.max_steps is not None and args.max_steps < 1:
        raise UpcycleError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.epochs < 1:
        raise UpcycleError(f"--epochs must be >= 1, got {args.epochs}")
    is_distributed = distributed.init_from_env()
    world = distributed.world_size()
    main_rank = distributed.is_main()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main_rank and not args.quiet \
        else (lambda *a: None)

    task = load_task(args.model, args.data, max_length=args.max_length, head_seed=args.seed)
    train_data = task.read(args.data, split="training", fix_num_labels=True)
    if args.held_out:
        held_out = task.read(args.held_out, split="held-out")
    else:
        train_data, held_out = task.split(train_data, args.held_out_fraction, seed=args.seed)
    test = task.read(args.test, split="test") if args.test else None

    torch.manual_seed(args.seed)
    model = task.load_model()
    rss_after_load = current_rss_mb()
    tuned = method.build(model, args)
    trainable, total = count_parameters(tuned)
    if main_rank and not args.quiet:
        tuned.print_trainable_parameters()

    batches = _global_batches(task, train_data, args.batch_size, args.seed, world)
    held_batches = distributed.shard(task.batches(held_out, args.batch_size))
    test_batches = distributed.shard(task.batches(test, args.batch_size)) if test else None
    trained = tuned
    if is_distributed:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(tuned)
    config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps,
                         lr=args.lr if args.lr is not None else method.default_lr,
                         weight_decay=args.weight_decay, seed=args.seed,
                         progress=not args.quiet, desc=f"tune {args.method}")
    say(f"training {args.method} on {len(train_data)} examples ({world} rank(s)), held-out "
        f"{len(held_out)}" + (f", test {len(test)}" if test else ""))
    result = train(trained, batches, classification_loss, config)
    peak_train = peak_rss_mb()
    tuned.eval()
    held_metrics = evaluate(tuned, held_batches)
    test_metrics = evaluate(tuned, test_batches) if test_batches is not None else None

    report = {
        "method": args.method,
        "model": str(args.model),
        "data": str(args.data),
        "held_out": held_out.source,
        "test": str(args.test) if args.test else None,
        "examples": {"train": len(train_data), "held_out": len(held_out),
                     "test": len(test) if test else None},
        "world_size": world,
        "steps": result.steps,
        "lr": config.lr,
        "batch_size": args.batch_size,
        "train_seconds": result.seconds,
        "seconds_per_step": result.seconds / max(1, result.steps),
        "final_train_loss": result.losses[-1] if result.losses else None,
        "peak_rss_mb": peak_train,
        "peak_rss_above_model_mb": peak_train - rss_after_load,
        "trainable_params": trainable,
        "all_params": total,
        "held_out_metrics": held_metrics,
        "test_metrics": test_metrics,
        "method_config": {k: v for k, v in vars(args).items()
                          if k not in ("func", "command")},
    }
    if main_rank:
        with atomic_dir(out, overwrite=args.overwrite) as tmp:
            tuned.save_pretrained(tmp / "adapter", overwrite=True)
            report["adapter"] = str(out / "adapter")
            if args.merge:
                if not hasattr(tuned, "merge_and_unload"):
                    raise UpcycleError(f"--merge: the {args.method} model cannot be merged into "
                                       f"a plain model")
                probe = held_batches[0] if held_batches else task.batches(held_out, 4)[0]
                with torch.no_grad():
                    before = logits_of(tuned, probe)
                    merged = tuned.merge_and_unload()
                    after = logits_of(merged, probe)
                report["merge_max_abs_logit_diff"] = float((after - before).abs().max())
                _save_merged(merged, task, tmp / "merged")
                report["merged"] = str(out / "merged")
            write_json(tmp / "report.json", report)
        rows = [
            ("method", args.method),
            ("trainable params", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"),
            ("steps", f"{result.steps} (batch {args.batch_size}, {world} rank(s))"),
            ("train time", f"{result.seconds:.1f} s ({report['seconds_per_step']:.3f} s/step)"),
            ("peak RSS", (f"{peak_train:.0f} MB ({report['peak_rss_above_model_mb']:.0f} MB "
                          f"above the loaded model)")),
            ("held-out accuracy", (f"{held_metrics['accuracy']:.4f} (n={held_metrics['n']}, "
                                   f"loss {held_metrics['loss']:.4f})")),
        ]
        if test_metrics is not None:
            rows.append(("test accuracy", (f"{test_metrics['accuracy']:.4f} "
                                           f"(n={test_metrics['n']}, loss "
                                           f"{test_metrics['loss']:.4f})")))
        rows.append(("output", str(out)))
        print(_table(rows), flush=True)
    distributed.barrier()
    return 0
