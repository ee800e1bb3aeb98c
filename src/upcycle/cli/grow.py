"""``upcycle grow``: LEMON-expand a HF model folder, check it is lossless, optionally train it.

    upcycle grow --model small/ --hidden-size 768 --layers 12 --out big/
    upcycle grow --model small/ --hidden-size 768 --layers 12 --out big/ \
        --train train.jsonl --steps 500 --scratch-lr 1e-4 --scratch-warmup 50

The output folder loads with ``from_pretrained``. The maximum output difference against the
source (fp32, a few seeded inputs) is printed and must be within ``--tolerance`` (relative to
max(1, max |output|)), or nothing is written and the command fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import UpcycleError
from ..grow.lemon import METHODS, SCHEDULES
from ..models.architectures import supported
from ..runtime import distributed
from ..runtime.devices import add_device_arguments
from .arguments import add_checkpoint_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "grow",
        help="LEMON: grow a model wider/deeper losslessly, then (optionally) train it",
        description="Expand a HuggingFace model folder (BERT/MiniLM, RoBERTa, DistilBERT, ViT, "
                    "GPT-2, Llama, Mistral, Qwen2, Phi-3, GPT-NeoX, with its task head) to a "
                    "wider and/or deeper model that computes the same function (LEMON), check "
                    "that it does, write it, and optionally continue training it with the LEMON "
                    "learning-rate recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="source HF model folder")
    p.add_argument("--out", required=True, help="output folder (a HF model folder)")
    p.add_argument("--hidden-size", type=int, default=None, help="target hidden size")
    p.add_argument("--layers", type=int, default=None,
                   help="target number of layers (at most 2x the source per expansion)")
    p.add_argument("--heads", type=int, default=None,
                   help="target attention heads (default: hidden size / head_dim)")
    p.add_argument("--intermediate-size", type=int, default=None,
                   help="target MLP width (default: scaled with the hidden size)")
    p.add_argument("--method", choices=METHODS, default="lemon",
                   help="lemon, or a baseline: net2net (equal splits), aki (bert2BERT, lossy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the symmetry-breaking noise")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="max relative output difference (fp32) allowed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--train", default=None, metavar="DATA",
                   help="then train the grown model on this classification file (.csv/.jsonl "
                        "with text,label or .npz with images,labels)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps: the reduced budget (LEMON: ~0.45-0.65 of the "
                        "from-scratch steps); the decay ends at the last one")
    p.add_argument("--scratch-lr", "--lr", dest="scratch_lr", type=float, default=None,
                   metavar="LR",
                   help="peak learning rate the large model would use from scratch (LEMON keeps "
                        "it; required with --train)")
    p.add_argument("--scratch-warmup", "--warmup-steps", dest="scratch_warmup", type=int,
                   default=None, metavar="STEPS",
                   help="warm-up steps the large model would use from scratch (LEMON keeps them; "
                        "required with --train)")
    p.add_argument("--decay", choices=SCHEDULES, default="cosine",
                   help="learning-rate decay after the warm-up, reaching 0 at --steps")
    p.add_argument("--batch-size", type=int, default=16,
                   help="examples per optimizer step (over all ranks and --grad-accum)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="gradient accumulation: N micro-batches per optimizer step")
    add_checkpoint_arguments(p, run="--train run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    train_device = p.add_argument_group("device and precision of --train")
    add_device_arguments(train_device)
    p.set_defaults(func=run)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _load(model_dir: Path):
    """The model of a HF folder, in its own class (from config.architectures), fp32, eval."""
    import transformers
    from transformers import AutoConfig, AutoModel

    if not (model_dir / "config.json").is_file():
        raise UpcycleError(f"--model {model_dir}: not a HuggingFace model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as exc:
        model_type = None
        try:
            model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            pass
        raise UpcycleError(f"--model {model_dir}: config.json has model_type {model_type!r}, "
                           f"which transformers {transformers.__version__} does not know; "
                           f"upcycle grow supports {supported()}") from exc
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise UpcycleError(f"--model {model_dir}: no weights (expected one of "
                           f"{', '.join(WEIGHT_FILES)})")
    cls = AutoModel
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None) or AutoModel
        break
    try:
        model = cls.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UpcycleError(f"--model {model_dir}: cannot load it as {cls.__name__}: "
                           f"{first}") from exc
    return model.eval()


def run(args: argparse.Namespace) -> int:
    from ..grow import example_inputs, expand, max_output_difference
    from ..io.writing import atomic_dir, copy_model_files

    src = Path(args.model)
    out = Path(args.out)
    if args.train is not None and (args.steps is None or args.steps < 1):
        raise UpcycleError("--steps: expected a positive number of training steps with --train")
    if args.train is not None:
        for flag, value in (("--scratch-lr", args.scratch_lr),
                            ("--scratch-warmup", args.scratch_warmup)):
            if value is None:
                raise UpcycleError(f"{flag}: required with --train (LEMON keeps the large "
                                   f"model's from-scratch peak learning rate and warm-up)")
        if not args.scratch_lr > 0 or args.scratch_warmup < 0:
            raise UpcycleError(f"--scratch-lr/--scratch-warmup: expected a positive learning "
                               f"rate and warm-up steps >= 0, got {args.scratch_lr}, "
                               f"{args.scratch_warmup}")
    if args.train is not None and not Path(args.train).is_file():
        raise UpcycleError(f"--train {args.train}: no such file")
    if args.train is not None:
        from ..runtime.devices import check_precision, resolve_device, resolve_dtype
        from ..training.config import TrainingConfig
        from ..training.runs import check_resume, checkpoints_folder

        if args.grad_accum < 1:
            raise UpcycleError(f"--grad-accum must be >= 1, got {args.grad_accum}")
        if args.save_steps is not None and args.save_steps < 1:
            raise UpcycleError(f"--save-steps must be >= 1, got {args.save_steps}")
        check_resume(args.resume, checkpoints_folder(out))
        check_precision(resolve_device(args.device), bf16=args.bf16, fp16=args.fp16)
        resolve_dtype(args.dtype)
        TrainingConfig(batch_size=args.batch_size, grad_accum=args.grad_accum).micro_batch(
            int(os.environ.get("WORLD_SIZE", "1")))
    if out.exists() and not args.overwrite and any(out.iterdir() if out.is_dir() else [out]):
        raise UpcycleError(f"--out {out}: already exists; pass --overwrite to replace it")
    source = _load(src)
    grown = expand(source, hidden_size=args.hidden_size, num_layers=args.layers,
                   num_heads=args.heads, intermediate_size=args.intermediate_size,
                   seed=args.seed, method=args.method)
    plan = grown.growth_plan
    print(f"grown {plan.describe()}")
    n_source, n_grown = (sum(p.numel() for p in m.parameters()) for m in (source, grown))
    print(f"parameters: {n_source:,} -> {n_grown:,}")
    if n_grown == n_source:
        import sys

        print("upcycle grow: warning: the target size equals --model's (pass --hidden-size, "
              "--layers, --heads or --intermediate-size larger than the source's): the output "
              "is a copy of it", file=sys.stderr)
    diffs = [max_output_difference(source, grown, example_inputs(source, seed=s))
             for s in range(3)]
    worst = max(diffs, key=lambda r: r["max_rel"])
    argmax_ok = all(r["argmax_equal"] for r in diffs)
    print(f"max output difference vs source (fp32, 3 inputs): {worst['max_abs']:.3e} "
          f"(relative {worst['max_rel']:.3e}, tolerance {args.tolerance:g}); "
          f"argmax {'identical' if argmax_ok else 'DIFFERS'}")
    lossy_ok = args.method == "aki"
    if (worst["max_rel"] > args.tolerance or not argmax_ok) and not lossy_ok:
        raise UpcycleError(f"the grown model differs from --model by {worst['max_rel']:.3e} "
                           f"(relative), above --tolerance {args.tolerance:g}; nothing written")
    if lossy_ok:
        print("(method aki is lossy by design: the tolerance is not enforced)")
    report = {"plan": plan.describe(), "family": plan.family,
              "matched_by_structure": plan.by_structure, "method": args.method, "seed": args.seed,
              "max_abs_difference": worst["max_abs"], "max_rel_difference": worst["max_rel"],
              "source": str(src)}
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        copy_model_files(src, tmp)
        grown.save_pretrained(tmp, safe_serialization=True)
        if args.train is not None:
            report["train"] = _train(tmp, args)
        (tmp / "growth.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _train(model_dir: Path, args: argparse.Namespace) -> dict:
    """Train the grown model in ``model_dir`` on ``--train`` with LEMON's recipe (the
    from-scratch peak lr and warm-up, the cosine decayed fully over ``--steps``) through
    ``transformers.Trainer`` (:mod:`upcycle.training`)."""
    from ..grow.lemon import LemonRecipe
    from ..jobs.finetune import train_task
    from ..runtime.devices import resolve_device, resolve_dtype
    from ..tasks import load_task
    from ..tasks.classification import evaluate
    from ..training.config import TrainingConfig
    from ..training.runs import checkpoints_folder, run_fingerprint
    from .interrupt import interrupt_callback

    device = resolve_device(args.device)
    task = load_task(model_dir, args.train, task="classification")  # --train: classifiers
    data = task.read(args.train, split="train", fix_num_labels=True)
    model = task.load_model(dtype=resolve_dtype(args.dtype))
    recipe = LemonRecipe(max_steps=args.steps, lr=args.scratch_lr,
                         warmup_steps=min(args.scratch_warmup, args.steps), decay=args.decay)
    config = TrainingConfig(max_steps=recipe.max_steps, lr=recipe.lr,
                            warmup_steps=recipe.warmup_steps, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, save_steps=args.save_steps,
                            seed=args.seed, device=device, bf16=args.bf16, fp16=args.fp16,
                            progress=not args.quiet)
    torch.manual_seed(args.seed)
    schedule = lambda optimizer, total: recipe.scheduler(optimizer)  # noqa: E731
    out = Path(args.out)
    folder = checkpoints_folder(out)
    fingerprint = run_fingerprint(args, {"model": args.model, "train": args.train})
    result = train_task(model, task, data, config, schedule=schedule, output_dir=folder,
                        resume=args.resume, fingerprint=fingerprint, overwrite=args.overwrite,
                        callbacks=[interrupt_callback(folder, f"upcycle grow --out {out} ...")])
    batches = task.batches(data, args.batch_size)
    metrics = evaluate(model, batches[: max(1, min(len(batches), 8))])
    print(f"trained {result.steps} steps on {device} (LEMON recipe: peak lr {recipe.lr:g}, "
          f"warm-up {recipe.warmup_steps}, {recipe.decay} decay to 0 at step {args.steps}): "
          f"last loss {result.last_loss:.4f}, train accuracy {metrics['accuracy']:.3f}")
    model.save_pretrained(model_dir, safe_serialization=True)
    if distributed.is_main():
        shutil.rmtree(folder, ignore_errors=True)  # the run is complete: its checkpoints go
    return {"steps": result.steps, "resumed_from": result.resumed_from, "last_loss": result.last_loss, "device": str(device),
            "log_history": result.log_history, **metrics}
