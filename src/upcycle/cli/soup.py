"""``upcycle soup``: combine fine-tuned checkpoints of one model into one model.

Classification models (held-out accuracy) or causal LMs (held-out token loss and
perplexity; chosen from the model's config, or ``--task causal-lm``); full checkpoints and
peft LoRA adapter folders (on ``--base``) may be mixed."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from ..errors import UpcycleError
from ..jobs.bench import format_table
from ..jobs.soup import COLUMNS, SoupConfig, partial_dir, run_soup
from ..runtime import distributed
from ..runtime.devices import add_device_arguments, check_precision, resolve_device
from ..soup import SOUP_METHODS, get_method
from ..soup.mehl import check_shard_directions
from ..soup.mergekit import is_mergekit_config, read_mergekit
from ..soup.registry import config_classes, method_names
from .arguments import add_task_arguments
from .configfile import add_config_option, command_line, resolved_config
from .dataclass_args import field_help, value_type
from .interrupt import on_interrupt

JOB_SETTINGS = ("seed", "progress")
"""Method settings the command sets for every method (--seed, --quiet), not flags of their own."""



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
        description=f"Combine fine-tuned checkpoints of one model ({', '.join(SOUP_METHODS)}). "
                    "Ingredients: .safetensors/.bin/.pt files, HF model folders, peft LoRA "
                    "adapter folders (with --base), folders of checkpoints, or globs. "
                    "Classification models or causal LMs (chosen from the model's config).",
    )
    p.add_argument("ingredients", nargs="+", metavar="INGREDIENT")
    p.add_argument("--method", choices=list(SOUP_METHODS), default="uniform")
    p.add_argument("--out", required=True, help="output: a folder (HF layout) or a .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--base", metavar="HF_DIR", default=None,
                   help="the base model the ingredients were fine-tuned from: theta_0 of "
                        f"{', '.join(method_names(needs_base=True))} (required there), and the "
                        "base of peft LoRA adapter ingredients (each enters the soup as base + "
                        "scale * B @ A); also searched for a causal LM's tokenizer")
    needing = method_names(needs_data=True)
    data = p.add_argument_group(f"data (needed by {', '.join(needing[:-1])} and {needing[-1]})")
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
    data.add_argument("--eval-batch-size", type=int, default=None,
                      help="batch size of scoring and evaluation (default: --batch-size)")
    titles = [next(m.title for m in SOUP_METHODS.values() if m.config_class is c)
              for c in config_classes() if _fitted(c)]
    merges = p.add_argument_group(
        f"fixed-weight merge options ({', '.join(method_names(needs_data=False))})")
    fit = p.add_argument_group(f"{' / '.join(titles)} options")
    add_method_arguments(fit, merges)
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
    p.add_argument("--config-from", type=int, default=None, metavar="N",
                   help="take the config.json of ingredient N (1-based) when the "
                        "ingredients' configs differ (refused otherwise, naming the field)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_option(p, command="soup", translate=_mergekit_flags)
    p.set_defaults(func=run)


def _mergekit_flags(raw, path) -> dict | None:
    """A mergekit YAML (``merge_method``) as this command's flags; None for upcycle's own."""
    return read_mergekit(raw, path) if is_mergekit_config(raw) else None


def _label(cls: type) -> str:
    """A config class's name for help texts: its first registered method ("learned")."""
    return next(m.name for m in SOUP_METHODS.values() if m.config_class is cls)


def _entries(labels) -> list[str]:
    """Every registered method whose config class is one of those ``labels`` name."""
    return [m.name for m in SOUP_METHODS.values()
            if m.config_class is not None and _label(m.config_class) in labels]


def method_flags() -> dict[str, list[tuple[str, type, dataclasses.Field]]]:
    """Field name -> (label, config class, field) of every registered config class that has
    it, for the fields that are flags: not set by the command (:data:`JOB_SETTINGS`), not
    fixed by a variant (``blockwise``), not marked ``cli: False``. The flags follow the field
    order of the richest config class first; each flag's classes are in registration order."""
    preset = {name for m in SOUP_METHODS.values() for name in m.preset}
    flags: dict[str, list] = {}
    for cls in sorted(config_classes(), key=lambda c: -len(dataclasses.fields(c))):
        for f in dataclasses.fields(cls):
            if f.name not in JOB_SETTINGS and f.name not in preset and f.metadata.get("cli", True):
                flags.setdefault(f.name, [])
    for cls in config_classes():
        for f in dataclasses.fields(cls):
            if f.name in flags:
                flags[f.name].append((_label(cls), cls, f))
    return flags


def _fitted(cls: type) -> bool:
    """Whether a config class belongs to a method fitted on data (learned, MEHL)."""
    return any(m.needs_data for m in SOUP_METHODS.values() if m.config_class is cls)


def add_method_arguments(group: argparse._ArgumentGroup,
                         merge_group: argparse._ArgumentGroup | None = None) -> None:
    """One flag per setting of the registered methods' config classes: ``--model-batch`` from
    ``model_batch``; type and default from the field, help from its ``metadata["help"]``
    (the first class that has one) or else its docstring. A setting whose default differs
    between methods defaults to None (each method's own) and the help says each;
    ``metadata["default_help"]`` says how a default depends on the ingredients (the flag then
    defaults to None, resolved by the job). With ``merge_group``, the flags of the methods
    that need no data (the fixed-weight merges) go there."""
    for name, owners in method_flags().items():
        target = group if merge_group is None or any(_fitted(c) for _, c, _ in owners) \
            else merge_group
        _, cls, first = next(((lb, c, f) for lb, c, f in owners if "help" in f.metadata),
                             owners[0])
        help_text = field_help(cls, name)
        defaults = {label: f.default for label, _, f in owners}
        default = first.default
        if "default_help" in first.metadata:
            help_text += (f" (default: "
                          f"{first.metadata['default_help'].format(default=default)})")
            default = None
        elif len(set(defaults.values())) > 1:
            help_text += " (default: " + ", ".join(f"{k} {v}" for k, v in defaults.items()) + ")"
            default = None
        flags = [_flag_name(first), *first.metadata.get("aliases", ())]
        kind, several = value_type(typing.get_type_hints(cls)[name])
        extra = {key: first.metadata[key] for key in ("choices", "metavar")
                 if key in first.metadata}
        if several:
            extra["nargs"] = "+"
        dest = flag_dest(first)
        if kind is bool and any(f.default for _, _, f in owners):
            # a switch some method turns on by default: --name / --no-name, None = its own
            target.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif kind is bool:
            target.add_argument(*flags, dest=dest, action="store_true", help=help_text)
        else:
            target.add_argument(*flags, dest=dest, type=kind, default=default, help=help_text,
                                **extra)


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f"--{f.name.replace('_', '-')}")


def flag_dest(f: dataclasses.Field) -> str:
    """Where argparse puts a method setting's flag: its name (``--lambda`` -> ``lambda``)."""
    return _flag_name(f).lstrip("-").replace("-", "_")


def run(args: argparse.Namespace) -> int:
    on_interrupt(None)
    device = resolve_device(args.device)
    precision = check_precision(device, bf16=args.bf16, fp16=args.fp16)
    out = Path(args.out)
    method = get_method(args.method)
    flags = method_flags()
    own = {f.name for f in dataclasses.fields(method.config_class)} if method.config_class else ()
    if args.shard_directions and "shard_directions" not in own:
        users = {label for label, _, _ in flags["shard_directions"]}
        raise UpcycleError(f"--shard-directions applies to --method "
                           f"{' or '.join(_entries(users))}, not {args.method}")
    distributed.init_from_env(device)
    if args.shard_directions:  # before any data is read (K is checked once resolved)
        check_shard_directions(True, args.model_batch)
    partial = partial_dir(out)
    resume_cmd = "rerun the same command with --resume to continue"

    def saved(record: dict) -> None:
        on_interrupt(f"MEHL round {record['rounds_done']}/{record['rounds_total']} is saved in "
                     f"{partial}; {resume_cmd}")

    def say(message: str) -> None:
        print(f"upcycle soup: {message}", file=sys.stderr)

    if args.resume:
        on_interrupt(f"the checkpoint in {partial} is kept; {resume_cmd}")
    config = SoupConfig(
        args.ingredients, method=args.method, out=out, overwrite=args.overwrite,
        method_settings={name: getattr(args, flag_dest(owners[0][2]))
                         for name, owners in flags.items()},
        held_out=args.held_out, data=args.data, held_out_fraction=args.held_out_fraction,
        test=args.test, model=args.model, base=args.base, task=args.task,
        max_length=args.max_length, chunk=args.chunk, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        device=device, dtype=args.dtype, precision=precision, seed=args.seed,
        max_shard_bytes=args.max_shard_size, check_finite=not args.no_finite_check,
        progress=not args.quiet, config_from=args.config_from, resume=args.resume,
        command=command_line("soup"),
        report_config=resolved_config(args))
    done = run_soup(config, say=say, on_round=saved,
                    on_saved=lambda path: on_interrupt(f"the soup is written to {path}"))
    if distributed.is_main():
        print(format_table(done.rows, COLUMNS[done.job.task_name]))
        print(f"soup written to {out}")
    distributed.barrier()
    return 0
