"""Command-line flags generated from a config dataclass, so that a method's defaults and
help live in one place: its config class.

Each field is a flag ``--<name-with-dashes>`` whose default is the field's, whose type is the
field's (a list type takes several values), and whose help is the first paragraph of the
field's docstring (the string literal right after the field; the rest of the docstring
documents the field for readers of the code). ``dataclasses.field(metadata=...)`` adjusts
it:

- ``"flag"``: the flag's name when it differs (``"--snell-compile"``);
- ``"invert"``: a switch that sets the field to False (``--no-recompute``);
- ``"choices"``, ``"metavar"``, ``"nargs"``: as in ``add_argument``;
- ``"help"``: the help text when it is not the docstring's first paragraph;
- ``"cli": False``: no flag; the field keeps its default.

The parsed value lands under the flag's name (``args.snell_compile``, ``args.no_recompute``),
so that ``--config`` files and report.json keep the flag names users type.
:func:`config_from_args` builds the config object back from the parsed arguments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (cleaned), for ``cls`` and the dataclasses it extends."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (e.g. made at run time): no docstrings
            continue
        body = ast.parse(source).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_help(cls: type, name: str) -> str:
    """The flag help of a field: ``metadata["help"]`` when it has one, else its docstring's
    first paragraph, on one line."""
    given = next(f.metadata.get("help") for f in dataclasses.fields(cls) if f.name == name)
    if given:
        return given
    doc = field_docs(cls).get(name, "")
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _dest(f: dataclasses.Field) -> str:
    return _flag(f).lstrip("-").replace("-", "_")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default: a flag needs one")


def value_type(annotation) -> tuple[type, bool]:
    """(the type one value converts to, whether the flag takes several values)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        several = [a for a in options if typing.get_origin(a) in (list, tuple)]
        annotation = several[0] if several else options[0]
    if typing.get_origin(annotation) in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def _declared_here(cls: type, name: str) -> bool:
    """Whether field ``name`` of ``cls`` is declared in ``cls``'s own package (not by a
    library base such as peft's ``PeftConfig``, whose fields are not the method's flags)."""
    owner = next(k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {}))
    return owner.__module__.split(".")[0] == cls.__module__.split(".")[0]


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags: those its package declares, but those with
    ``metadata["cli"] = False``."""
    return [f for f in dataclasses.fields(cls)
            if f.metadata.get("cli", True) and _declared_here(cls, f.name)]


def add_dataclass_arguments(group: argparse.ArgumentParser | argparse._ArgumentGroup,
                            cls: type) -> None:
    """One flag per field of the dataclass ``cls`` (see the module's docstring)."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        meta, default = f.metadata, _default(f)
        kwargs: dict = {"dest": _dest(f), "help": field_help(cls, f.name)}
        kind, several = value_type(hints[f.name])
        if meta.get("invert") or kind is bool:
            if not meta.get("invert") and default is not False:
                raise TypeError(f"field {f.name!r}: a switch defaulting to True needs "
                                f"metadata 'invert' (a --no-... flag)")
            group.add_argument(_flag(f), action="store_true", **kwargs)
            continue
        kwargs.update(type=kind, default=default)
        nargs = meta.get("nargs", "+" if several else None)
        if nargs is not None:
            kwargs["nargs"] = nargs
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        group.add_argument(_flag(f), **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    """The ``cls`` object that the flags of :func:`add_dataclass_arguments` describe, with
    ``overrides`` (field name -> value) for fields set otherwise; the fields that are not
    flags keep their defaults."""
    values = {}
    for f in cli_fields(cls):
        if f.name in overrides:
            continue
        value = getattr(args, _dest(f))
        if f.metadata.get("invert"):
            value = False if value else _default(f)
        values[f.name] = value
    return cls(**{**values, **overrides})
