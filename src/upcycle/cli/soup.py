"""``upcycle soup``: combine fine-tuned checkpoints of one model into one model.

Classification models (held-out accuracy) or causal LMs (held-out token loss and
perplexity; chosen from the model's config, or ``--task causal-lm``); full checkpoints and
peft LoRA adapter folders (on ``--base``) may be mixed."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..errors import UpcycleError
from ..io.writing import check_output, write_json
from ..jobs.bench import format_table
from ..runtime import distributed
from ..runtime.devices import add_device_arguments, check_precision, resolve_device
from ..soup import METHODS, MehlConfig
from ..soup.resume import checkpoint_path
from .arguments import add_task_arguments
from .configfile import add_config_option, command_line, resolved_config

DEFAULT_MODEL_BATCH = MehlConfig.model_batch  # the reference K: 18

REPORT_COLUMNS = [
    ("method", "method", ""), ("held_out_accuracy", "held-out acc", ".4f"),
    ("held_out_loss", "held-out loss", ".4f"), ("test_accuracy", "test acc", ".4f"),
    ("seconds", "time (s)", ".1f"), ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
]
LM_REPORT_COLUMNS = [
    ("method", "method", ""), ("held_out_loss", "held-out loss", ".4f"),
    ("held_out_perplexity", "held-out ppl", ".3f"), ("test_loss", "test loss", ".4f"),
    ("test_perplexity", "test ppl", ".3f"), ("seconds", "time (s)", ".1f"),
    ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
]


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soup", help="combine N fine-tuned checkpoints of one model",
        description="Combine fine-tuned checkpoints of one model (uniform, greedy, learned, "
                    "learned+, mehl, mehl+). Ingredients: .safetensors/.bin/.pt files, HF model "
                    "folders, peft LoRA adapter folders (with --base), folders of checkpoints, "
                    "or globs. Classification models or causal LMs (chosen from the model's "
                    "config).",
    )
    p.add_argument("ingredients", nargs="+", metavar="INGREDIENT")
    p.add_argument("--method", choices=METHODS, default="uniform")
    p.add_argument("--out", required=True, help="output: a folder (HF layout) or a .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--base", metavar="HF_DIR", default=None,
                   help="the base model of peft LoRA adapter ingredients (each enters the soup "
                        "as base + scale * B @ A); also searched for a causal LM's tokenizer")
    data = p.add_argument_group("data (needed by greedy, learned and mehl)")
    data.add_argument("--held-out", help="held-out split the soup is fitted on: CSV/JSONL with "
                                         "text,label or .npz (classification); .txt, or "
                                         "CSV/JSONL with text or prompt,completion (causal LM)")
    data.add_argument("--data", help="a data file to carve the held-out split from")
    data.add_argument("--held-out-fraction", type=float, default=None,
                      help="fraction of --data used as held-out (the rest is reported as test "
                           "unless --test is given)")
    data.add_argument("--test", help="test split: only reported, never fitted")
    data.add_argument("--model", help="HF model folder with the config/tokenizer (default: the "
                                      "first ingredient, when it is a HF folder)")
    add_task_arguments(data)
    data.add_argument("--batch-size", type=int, default=128, help="held-out batch size")
    fit = p.add_argument_group("learned / MEHL options")
    fit.add_argument("--model-batch", "-K", type=int, default=None,
                     help=f"MEHL: ingredients loaded per round (K) (default: "
                          f"min({DEFAULT_MODEL_BATCH}, the number of ingredients))")
    fit.add_argument("--epochs", type=int, default=5, help="epochs over held-out (per MEHL round)")
    fit.add_argument("--models-epochs", type=int, default=1, help="MEHL: passes over all ingredients")
    fit.add_argument("--lr", type=float, default=None,
                     help="coefficient learning rate (default: learned 0.05, mehl 0.01)")
    fit.add_argument("--grad-clip", type=float, default=None,
                     help="MEHL: clip the weight-gradient norm (reference: 1.0 for ViTs)")
    fit.add_argument("--compact-directions", action="store_true",
                     help="MEHL: keep the K directions in the ingredients' dtype (half the "
                          "memory for bf16/fp16 checkpoints); coefficients stay fp32")
    fit.add_argument("--shard-directions", action="store_true",
                     help="MEHL under torchrun with W processes: each keeps K/W of the round's "
                          "directions (for K larger than one device holds); per step the "
                          "combined weights and the weight gradient are all-reduced. Needs "
                          "K >= W")
    fit.add_argument("--resume", action="store_true",
                     help="MEHL: continue an interrupted soup from its last finished round "
                          "(checkpointed in .OUT.partial beside --out); same command otherwise")
    run_group = p.add_argument_group("device and precision")
    add_device_arguments(run_group)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", type=_size, default=None,
                   help="shard the output above this size (e.g. 2GB; default 5GB like HF)")
    p.add_argument("--no-finite-check", action="store_true",
                   help="skip the NaN/Inf scan of every ingredient tensor")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_option(p, command="soup")
    p.set_defaults(func=run)


def _tokenizer_files(job) -> dict[str, bytes]:
    """A causal LM's tokenizer files when they come from another folder than the one whose
    config is copied (e.g. the base of LoRA adapters, or one ingredient), so that the soup
    folder has its tokenizer too."""
    from ..jobs.soup import TOKENIZER_FILES, find_tokenizer_dir

    source, tok = job.source_dir, job.tokenizer_dir
    if tok is None or source is None or find_tokenizer_dir([source]) is not None:
        return {}
    names = {*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt", "added_tokens.json",
             "chat_template.jinja"}
    return {item.name: item.read_bytes() for item in sorted(Path(tok).iterdir())
            if item.is_file() and item.name in names}


def partial_dir(out: Path) -> Path:
    """Where an unfinished soup keeps its checkpoint: a fixed sibling of ``out``, so that a
    rerun with --resume finds it; removed once the soup is written."""
    return out.parent / f".{out.name}.partial"


def run(args: argparse.Namespace) -> int:
    from ..jobs.soup import (
        best_ingredient_row,
        check_resume,
        ingredient_rows,
        prepare_soup_job,
        run_method,
    )
    from .interrupt import on_interrupt

    on_interrupt(None)
    device = resolve_device(args.device)
    precision = check_precision(device, bf16=args.bf16, fp16=args.fp16)
    out = Path(args.out)
    check_output(out, args.overwrite)
    if args.model_batch is not None and args.model_batch < 1:
        raise UpcycleError(f"--model-batch must be >= 1, got {args.model_batch}")
    mehl = args.method.startswith("mehl")
    partial = partial_dir(out)
    if args.resume and not mehl:
        raise UpcycleError(f"--resume applies to --method mehl or mehl+ (the other methods keep "
                           f"no checkpoint), not {args.method}")
    if args.resume and not checkpoint_path(partial).is_file():
        raise UpcycleError(f"--resume: no checkpoint of an interrupted soup for {out} (looked "
                           f"for {checkpoint_path(partial)}); run without --resume to start")
    if args.shard_directions and not mehl:
        raise UpcycleError(f"--shard-directions applies to --method mehl or mehl+, not "
                           f"{args.method}")
    distributed.init_from_env(device)
    if args.shard_directions:  # before any data is read (K is checked once resolved)
        from ..soup.mehl import check_shard_directions

        check_shard_directions(True, args.model_batch)
    job = prepare_soup_job(
        args.ingredients, model_dir=args.model, held_out=args.held_out, data=args.data,
        held_out_fraction=args.held_out_fraction, test=args.test, seed=args.seed,
        max_length=args.max_length, batch_size=args.batch_size, progress=not args.quiet,
        check_finite=not args.no_finite_check, device=device, dtype=args.dtype,
        precision=precision, base=args.base, task=args.task, chunk=args.chunk,
    )
    if len(job.ingredients) == 1 and distributed.is_main():
        print(f"upcycle soup: warning: only one ingredient ({job.ingredients[0].path}): the "
              f"soup is a copy of it", file=sys.stderr)
    if args.model_batch is None:  # resolved here, so report.json records the value used
        args.model_batch = min(DEFAULT_MODEL_BATCH, len(job.ingredients))
    if args.shard_directions:
        check_shard_directions(True, args.model_batch)
    if mehl and args.model_batch > len(job.ingredients):
        raise UpcycleError(f"--model-batch {args.model_batch} exceeds the number of ingredients "
                           f"({len(job.ingredients)})")
    settings = dict(model_batch=args.model_batch, epochs=args.epochs, lr=args.lr,
                    models_epochs=args.models_epochs, grad_clip=args.grad_clip, seed=args.seed,
                    compact_directions=args.compact_directions,
                    shard_directions=args.shard_directions)
    if args.resume and job.task is not None:
        state = check_resume(job, args.method, partial, **settings)
        if distributed.is_main():
            print(f"resuming {args.method} after round {state['rounds_done']}/"
                  f"{state['rounds_total']} from {partial}", file=sys.stderr)
    elif mehl and checkpoint_path(partial).is_file() and distributed.is_main():
        print(f"note: {partial} holds a checkpoint of an interrupted soup; starting over "
              f"(pass --resume to continue it instead)", file=sys.stderr)
    resume_cmd = "rerun the same command with --resume to continue"

    def saved(record: dict) -> None:
        on_interrupt(f"MEHL round {record['rounds_done']}/{record['rounds_total']} is saved in "
                     f"{partial}; {resume_cmd}")

    if args.resume:
        on_interrupt(f"the checkpoint in {partial} is kept; {resume_cmd}")
    rows = []
    if job.task is not None:
        ing_rows = ingredient_rows(job)
        rows.append(best_ingredient_row(job, ing_rows))
    mehl_args = dict(checkpoint_dir=partial, resume=args.resume, callback=saved) if mehl else {}
    result, row = run_method(job, args.method, **settings, **mehl_args)
    rows.append(row)
    report = {"method": args.method, "ingredients": [str(i.path) for i in job.ingredients],
              "rows": rows, "soup": result.summary(),
              "config": resolved_config(args), "command": command_line("soup")}
    if job.task is not None:
        report["ingredient_rows"] = ing_rows
    if distributed.is_main():
        result.save(out, source_dir=job.source_dir, overwrite=args.overwrite,
                    max_shard_bytes=args.max_shard_size, rows=rows, command=command_line("soup"),
                    extra_files={**_tokenizer_files(job),
                                 "report.json": json.dumps(report, indent=2, default=str)})
        if out.suffix == ".safetensors":
            write_json(out.with_name(out.name + ".report.json"), json.loads(
                json.dumps(report, default=str)))
        on_interrupt(f"the soup is written to {out}")
        if mehl and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
        print(format_table(rows, LM_REPORT_COLUMNS if job.is_lm else REPORT_COLUMNS))
        print(f"soup written to {out}")
    distributed.barrier()
    return 0
