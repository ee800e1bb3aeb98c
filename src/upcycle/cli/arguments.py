"""Argument groups that several commands share, defined once so their names, defaults and
help stay the same everywhere (devices and precision: :func:`upcycle.runtime.devices.add_device_arguments`)."""

from __future__ import annotations

import argparse

from ..tasks import TASKS


def add_task_arguments(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--task``, ``--max-length`` and ``--chunk``: which task a model folder and data file make."""
    group.add_argument("--task", choices=TASKS, default="auto",
                       help="auto (default): causal-lm when the model's config names a "
                            "*ForCausalLM, else classification")
    group.add_argument("--max-length", type=int, default=None,
                       help="token limit (default 128 for classification; causal LM: min(512, "
                            "the model's position limit), texts packed into blocks of it)")
    group.add_argument("--chunk", action="store_true",
                       help="causal LM: read a .txt file as one stream cut into blocks (for "
                            "long texts), not one document per line")


def add_checkpoint_arguments(group: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                             run: str = "run", save_default: str = "") -> None:
    """``--save-steps`` and ``--resume`` for a training run (checkpoints in <out>.checkpoints/)."""
    group.add_argument("--save-steps", type=int, default=None, metavar="N",
                       help=f"save a resumable checkpoint of the {run} every N steps in "
                            f"<out>.checkpoints/{save_default}")
    group.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                       help=f"continue an interrupted {run} from its latest checkpoint (or "
                            f"CKPT); the other arguments must be those of the interrupted run")
