"""The help layer every subcommand shares: defaults shown once, required marked, examples,
--version, and the nearest valid option for a typo."""

import re

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
