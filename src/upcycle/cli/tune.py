"""``upcycle tune``: fine-tune a HF classifier or causal LM with a memory-efficient method.

    upcycle tune --method snell --model HF_DIR --data train.jsonl --out runs/snell \\
        [--r 8 --sparsity 0.5] [--held-out FILE | --held-out-fraction 0.1] [--test FILE] \\
        [--merge] [--device cuda --bf16 --grad-accum 4 --eval-steps 100 --save-steps 100]

Trains on ``--data`` (the task formats of ``upcycle soup``: CSV/JSONL text or NPZ images for
classification; for a causal LM, chosen from the model's config or ``--task causal-lm``:
.txt, or CSV/JSONL with text or prompt,completion, trained on the token loss) with
``transformers.Trainer`` (:mod:`upcycle.training`), reports the held-out (and test)
metric (accuracy, or loss and perplexity), training time and peak memory, and writes into
``--out``: ``adapter/`` (the method's
adapter folder), ``merged/`` with ``--merge`` (a plain HF model folder that
``from_pretrained`` loads), ``report.json`` and ``runs/`` (TensorBoard logs, when it is
installed). Checkpoints during the run go to
``<out>.checkpoints/`` (``--save-steps``; ``--resume`` continues from the latest); nothing
appears at ``--out`` before the run is complete. Under ``torchrun`` it trains data-parallel
(DDP; gloo on CPU, NCCL on GPU) and only rank 0 writes.

Each method is one entry of :data:`METHODS`: its argument group and a function that turns
the loaded HF model into the tuned model (an ``nn.Module`` with the HF forward, plus
``save_pretrained(dir, overwrite=)`` and ``print_trainable_parameters()``;
``merge_and_unload()`` when it supports ``--merge``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UpcycleError
from ..runtime import distributed
from ..runtime.devices import add_device_arguments
from ..training.runs import check_resume, checkpoints_folder, run_fingerprint
from ..tune.snell import DEFAULT_LR as SNELL_DEFAULT_LR
from .arguments import add_checkpoint_arguments, add_task_arguments
from .configfile import add_config_option, command_line, resolved_config
from .interrupt import interrupt_callback


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
                       help="modules trained in full and saved (default: the classifier head; "
                            "none for a language model, whose head stays frozen)")
    group.add_argument("--dropout", type=float, default=0.1,
                       help="dropout on the adapter input (default 0.1)")
    group.add_argument("--drop-path", type=float, default=0.1,
                       help="DropPath on the adapter output (default 0.1)")
    group.add_argument("--no-recompute", action="store_true",
                       help="store delta_W for backward instead of recomputing it (more memory)")
    group.add_argument("--block-mb", type=float, default=None, metavar="MIB",
                       help="MiB of delta_W's rows built at once in forward, backward and "
                            "merge (default 4 on a CPU, 16 on CUDA; a layer's transient is "
                            "about six blocks)")
    group.add_argument("--snell-compile", action="store_true",
                       help="compute SNELL's kernel with torch.compile (one fused loop; needs a "
                            "C++ compiler on a CPU, triton on CUDA; a one-time compile)")


def _build_snell(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from ..tune.snell import SnellConfig, get_snell_model

    if args.target_modules and args.target_regex:
        raise UpcycleError("give --target-modules or --target-regex, not both")
    config = SnellConfig(
        r=args.r, num_pieces=args.num_pieces, sparsity=args.sparsity,
        sparsify_mode=args.sparsify_mode, learnable_coeffs=args.learnable_coeffs,
        target_modules=args.target_regex or args.target_modules,
        modules_to_save=args.modules_to_save, dropout=args.dropout, drop_path=args.drop_path,
        recompute=not args.no_recompute, block_mb=args.block_mb,
        compile=args.snell_compile,
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
                        add_arguments=_snell_arguments, build=_build_snell,
                        default_lr=SNELL_DEFAULT_LR),
    "sherl": TuneMethod(help="SHERL: frozen early route fused by an MTSA, then the last "
                             "pretrained layers (memory-efficient)",
                        add_arguments=_sherl_arguments, build=_build_sherl, default_lr=3e-3),
}


# -- the command -------------------------------------------------------------------------------

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="fine-tune a classifier or causal LM with little memory (SNELL, SHERL)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--method", required=True, choices=sorted(METHODS),
                        help="the tuning method")
    parser.add_argument("--model", required=True, metavar="HF_DIR",
                        help="HuggingFace model folder (with or without a classification head)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="training data: .csv/.jsonl with text,label or .npz with "
                             "images,labels (classification); .txt, or .csv/.jsonl with text "
                             "or prompt,completion (causal LM: loss on the completion only)")
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
    parser.add_argument("--epochs", type=float, default=1, help="passes over the training data")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: the method's, SNELL 3e-3, SHERL 3e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.01,
                        help="AdamW weight decay on matrices")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="examples per optimizer step, over all ranks and --grad-accum "
                             "micro-batches (must divide evenly)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="N",
                        help="gradient accumulation: N micro-batches per optimizer step")
    parser.add_argument("--eval-steps", type=int, default=None, metavar="N",
                        help="evaluate on the held-out data every N steps and keep the best "
                             "checkpoint (lowest held-out loss), which is the one written")
    add_checkpoint_arguments(parser, save_default=" (default: --eval-steps)")
    parser.add_argument("--logging-steps", type=int, default=10, metavar="N",
                        help="log the loss every N steps (console, report.json, TensorBoard "
                             "when installed)")
    add_task_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: adapter/, merged/ (with --merge), report.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--merge", action="store_true",
                        help="also write merged/: a plain HF model folder with the update "
                             "folded in")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_arguments(parser)
    for name, method in sorted(METHODS.items()):
        method.add_arguments(parser.add_argument_group(f"{name} options", method.help))
    add_config_option(parser, command="tune")
    parser.set_defaults(func=run)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UpcycleError(f"output {out} already exists and is not empty; pass --overwrite to "
                           f"replace it")


def _save_merged(merged: nn.Module, task, folder: Path) -> None:
    from ..io.writing import copy_model_files
    from ..tasks import is_lm_task

    folder.mkdir(parents=True)
    copy_model_files(task.model_dir, folder)  # tokenizer / preprocessor files
    merged.save_pretrained(folder, safe_serialization=True)
    if is_lm_task(task):  # with its pad token (EOS when it had none), as config.pad_token_id
        task.tokenizer.save_pretrained(folder)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..io.writing import atomic_dir, write_json
    from ..jobs.finetune import train_task
    from ..runtime.devices import check_precision, resolve_device, resolve_dtype
    from ..runtime.memory import current_rss_mb, peak_rss_mb
    from ..tasks import evaluate_task, is_lm_task, load_task
    from ..tasks.classification import logits_of
    from ..training.config import TrainingConfig
    from ..tune.adapter import adapter_card, count_parameters

    method = METHODS[args.method]
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if args.max_steps is not None and args.max_steps < 1:
        raise UpcycleError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.epochs > 0:
        raise UpcycleError(f"--epochs must be > 0, got {args.epochs}")
    for flag in ("grad_accum", "eval_steps", "save_steps", "logging_steps", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UpcycleError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    device = resolve_device(args.device)
    precision = check_precision(device, bf16=args.bf16, fp16=args.fp16)
    dtype = resolve_dtype(args.dtype)
    folder = checkpoints_folder(out)
    check_resume(args.resume, folder)
    distributed.init_from_env(device)
    world = distributed.world_size()
    main_rank = distributed.is_main()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main_rank and not args.quiet \
        else (lambda *a: None)

    task = load_task(args.model, args.data, max_length=args.max_length, head_seed=args.seed,
                     task=args.task, chunk=args.chunk)
    lm = is_lm_task(task)
    if lm and args.method == "sherl":
        raise UpcycleError(f"--method sherl tunes classifiers; {args.model} is a causal LM "
                           f"(use --method snell, or --task classification for a new head)")
    train_data = (task.read(args.data, split="training") if lm else
                  task.read(args.data, split="training", fix_num_labels=True))
    if args.held_out:
        held_out = task.read(args.held_out, split="held-out")
    else:
        train_data, held_out = task.split(train_data, args.held_out_fraction, seed=args.seed)
    test = task.read(args.test, split="test") if args.test else None

    torch.manual_seed(args.seed)
    model = task.load_model(dtype=dtype)
    rss_after_load = current_rss_mb()
    tuned = method.build(model, args)
    if args.merge and not hasattr(tuned, "merge_and_unload"):  # refuse before training
        raise UpcycleError(f"--merge: a {args.method} model cannot be merged into a plain model "
                           f"(it is not a weight update); drop --merge")
    trainable, total = count_parameters(tuned)
    if main_rank and not args.quiet:
        tuned.print_trainable_parameters()

    config = TrainingConfig(
        epochs=args.epochs, max_steps=args.max_steps,
        lr=args.lr if args.lr is not None else method.default_lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
        eval_steps=args.eval_steps, save_steps=args.save_steps,
        logging_steps=args.logging_steps, seed=args.seed, device=device, bf16=args.bf16,
        fp16=args.fp16, progress=not args.quiet)
    config.micro_batch(world)  # a batch size that does not split is an error before training
    say(f"training {args.method} on {len(train_data)} examples ({world} rank(s), {device}"
        + (f", {precision} autocast" if precision else "") + f"), held-out {len(held_out)}"
        + (f", test {len(test)}" if test else ""))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train_task(
        tuned, task, train_data, config, eval_data=held_out if args.eval_steps else None,
        output_dir=folder, resume=args.resume,
        fingerprint=run_fingerprint(args, {"model": args.model, "data": args.data,
                                           "held_out": args.held_out}),
        overwrite=args.overwrite,
        callbacks=[interrupt_callback(folder, f"upcycle tune --out {out} ...")])
    peak_train = peak_rss_mb()
    tuned.eval()
    held_batches = distributed.shard(task.batches(held_out, args.batch_size))
    test_batches = distributed.shard(task.batches(test, args.batch_size)) if test else None
    held_metrics = evaluate_task(task, tuned, held_batches)
    test_metrics = (evaluate_task(task, tuned, test_batches) if test_batches is not None
                    else None)
    best_step = None
    if result.best_checkpoint:
        best_step = int(Path(result.best_checkpoint).name.rsplit("-", 1)[-1])

    report = {
        "method": args.method,
        "task": "causal-lm" if lm else "classification",
        "model": str(args.model),
        "data": str(args.data),
        "held_out": held_out.source,
        "test": str(args.test) if args.test else None,
        "examples": {"train": len(train_data), "held_out": len(held_out),
                     "test": len(test) if test else None},
        "world_size": world,
        "device": str(device),
        "dtype": args.dtype,
        "precision": precision,
        "steps": result.steps,
        "steps_this_run": len(result.step_losses),
        "resumed_from": result.resumed_from,
        "best_step": best_step,
        "lr": config.lr,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "train_seconds": result.seconds,
        "seconds_per_step": result.seconds / max(1, len(result.step_losses)),
        "final_train_loss": result.last_loss,
        "peak_rss_mb": peak_train,
        "peak_rss_above_model_mb": peak_train - rss_after_load,
        "peak_gpu_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                               if device.type == "cuda" else None),
        "trainable_params": trainable,
        "all_params": total,
        "held_out_metrics": held_metrics,
        "test_metrics": test_metrics,
        "log_history": result.log_history,
        "method_config": {k: v for k, v in vars(args).items()
                          if k not in ("func", "command")},
        "config": resolved_config(args), "command": command_line("tune"),
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
                probe = {k: v.to(device) for k, v in probe.items()}
                with torch.no_grad():
                    before = logits_of(tuned, probe)
                    merged = tuned.merge_and_unload()
                    after = logits_of(merged, probe)
                report["merge_max_abs_logit_diff"] = float((after - before).abs().max())
                _save_merged(merged, task, tmp / "merged")
                report["merged"] = str(out / "merged")
            if (folder / "runs").is_dir():  # TensorBoard logs, when it is installed
                shutil.copytree(folder / "runs", tmp / "runs")
            write_json(tmp / "report.json", report)
            for folder_name in ("adapter", "merged"):
                if (tmp / folder_name).is_dir():
                    (tmp / folder_name / "README.md").write_text(
                        adapter_card(report, report["command"]))
        shutil.rmtree(folder, ignore_errors=True)  # the run is complete: its checkpoints go
        rows = [
            ("method", args.method),
            ("trainable params", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"),
            ("steps", f"{result.steps} (batch {args.batch_size}, {world} rank(s))"
             + (f", resumed from step {_step_of(result.resumed_from)}"
                if result.resumed_from else "")),
            ("train time", f"{result.seconds:.1f} s ({report['seconds_per_step']:.3f} s/step)"),
            ("peak RSS", (f"{peak_train:.0f} MB ({report['peak_rss_above_model_mb']:.0f} MB "
                          f"above the loaded model)")),
        ]
        if report["peak_gpu_memory_mb"] is not None:
            rows.append(("peak GPU memory", f"{report['peak_gpu_memory_mb']:.0f} MB"))
        if best_step is not None:
            rows.append(("best checkpoint", f"step {best_step} (held-out loss "
                                            f"{result.best_metric:.4f})"))
        for split, metrics in (("held-out", held_metrics), ("test", test_metrics)):
            if metrics is None:
                continue
            if lm:
                rows.append((f"{split} perplexity", (f"{metrics['perplexity']:.3f} (loss "
                                                     f"{metrics['loss']:.4f}, "
                                                     f"{metrics['tokens']} tokens)")))
            else:
                rows.append((f"{split} accuracy", (f"{metrics['accuracy']:.4f} "
                                                   f"(n={metrics['n']}, loss "
                                                   f"{metrics['loss']:.4f})")))
        rows.append(("output", str(out)))
        print(_table(rows), flush=True)
    distributed.barrier()
    return 0


def _step_of(checkpoint: str | None) -> str:
    return Path(checkpoint).name.rsplit("-", 1)[-1] if checkpoint else "?"
