"""``--config FILE``: a command's flags from a YAML file, under the flags' own names.

    upcycle soup --config soup.yaml                  # soup.yaml: method: mehl+, out: soups/mehl ...
    upcycle soup --config soup.yaml --epochs 10      # a typed flag wins (and a note says so)

Keys are the long flag names with dashes or underscores (``held-out``, ``held_out``, or the
argument's name such as ``ingredients``); values are what the flag takes (a list for flags
that take several values, true/false for switches). An unknown key is an error naming the
nearest valid one. A ``report.json`` written by the command holds the run's resolved
configuration under ``"config"``; passing that file to ``--config`` repeats the run.

:func:`add_config_option` is all a command needs: it adds ``--config`` to the command's
parser and resolves the file while the command line is parsed, so the file may supply
required flags and positional arguments. :func:`resolved_config` gives the configuration of
a parsed run (what report.json records).
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from ..errors import UpcycleError

# Namespace entries that are not flags (the handler, the sub-command, --config itself).
NOT_CONFIG = ("func", "command", "config", "help")

_UNSET = object()
_typed_argv: dict[str, list[str]] = {}  # command -> the arguments typed after it


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def config_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Accepted key (underscored) -> the action it sets: every long flag name and every dest."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in NOT_CONFIG or action.dest == argparse.SUPPRESS or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        keys.setdefault(_key(action.dest), action)
        for flag in action.option_strings:
            if flag.startswith("--"):
                keys.setdefault(_key(flag), action)
    return keys


def _flag_name(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.dest


def load_config(parser: argparse.ArgumentParser, path: str | os.PathLike,
                translate=None) -> dict:
    """Read ``path`` (YAML, or a report.json holding ``"config"``) into dest -> value.
    ``translate(raw, path)``: a command's reader of another tool's format (``upcycle soup``:
    mergekit's YAML), returning flag names -> values, or None when ``raw`` is not in that
    format. Raises ValueError naming the file and the key at fault."""
    import json

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--config {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it: {exc}") from None
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path}: not valid JSON: {exc}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml, "
                             f"or upcycle[hf])") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # one line: where, and what the parser expected
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            reason = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
            raise ValueError(f"--config {path}: not a readable YAML file: {where}{reason}"
                             ) from None
    if raw is None:
        raw = {}
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict) and "rows" in raw:
        raw = raw["config"]  # a report.json written by the command
    if translate is not None:
        try:
            raw = translate(raw, path) or raw
        except UpcycleError as exc:
            raise ValueError(str(exc)) from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got "
                         f"{type(raw).__name__}")
    keys = config_keys(parser)
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    for key, value in raw.items():
        action = keys.get(_key(str(key)))
        if action is None:
            close = difflib.get_close_matches(_key(str(key)), list(keys), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise ValueError(f"--config {path}: unknown key {key!r}{hint}; valid keys are the "
                             f"command's long flag names")
        if action.dest in values:
            raise ValueError(f"--config {path}: {key!r} and {origin[action.dest]!r} set the "
                             f"same option")
        values[action.dest] = _check_value(action, key, value, path)
        origin[action.dest] = str(key)
    return values


def _check_value(action: argparse.Action, key, value, path: Path):
    where = f"--config {path}: {key!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if value is None and isinstance(action, argparse.BooleanOptionalAction):
            return None  # the method's own default
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not many:
        raise ValueError(f"{where}: expected one value, got a list")
    if value is None:
        return None
    converted = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise ValueError(f"{where}: expected a plain value, got {item!r}")
        if action.type is not None:
            try:
                item = action.type(str(item))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ValueError(f"{where}: invalid value {item!r}: {exc}") from None
        elif not isinstance(item, str) and action.choices is None:
            item = str(item)
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(map(str, action.choices))
            close = difflib.get_close_matches(str(item), list(map(str, action.choices)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: invalid choice {item!r}{hint}; choose from {choices}")
        converted.append(item)
    return converted if many else converted[0]


def _config_path(args: list[str]) -> str | None:
    path = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return path


def _without_config(args: list[str]) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == "--config" and i + 1 < len(args):
            skip = True
        elif not arg.startswith("--config="):
            out.append(arg)
    return out


def _positional_extras(ns, extras: list[str], relaxed: list, unset) -> list[str]:
    """argparse (before 3.13) matches an optional positional (nargs="*") to nothing when an
    option comes first, leaving the typed values as extras: give them back to it."""
    if len(relaxed) == 1 and extras and not any(e.startswith("-") for e in extras):
        dest = relaxed[0].dest
        current = getattr(ns, dest, None)
        if current is unset or current == [] or (callable(unset) and current == unset(dest)):
            setattr(ns, dest, list(extras))
            return []
    return extras


def _same(a, b) -> bool:
    return a == b or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
                      and list(a) == list(b))


def add_config_option(parser: argparse.ArgumentParser, *, command: str | None = None,
                      translate=None) -> None:
    """Add ``--config FILE`` to ``parser``: the file's values replace the defaults (and
    satisfy required flags and positionals); flags typed on the command line win, with a
    one-line note for each one that disagrees with the file. ``translate``: see
    :func:`load_config`."""
    command = command or parser.prog
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="read the flags from a YAML file (keys: the long flag names, "
                             "e.g. held-out: held.jsonl); flags typed as well win. A "
                             "report.json of an earlier run repeats it")
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        _typed_argv[command] = list(args)
        path = _config_path(args)
        if path is None:
            return original(args, namespace)
        args = _without_config(args)
        try:
            values = load_config(parser, path, translate)
        except ValueError as exc:
            parser.error(str(exc))
        saved = [(a, a.default, a.required, a.nargs) for a in parser._actions]
        relaxed = [a for a in parser._actions if not a.option_strings and a.nargs == "+"]
        try:
            # Which flags were typed: parse once with every default unset.
            for action in parser._actions:
                action.required = False
                if action in relaxed:
                    action.nargs = "*"
                if action.dest not in NOT_CONFIG:
                    action.default = _UNSET
            typed_ns, typed_extras = original(list(args), None)
            _positional_extras(typed_ns, typed_extras, relaxed, _UNSET)
            typed = {k for k, v in vars(typed_ns).items() if v is not _UNSET}
            for action, default, required, nargs in saved:
                action.default = values.get(action.dest, default)
                action.required = required and action.dest not in values
                action.nargs = "*" if action in relaxed and action.dest in values else nargs
            ns, extras = original(args, namespace)
            extras = _positional_extras(ns, extras, relaxed, values.get)
        finally:
            for action, default, required, nargs in saved:
                action.default, action.required, action.nargs = default, required, nargs
        ns.config = path
        _guard_outputs(parser, command, ns, values, typed, path)
        flags = {a.dest: _flag_name(a) for a in parser._actions}
        for dest, value in values.items():
            if dest in typed and not _same(getattr(ns, dest), value):
                print(f"upcycle {command}: note: {flags.get(dest, dest)} "
                      f"{_show(getattr(ns, dest))} on the command line overrides "
                      f"{_show(value)} in {path}", file=sys.stderr)
        return ns, extras

    parser.parse_known_args = parse_known_args


def _guard_outputs(parser, command: str, ns, values: dict, typed: set, path: str) -> None:
    """A file never replaces a folder: ``overwrite`` counts only typed on the command line, and
    an ``out`` read from the file (no ``--out`` typed) must not exist yet."""
    if values.get("overwrite") and "overwrite" not in typed:
        print(f"upcycle {command}: note: overwrite: true in {path} is ignored (--overwrite "
              f"counts only when typed on the command line)", file=sys.stderr)
        ns.overwrite = False
    out = getattr(ns, "out", None)
    if "out" in values and "out" not in typed and out is not None:
        ns.overwrite = False  # --overwrite replaces only an --out typed with it
        target = Path(out)
        if target.is_file() or target.is_symlink() or (target.is_dir() and any(
                target.iterdir())):
            parser.error(f"--config {path}: out {out} already exists, and an out read from a "
                         f"file never replaces anything; type --out {out} --overwrite to "
                         f"replace it, or --out NEW")


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def resolved_config(args: argparse.Namespace) -> dict:
    """The run's full configuration, flag name (dashes) -> value: what ``--config`` reads
    back to repeat the run (report.json records it under ``"config"``)."""
    out = {}
    for dest, value in vars(args).items():
        if dest in NOT_CONFIG or dest.startswith("_"):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif not isinstance(value, (str, int, float, bool, list, type(None))):
            value = str(value)
        out[dest.replace("_", "-")] = value
    return out


def command_line(command: str) -> str:
    """The command as last parsed (``upcycle soup ...``), shell-quoted, for model cards
    and reports."""
    import shlex

    return shlex.join(["upcycle", command, *_typed_argv.get(command, [])])
