"""The help layer every subcommand shares: defaults shown once, required marked, examples,
--version, and the nearest valid option for a typo."""

import dataclasses
import re
import subprocess
import sys

import pytest

from upcycle import __version__
from upcycle.cli.main import SUBCOMMANDS, main


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_defaults_once_and_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"upcycle {command}" in text.split("examples:")[1]
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "``" not in text
    # no option says its default twice
    for block in re.split(r"\n  -", text):
        assert block.lower().count("default") <= 1, block


def test_required_options_say_so(capsys):
    with pytest.raises(SystemExit):
        main(["grow", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"--out OUT\s+output folder.*\(required\)", out, re.S)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"upcycle {__version__}"


def test_unknown_option_suggests_the_nearest(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["soup", str(tmp_path), "--out", str(tmp_path / "o"), "--metod", "uniform"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--metod" in err and "did you mean --method?" in err
    assert not (tmp_path / "o").exists()


# -- flags generated from a config dataclass --------------------------------------------------

@dataclasses.dataclass
class _Example:
    rank: int = 8
    """rank of the update (default 8)

    Everything else about the rank, for readers of the code only."""
    mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
    """which mode"""
    names: list[str] | None = dataclasses.field(default=None, metadata={"metavar": "NAME"})
    """modules to adapt"""
    recompute: str | bool = dataclasses.field(
        default="backward", metadata={"flag": "--no-recompute", "invert": True})
    """store instead of recomputing"""
    compile: bool = dataclasses.field(default=False, metadata={"flag": "--x-compile"})
    """compile it"""
    hidden: float = dataclasses.field(default=0.5, metadata={"cli": False})
    """not a flag"""


def test_flags_from_a_dataclass_fields_and_docstrings():
    import argparse

    from upcycle.cli.dataclass_args import add_dataclass_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Example)
    actions = {a.dest: a for a in parser._actions}
    assert actions["rank"].help == "rank of the update (default 8)" and actions["rank"].default == 8
    assert actions["mode"].choices == ("a", "b") and actions["names"].nargs == "+"
    assert actions["names"].metavar == "NAME" and "hidden" not in actions
    assert actions["no_recompute"].option_strings == ["--no-recompute"]
    assert actions["x_compile"].option_strings == ["--x-compile"]
    assert config_from_args(_Example, parser.parse_args([])) == _Example()
    args = parser.parse_args(["--rank", "4", "--names", "q", "v", "--no-recompute",
                              "--x-compile", "--mode", "b"])
    assert config_from_args(_Example, args, hidden=0.25) == _Example(
        rank=4, mode="b", names=["q", "v"], recompute=False, compile=True, hidden=0.25)


@pytest.mark.parametrize("method", ["snell", "sherl"])
def test_tune_flags_default_to_the_tuner_config(method):
    from upcycle.cli.main import build_parser
    from upcycle.cli.tune import tuner_config
    from upcycle.tune import TUNERS

    args = build_parser().parse_args(["tune", "--method", method, "--model", "m", "--data",
                                      "d", "--out", "o"])
    assert tuner_config(TUNERS[method], args) == TUNERS[method].config_class()


def test_the_command_line_starts_without_torch():
    """``import upcycle`` and the entry point import nothing heavy: on a terminal the first
    line comes before torch is loaded (seconds), not after."""
    code = ("import sys, upcycle, upcycle.cli.main; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_on_a_terminal_a_starting_line_is_shown_then_erased(tmp_path, capsys, monkeypatch):
    """On a terminal "upcycle VERB: starting" comes first and is erased before anything else
    is written, so a bad input still reads as its one error line; --help, --quiet and a
    stream a caller put in place of sys.stderr never get it."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["soup", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    line = "upcycle soup: starting"
    assert err.startswith(line + "\r" + " " * len(line) + "\r")
    rest = err.split("\r")[-1]
    assert rest.startswith("upcycle soup: error:") and rest.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["soup", "--help"])
    assert "starting" not in capsys.readouterr().err
    assert main(["soup", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("upcycle soup: error:")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert main(["soup", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("upcycle soup: error:")


def test_in_a_log_the_starting_line_comes_first_and_is_erased(tmp_path):
    """The process's own stderr into a log (a pipe here): the starting line is its first
    output, before torch is imported, and a reader of the log sees only the one error line."""
    from conftest import run_decoded, shown

    proc = run_decoded([sys.executable, "-m", "upcycle.cli.main", "soup",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                       )
    assert proc.returncode == 2
    err = proc.stderr
    line = "upcycle soup: starting"
    assert err.startswith(line + "\r" + " " * len(line) + "\r")
    assert [x for x in shown(err) if x] == [
        f"upcycle soup: error: ingredient {tmp_path / 'missing'}: no such file or folder"]
    assert not (tmp_path / "o").exists()
