"""``upcycle`` entry point. Each subcommand lives in its own module of this package and
exposes ``register(subparsers)``, which adds its parser and sets ``func`` to its handler.

The help layer is shared here: every option shows its default once, required options say
so, each subcommand ends with runnable examples, and an unknown option suggests the nearest
valid one.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.util
import os
import signal
import sys
import threading
import warnings

from .. import __version__
from ..errors import UpcycleError, UpcycleWarning

COMMANDS = {"soup": "soup", "tune": "tune", "grow": "grow", "demo": "demo"}
"""Each subcommand's module in this package, imported only when the command line needs it
(``upcycle soup`` never imports the tuners, which import peft and transformers)."""
SUBCOMMANDS = tuple(COMMANDS)

EXAMPLES = {
    "soup": """\
examples:
  upcycle soup runs/*/ --method uniform --out soups/uniform
  upcycle soup runs/*/ --method mehl+ --held-out held.jsonl --test test.jsonl --out soups/mehl
  upcycle soup --base base-model adapters/*/ --method uniform --out soups/lora-mean""",
    "tune": """\
examples:
  upcycle tune --method snell --model base-model --data train.jsonl --epochs 3 --out runs/snell
  upcycle tune --method sherl --model base-model --data train.jsonl --test test.jsonl --out runs/sherl
  upcycle tune --method snell --model llama-base --data train.txt --held-out held.txt --merge --out runs/snell-lm
  upcycle tune --method snell --model base-model --data train.jsonl --out runs/snell --resume""",
    "grow": """\
examples:
  upcycle grow --model small-model --hidden-size 768 --layers 12 --out grown
  upcycle grow --model small-model --layers 12 --out grown --train train.jsonl --steps 500 \\
      --scratch-lr 1e-4 --scratch-warmup 50""",
    "demo": """\
examples:
  upcycle demo
  upcycle demo --ingredients 6 --out demo-out""",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once (none for flags and unset options), marks required
    options, and keeps descriptions' and examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return text + " (required)" if "required" not in text else text
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS
        if ("default" in text.lower() or unset or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter  # one help style for every command
        super().__init__(*args, **kwargs)
        if self.description:
            self.description = self.description.replace("``", "")


def _command_module(name: str):
    # deferred: a subcommand's module (and what it imports) loads only when it runs
    return importlib.import_module(f"{__package__}.{COMMANDS[name]}")


def _commands_needed(argv: list[str] | None) -> tuple[str, ...]:
    """The subcommands whose parsers ``argv`` needs: the one it names, else all (``upcycle``
    alone, ``--help``, a mistyped command: the full parser answers)."""
    words = sys.argv[1:] if argv is None else argv
    first = next((w for w in words if not w.startswith("-")), None)
    return (first,) if first in COMMANDS else SUBCOMMANDS


def build_parser(commands: tuple[str, ...] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = Parser(
        prog="upcycle",
        description="Get more out of pretrained models on one GPU or a CPU: model soups "
                    "(uniform, greedy, learned, MEHL-Soup), SNELL and SHERL tuning, LEMON growth.",
        epilog="Run 'upcycle COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"upcycle {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for name in commands:
        _command_module(name).register(sub)
        sub.choices[name].epilog = EXAMPLES.get(name)
    return parser


def _suggestions(parser: argparse.ArgumentParser, command: str | None, unknown: list[str]
                 ) -> str:
    """'unrecognized arguments' plus the nearest valid option for each unknown one."""
    target = parser
    if command:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                target = action.choices[command]
    valid = [s for a in target._actions for s in a.option_strings]
    parts = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, valid, n=1, cutoff=0.6) if flag.startswith("-") \
            else []
        parts.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return target, "unrecognized arguments: " + " ".join(parts)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the running command unwinds as on Ctrl-C:
    its temporary folders are removed and nothing half-written is left."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises :class:`Terminated` (where a handler can be set:
    the main thread); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_hf_progress_bars():
    """transformers 5 draws a progress bar for every model it loads ("Loading weights") or
    saves ("Writing model shards"), checkpoints included: the verbs show their own progress,
    so these are off while one runs. Returns what turns them back on.

    transformers is not imported for this (a second of start-up a soup or a grow of plain
    checkpoints does not need): it reads huggingface_hub's switch when it is first imported,
    so turning that off first is enough (downloads' bars are off too: the CLI runs offline
    unless HF_HUB_OFFLINE=0)."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return lambda: None
    from huggingface_hub import utils as hub_utils

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if not hf_logging.is_progress_bar_enabled():
            return lambda: None
        hf_logging.disable_progress_bar()  # (turns the hub's off too)
    elif hub_utils.are_progress_bars_disabled():
        return lambda: None
    else:
        hub_utils.disable_progress_bars()

    def restore():
        hub_utils.enable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()

    return restore


def _starting(argv: list[str] | None) -> str:
    """"upcycle VERB: starting" at once, before the verb's module imports torch (seconds): the
    first thing a user sees, on a terminal or in a log (``2>&1 | tee log``, ``> log``), is not
    a silence. Returns what erases it again (a carriage return, as a progress bar's), written
    before anything else is, so that a bad input still reads as its one error line. Written
    to a terminal or to the process's own stderr, not into a stream a caller put in its place
    (``main()`` called with ``sys.stderr`` redirected); never for --help, --version or
    --quiet, nor on ranks other than the first under torchrun."""
    words = sys.argv[1:] if argv is None else argv
    command = _commands_needed(argv)
    own = sys.stderr.isatty() or sys.stderr is sys.__stderr__
    if (len(command) != 1 or not own or os.environ.get("RANK", "0") != "0"
            or any(w in ("-h", "--help", "--version", "--quiet") for w in words)):
        return ""
    line = f"upcycle {command[0]}: starting"
    sys.stderr.write(line + "\r")  # ended, as a bar's line is: a log's reader sees it now
    sys.stderr.flush()
    return " " * len(line) + "\r"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    erase = _starting(argv)
    try:
        parser = build_parser(_commands_needed(argv))
    finally:
        sys.stderr.write(erase)
        sys.stderr.flush()
    # deferred: these import torch, which loads after the starting line
    from ..runtime import distributed  # deferred
    from .interrupt import interrupt_hint  # deferred

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        target, message = _suggestions(parser, getattr(args, "command", None), unknown)
        target.error(message)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UpcycleWarning):  # one line, as the errors
            print(f"upcycle {args.command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    restore_bars = _quiet_hf_progress_bars()
    try:
        if getattr(args, "dist_timeout", None) is not None:  # before any process group
            distributed.set_timeout(args.dist_timeout)
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except UpcycleError as exc:
        print(f"upcycle {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # under torchrun: another rank hung or died
        message = distributed.collective_failure(exc)
        if message is None:
            raise
        print(f"upcycle {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        hint = interrupt_hint() or "nothing was written"
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"\nupcycle {args.command}: {what}; {hint}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        warnings.showwarning = shown
        restore_bars()


if __name__ == "__main__":
    sys.exit(main())
