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

The job itself is :func:`upcycle.jobs.tune.run_tune`; this module parses the flags into a
:class:`~upcycle.jobs.tune.TuneJob` and prints the summary. Each method is one entry of
:data:`upcycle.tune.TUNERS`; its flags come from its config dataclass
(:mod:`upcycle.cli.dataclass_args`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import UpcycleError
from ..jobs.tune import TuneJob, TuneResult, run_tune
from ..runtime import distributed
from ..runtime.devices import add_device_arguments
from ..training.runs import checkpoint_step, checkpoints_folder
from ..tune import TUNERS, Tuner
from ..tune.snell import SnellConfig, get_snell_model
from .arguments import add_checkpoint_arguments, add_task_arguments
from .configfile import add_config_option, command_line, resolved_config
from .dataclass_args import add_dataclass_arguments, config_from_args
from .interrupt import interrupt_callback

# -- SNELL's flags, written by hand until SnellConfig's fields document them ------------------

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


def _snell_config(args: argparse.Namespace) -> SnellConfig:
    if args.target_modules and args.target_regex:
        raise UpcycleError("give --target-modules or --target-regex, not both")
    return SnellConfig(
        r=args.r, num_pieces=args.num_pieces, sparsity=args.sparsity,
        sparsify_mode=args.sparsify_mode, learnable_coeffs=args.learnable_coeffs,
        target_modules=args.target_regex or args.target_modules,
        modules_to_save=args.modules_to_save, dropout=args.dropout, drop_path=args.drop_path,
        recompute=not args.no_recompute, block_mb=args.block_mb,
        compile=args.snell_compile,
    )


def _build_snell(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    return get_snell_model(model, _snell_config(args))


# -- the tuners' flags ---------------------------------------------------------------------------

_HAND_WRITTEN: dict[str, tuple[Callable[[argparse._ArgumentGroup], None],
                               Callable[[argparse.Namespace], object]]] = {
    "snell": (_snell_arguments, _snell_config),
}
"""Tuners whose flags are still written by hand: name -> (add the flags, the config from
the parsed flags). Every other tuner's flags come from its config dataclass."""


def _add_tuner_arguments(group: argparse._ArgumentGroup, tuner: Tuner) -> None:
    add, _ = _HAND_WRITTEN.get(tuner.name, (None, None))
    if add is not None:
        add(group)
    else:
        add_dataclass_arguments(group, tuner.config_class)


def tuner_config(tuner: Tuner, args: argparse.Namespace):
    """The config object of ``tuner`` that the parsed flags describe."""
    _, build = _HAND_WRITTEN.get(tuner.name, (None, None))
    return build(args) if build is not None else config_from_args(tuner.config_class, args)


def _short_float(value: float) -> str:
    """3e-3, not 0.003: a learning rate as people write it."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


# -- the command -------------------------------------------------------------------------------

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="fine-tune a classifier or causal LM with little memory (SNELL, SHERL)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--method", required=True, choices=sorted(TUNERS),
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
                        help="peak learning rate (default: the method's, " + ", ".join(
                            f"{t.name.upper()} {_short_float(t.default_lr)}"
                            for t in TUNERS.values()) + ")")
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
    for name, tuner in sorted(TUNERS.items()):
        _add_tuner_arguments(parser.add_argument_group(f"{name} options", tuner.help), tuner)
    add_config_option(parser, command="tune")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tuner = TUNERS[args.method]
    out = Path(args.out)
    job = config_from_args(
        TuneJob, args, tuner_config=tuner_config(tuner, args), settings=vars(args),
        config=resolved_config(args), command=command_line("tune"))
    callback = interrupt_callback(checkpoints_folder(out), f"upcycle tune --out {out} ...")
    result = run_tune(job, callbacks=[callback])
    if distributed.is_main():
        print(_table(summary_rows(result)), flush=True)
    return 0


def summary_rows(result: TuneResult) -> list[tuple[str, str]]:
    """The rows of the summary table that ``upcycle tune`` prints."""
    report = result.report
    trainable, total = report["trainable_params"], report["all_params"]
    resumed = report["resumed_from"]
    rows = [
        ("method", report["method"]),
        ("trainable params", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"),
        ("steps", f"{report['steps']} (batch {report['batch_size']}, {report['world_size']} "
                  f"rank(s))"
         + (f", resumed from step {checkpoint_step(Path(resumed))}" if resumed else "")),
        ("train time", f"{report['train_seconds']:.1f} s ({report['seconds_per_step']:.3f} "
                       f"s/step)"),
        ("peak RSS", (f"{report['peak_rss_mb']:.0f} MB ({report['peak_rss_above_model_mb']:.0f}"
                      f" MB above the loaded model)")),
    ]
    if report["peak_gpu_memory_mb"] is not None:
        rows.append(("peak GPU memory", f"{report['peak_gpu_memory_mb']:.0f} MB"))
    if report["best_step"] is not None:
        rows.append(("best checkpoint", f"step {report['best_step']} (held-out loss "
                                        f"{result.fit.best_metric:.4f})"))
    for split, metrics in (("held-out", report["held_out_metrics"]),
                           ("test", report["test_metrics"])):
        if metrics is not None:  # "accuracy 0.9 (n=...)" -> ("held-out accuracy", "0.9 (n=...)")
            name, value = result.task.describe(metrics).split(" ", 1)
            rows.append((f"{split} {name}", value))
    rows.append(("output", str(result.out)))
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)
