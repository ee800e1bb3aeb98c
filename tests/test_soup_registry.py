"""Adding a soup method: one function and one ``register`` line (docs/architecture.md shows
the same with soup/linear.py). A toy method, theta = theta_1 + scale * sum_{i>1} (theta_i -
theta_1) (task arithmetic with the first ingredient as its base), is registered here, run
through the job and the CLI, and checked exactly."""

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from upcycle.cli.main import main
from upcycle.jobs.soup import SoupConfig, run_soup
from upcycle.soup import SOUP_METHODS, SoupContext, SoupMethod, SoupResult, register
from upcycle.soup.common import ingredient_names


# -- the example method: a module of its own in upcycle/soup/ ----------------------------------
@dataclass
class AnchoredConfig:
    scale: float = 0.5
    """The task vectors' scale (lambda)."""


def anchored(ingredients, context: SoupContext, config: AnchoredConfig):
    """theta = theta_1 + scale * sum_{i>1} (theta_i - theta_1): the first ingredient is the base."""
    base, others = ingredients[0], ingredients[1:]
    state = {}
    for name in base.keys():
        acc = base.get(name).to(torch.float64)
        for ing in others:
            acc += config.scale * (ing.get(name).to(torch.float64) - base.get(name).to(torch.float64))
        state[name] = acc.to(context.dtype or base.dtype(name))
    coefficients = torch.tensor([[1.0 - config.scale * len(others)]] + [[config.scale]] * len(others),
                                dtype=torch.float64)
    return SoupResult("anchored", state, ingredient_names(ingredients), coefficients, ["<model>"])


# -- its registry line ------------------------------------------------------------------------
ENTRY = SoupMethod("anchored", anchored, "Anchored sum",
                   "the first ingredient plus the scaled sum of the others' differences from it",
                   config_class=AnchoredConfig, min_ingredients=2)


@pytest.fixture
def registered():
    register(ENTRY)
    yield ENTRY
    SOUP_METHODS.pop(ENTRY.name)


@pytest.fixture
def ingredients(tmp_path):
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        state = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
        save_file(state, tmp_path / f"ing{i}.safetensors")
        paths.append(tmp_path / f"ing{i}.safetensors")
    return paths


def expected(paths, scale):
    states = [{k: v.double() for k, v in load_file(p).items()} for p in paths]
    return {k: (states[0][k] + scale * sum(s[k] - states[0][k] for s in states[1:])).float()
            for k in states[0]}


def test_a_registered_method_runs_through_the_job(registered, ingredients, tmp_path):
    run = run_soup(SoupConfig([str(p) for p in ingredients], method="anchored",
                              out=tmp_path / "soup.safetensors", method_settings={"scale": 0.3},
                              device="cpu", progress=False))
    want = expected(ingredients, 0.3)
    written = load_file(tmp_path / "soup.safetensors")
    for name, value in want.items():
        assert torch.equal(run.soup.state[name], value)
        assert torch.equal(written[name], value)
    assert run.rows[-1]["method"] == "anchored"
    assert run.soup.coefficients[:, 0].tolist() == pytest.approx([0.4, 0.3, 0.3])


def test_a_registered_method_is_a_cli_choice_with_flags_from_its_config(
        registered, ingredients, tmp_path, capsys):
    out = tmp_path / "soup"
    assert main(["soup", "--method", "anchored", *map(str, ingredients), "--scale",
                 "0.25", "--out", str(out / "soup.safetensors"), "--quiet"]) == 0
    want = expected(ingredients, 0.25)
    written = load_file(out / "soup.safetensors")
    assert all(torch.equal(written[k], v) for k, v in want.items())
    with pytest.raises(SystemExit):
        main(["soup", "--help"])
    help_text = capsys.readouterr().out
    assert "anchored" in help_text
    assert "--scale SCALE" in help_text and "The task vectors' scale (lambda)." in help_text
