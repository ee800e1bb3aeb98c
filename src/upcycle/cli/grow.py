"""``upcycle grow``: LEMON-expand a HF model folder, check it is lossless, optionally train it.

    upcycle grow --model small/ --hidden-size 768 --layers 12 --out big/
    upcycle grow --model llama-1b/ --hidden-size 2560 --layers 28 --out llama-2b/ \
        --max-shard-size 2GB
    upcycle grow --model small/ --hidden-size 768 --layers 12 --out big/ \
        --train train.jsonl --steps 500 --scratch-lr 1e-4 --scratch-warmup 50

The growth is streamed (:func:`upcycle.grow.expand_folder`): the source is read one tensor at
a time and the grown model written shard by shard, so a model far larger than memory grows;
``--in-memory`` (and ``--train``) build it whole. The output folder loads with
``from_pretrained``. The maximum output difference against the
source (fp32, a few seeded inputs) is printed and must be within ``--tolerance`` (relative to
max(1, max |output|)), or nothing is written and the command fails. The job itself is
:func:`upcycle.jobs.grow.run_grow`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..grow import METHODS, SCHEDULES
from ..jobs.grow import GrowJob, run_grow
from ..runtime.devices import add_device_arguments
from ..training.runs import checkpoints_folder
from .arguments import add_checkpoint_arguments
from .dataclass_args import config_from_args
from .interrupt import interrupt_callback
from .soup import _size as parse_size


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
                   help="target number of layers (at most 2x the source per expansion; "
                        "--method stack: any depth)")
    p.add_argument("--heads", type=int, default=None,
                   help="target attention heads (default: hidden size / head_dim)")
    p.add_argument("--intermediate-size", type=int, default=None,
                   help="target MLP width (default: scaled with the hidden size)")
    p.add_argument("--method", choices=METHODS, default="lemon",
                   help="lemon, or a baseline: net2net (equal splits), aki (bert2BERT, lossy), "
                        "stack (G_stack: the trained layers repeated in order, depth only, "
                        "lossy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the symmetry-breaking noise")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="max relative output difference (fp32) allowed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--in-memory", action="store_true",
                   help="load the source and build the grown model whole (default: streamed "
                        "tensor by tensor, holding about one layer; --train, legacy .bin "
                        "pickles and families matched by layout are grown in memory)")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="shard the output above this size (e.g. 2GB; default 5GB like HF)")
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


def run(args: argparse.Namespace) -> int:
    job = config_from_args(GrowJob, args, settings=vars(args))
    out = Path(args.out)
    callbacks = ([interrupt_callback(checkpoints_folder(out), f"upcycle grow --out {out} ...")]
                 if args.train is not None else [])
    run_grow(job, callbacks=callbacks)
    return 0
