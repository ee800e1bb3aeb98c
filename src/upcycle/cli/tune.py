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

from ..errors import UpcycleError
from ..jobs.tune import TuneJob, TuneResult, run_tune
from ..runtime import distributed
from ..runtime.devices import add_device_arguments
from ..training.runs import checkpoint_step, checkpoints_folder
from ..tune import TUNERS, Tuner
from .arguments import add_checkpoint_arguments, add_task_arguments
from .configfile import add_config_option, command_line, resolved_config
from .dataclass_args import add_dataclass_arguments, config_from_args
from .interrupt import interrupt_callback

# -- the tuners' flags: from each config dataclass ------------------------------------------

def _add_target_regex(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--target-regex", default=None, metavar="REGEX",
                       help="modules to adapt, as one regex over full module names")


def _target_modules(args: argparse.Namespace) -> dict:
    if args.target_modules and args.target_regex:
        raise UpcycleError("give --target-modules or --target-regex, not both")
    return {"target_modules": args.target_regex or args.target_modules}


_EXTRA_FLAGS: dict[str, tuple[Callable[[argparse._ArgumentGroup], None],
                              Callable[[argparse.Namespace], dict]]] = {
    "snell": (_add_target_regex, _target_modules),
}
"""Flags of a tuner beyond its config's fields: name -> (add them, the config fields they
set). SNELL's ``target_modules`` is a list of names or one regex: --target-modules or
--target-regex."""


def add_tuner_arguments(group: argparse._ArgumentGroup, tuner: Tuner) -> None:
    add_dataclass_arguments(group, tuner.config_class)
    if tuner.name in _EXTRA_FLAGS:
        _EXTRA_FLAGS[tuner.name][0](group)


def tuner_config(tuner: Tuner, args: argparse.Namespace):
    """The config object of ``tuner`` that the parsed flags describe."""
    overrides = _EXTRA_FLAGS[tuner.name][1](args) if tuner.name in _EXTRA_FLAGS else {}
    return config_from_args(tuner.config_class, args, **overrides)


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
        add_tuner_arguments(parser.add_argument_group(f"{name} options", tuner.help), tuner)
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
