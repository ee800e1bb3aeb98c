"""G_stack depth stacking (upcycle.grow.expand_stack, ``upcycle grow --method stack``): the
grown model's layers are the source's repeated in order, everything else is the source's, in
memory and streamed; a width change is refused with one error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_architectures import MAIN, build

from upcycle.cli.main import main
from upcycle.errors import UpcycleError
from upcycle.grow import METHODS, expand_folder, expand_stack

T = pytest.importorskip("transformers")

LAYERS = {"gpt2": "transformer.h.", "bert": "bert.encoder.layer."}


def _check_stacked(source: torch.nn.Module, grown: torch.nn.Module, family: str,
                   num_layers: int) -> None:
    a, b = source.state_dict(), grown.state_dict()
    prefix = LAYERS[family]
    L = source.config.num_hidden_layers
    assert grown.config.num_hidden_layers == num_layers
    assert grown.config.hidden_size == source.config.hidden_size
    for key, value in b.items():
        if key.startswith(prefix):
            j, rest = key[len(prefix):].split(".", 1)
            src_key = f"{prefix}{int(j) % L}.{rest}"
        else:
            src_key = key
        assert torch.equal(value, a[src_key].to(value.dtype)), key


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_stacked_layers_are_the_source_repeated(family):
    source = build(MAIN[family], family)
    L = source.config.num_hidden_layers
    assert "stack" in METHODS
    for depth in (2 * L, 2 * L + 1):  # [0..L-1, 0..L-1] and a cut-short third repetition
        grown = expand_stack(source, num_layers=depth)
        _check_stacked(source, grown, family, depth)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_cli_stack_streamed_and_in_memory(family, tmp_path, capsys):
    model = build(MAIN[family], family, dtype=torch.float32)
    src = tmp_path / "src"
    model.save_pretrained(src)
    L = model.config.num_hidden_layers
    for folder, extra in (("s", []), ("m", ["--in-memory"])):
        out = tmp_path / folder
        assert main(["grow", "--model", str(src), "--method", "stack", "--layers",
                     str(2 * L), "--out", str(out), *extra]) == 0
        printed = capsys.readouterr().out
        assert ("(streamed)" in printed) == (not extra)
        assert "lossy by design" in printed
        report = json.loads((out / "growth.json").read_text())
        assert report["method"] == "stack"
        grown = getattr(T, MAIN[family]).from_pretrained(out).eval()
        _check_stacked(model, grown, family, 2 * L)


def test_streamed_stack_equals_in_memory(tmp_path):
    model = build(MAIN["gpt2"], "gpt2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "src")
    L = model.config.num_hidden_layers
    result = expand_folder(tmp_path / "src", tmp_path / "out", num_layers=2 * L + 1,
                           method="stack")
    assert result.plan.layer_map == [(i % L, "stack") for i in range(2 * L + 1)]
    reference = expand_stack(model, num_layers=2 * L + 1)
    grown = T.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    a, b = reference.state_dict(), grown.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dims, arg", [({"hidden_size": 64}, "hidden_size"),
                                       ({"intermediate_size": 999}, "intermediate_size"),
                                       ({"num_heads": 8}, "num_heads")])
def test_a_width_change_is_refused(dims, arg):
    source = build(MAIN["gpt2"], "gpt2")
    with pytest.raises(UpcycleError, match=f"^{arg}: method 'stack' grows depth only"):
        expand_stack(source, num_layers=4, **dims)


def test_cli_width_change_is_one_error_and_nothing_written(tmp_path, capsys):
    src = tmp_path / "src"
    build(MAIN["bert"], "bert", dtype=torch.float32).save_pretrained(src)
    out = tmp_path / "out"
    assert main(["grow", "--model", str(src), "--method", "stack", "--hidden-size", "64",
                 "--layers", "4", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("upcycle grow:")]
    assert len(err) == 1 and "grows depth only" in err[0], err
    assert not out.exists() and not list(Path(tmp_path).glob(".out.tmp-*"))
