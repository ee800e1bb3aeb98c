"""``upcycle`` entry point. Each subcommand lives in its own module of this package and
exposes ``register(subparsers)``, which adds its parser and sets ``func`` to its handler."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import UpcycleError

SUBCOMMANDS = ("soup", "tune", "grow", "demo")

_interrupt_hint: str | None = None


def on_interrupt(hint: str | None) -> None:
    """Set what Ctrl-C should tell the user (what was saved and how to resume); None: nothing
    was saved yet. A running command updates it as it makes progress."""
    global _interrupt_hint
    _interrupt_hint = hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upcycle",
        description="Get more out of pretrained models on one GPU or a CPU: model soups "
                    "(uniform, greedy, learned, MEHL-Soup), SNELL and SHERL tuning, LEMON growth.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"upcycle.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"upcycle.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UpcycleError as exc:
        print(f"upcycle {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _interrupt_hint or "nothing was written"
        print(f"\nupcycle {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
