"""Learned soups started from a merge (--init), greedy over merges (--candidates), keep-best,
the few-steps warning, and bad --init / --candidates as one error line."""

import json
import warnings

import pytest
import torch
from lm_models import CORPUS, save_lm, tiny_lm, tiny_tokenizer, write_lines
from safetensors.torch import save_file
from test_soup import Net, loss_fn, make_data, write_ingredients

from upcycle import UpcycleError
from upcycle.cli.main import main
from upcycle.errors import UpcycleWarning
from upcycle.io.checkpoints import Ingredient
from upcycle.soup import (
    GreedyConfig,
    LearnedConfig,
    MehlConfig,
    SoupContext,
    learned_soup,
    mehl_soup,
)
from upcycle.soup.anchor import merge_choices
from upcycle.soup.greedy import _run as greedy_run
from upcycle.soup.keep_best import not_kept_row
from upcycle.soup.registry import get_method

SETTINGS = {"ties": {"density": 0.5}, "dare-linear": {"density": 0.5},
            "dare-ties": {"density": 0.5}, "task-arithmetic": {"lambda_": 0.5}}


def _base(tmp_path):
    torch.manual_seed(0)  # the Net write_ingredients perturbs
    path = tmp_path / "base" / "base.safetensors"
    path.parent.mkdir()
    save_file(Net().state_dict(), str(path))
    return Ingredient(path, role="--base")


def _inputs(tmp_path, init):
    ings = write_ingredients(tmp_path / "ings", 2 if init == "slerp" else 3)
    base = _base(tmp_path)
    merge = get_method(init)
    merge_config = merge.make_config(len(ings), **SETTINGS.get(init, {}))
    merged = merge.run(ings, SoupContext(base=base), merge_config)
    return ings, base, merged, {init: merge_config} if merge_config is not None else None


@pytest.mark.parametrize("init", merge_choices())
@pytest.mark.parametrize("method", ["mehl+", "learned+"])
def test_each_init_is_the_merge_at_step_zero(tmp_path, init, method):
    ings, base, merged, configs = _inputs(tmp_path, init)
    data = make_data(32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpcycleWarning)
        if method == "mehl+":  # lr 0: no coefficient step moves; the soup is the start
            soup = mehl_soup(ings, Net(), data, loss_fn=loss_fn, base=base, config=MehlConfig(
                model_batch=2, epochs=1, lr=0.0, init=init, merge_configs=configs))
        else:
            soup = learned_soup(ings, Net(), data, loss_fn=loss_fn, base=base,
                                config=LearnedConfig(epochs=1, lr=0.0, init=init,
                                                     merge_configs=configs))
    kept = soup.info["keep_best"]
    assert kept["kept"] == "start" and kept["init"] == init
    for name, _ in Net().named_parameters():
        if method == "mehl+":
            assert torch.equal(soup.state[name], merged.state[name]), name
        else:
            assert torch.allclose(soup.state[name], merged.state[name], atol=1e-6), name
        # the coefficients reproduce the soup over their rows (the anchor's own, or "the
        # anchor" then the ingredients)
        col = soup.blocks.index(name)
        states = {str(i.path): i.get(name).double() for i in [base, *ings]}
        states.update({r: merged.state[name].double() for r in soup.ingredients if r.startswith("<")})
        recon = sum(soup.coefficients[r, col] * states[row] for r, row in enumerate(soup.ingredients))
        assert torch.allclose(recon, soup.state[name].double(), atol=1e-5), name


def test_a_fit_that_gets_worse_returns_its_start_and_says_so(tmp_path):
    ings = write_ingredients(tmp_path, 4, noise=0.5)
    data = make_data(64)
    start = get_method("uniform").run(ings, SoupContext(), None).state
    with pytest.warns(UpcycleWarning, match=r"did not improve on its start \(--init uniform\): "
                      r"held-out loss \d\.\d{4} at the start, \d+\.\d{4} at best"):
        soup = mehl_soup(ings, Net(), data, loss_fn=loss_fn,
                         config=MehlConfig(model_batch=2, epochs=3, lr=50.0))
    kept = soup.info["keep_best"]
    assert not kept["improved"] and kept["fit_best_held_out"]["loss"] > kept["start"]["loss"]
    for name, _ in Net().named_parameters():
        assert torch.equal(soup.state[name], start[name]), name
    assert soup.coefficients.allclose(torch.full_like(soup.coefficients, 0.25))
    row = not_kept_row("mehl+", soup)
    assert row["method"].startswith("mehl+ fit, not kept") and row["held_out_loss"] > 0


def test_keep_best_returns_the_best_round(tmp_path):
    ings = write_ingredients(tmp_path, 4, noise=0.5)
    soup = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn,
                     config=MehlConfig(model_batch=2, epochs=5, lr=0.05))
    kept = soup.info["keep_best"]
    losses = [h["held_out_loss"] for h in soup.history]
    assert kept["improved"] and kept["kept_held_out"]["loss"] == min(losses)
    assert kept["kept"] == f"round {losses.index(min(losses)) + 1}"


def test_too_few_steps_a_round_warns_once(tmp_path):
    ings = write_ingredients(tmp_path, 3)
    with pytest.warns(UpcycleWarning, match=r"mehl\+: each round takes 2 coefficient step\(s\) "
                      r"\(1 epoch\(s\) x 2 held-out batch\(es\)\), fewer than the 10") as seen:
        mehl_soup(ings, Net(), make_data(32), loss_fn=loss_fn,
                  config=MehlConfig(model_batch=2, epochs=1))
    assert sum("coefficient step" in str(w.message) for w in seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UpcycleWarning)
        learned_soup(ings, Net(), make_data(32), loss_fn=loss_fn, config=LearnedConfig(epochs=5))


def test_greedy_compares_merges_with_the_ingredients(tmp_path):
    ings = write_ingredients(tmp_path / "ings", 3, noise=0.5)
    base = _base(tmp_path)
    data = make_data()
    model = Net()

    def score(state):
        model.load_state_dict(state)
        with torch.no_grad():
            return -float(sum(loss_fn(model, b) for b in data))

    config = GreedyConfig(candidates=["ingredients,ties", "uniform"])
    assert config.candidates == ["ingredients", "ties", "uniform"]
    config.merge_configs = {"ties": get_method("ties").make_config(3, density=0.5),
                            "uniform": None}
    soup = greedy_run(ings, SoupContext(score_fn=score, base=base), config)
    assert soup.info["candidates"][3:] == ["<ties merge>", "<uniform merge>"]
    assert len(soup.info["ingredient_scores"]) == 5
    assert soup.info["best_score"] >= max(soup.info["ingredient_scores"])
    with pytest.raises(UpcycleError, match="--candidates ties needs --base"):
        greedy_run(ings, SoupContext(score_fn=score), GreedyConfig(candidates=["ties"]))


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv, message", [
    (["--method", "mehl+", "--init", "nope"],
     "--init nope: not a fixed-weight merge; choose from uniform, linear"),
    (["--method", "learned+", "--init", "ties"], "--init ties needs --base"),
    (["--method", "mehl+", "--init", "slerp"], "--init slerp: method 'slerp' needs exactly 2"),
    (["--method", "mehl+", "--init", "ties", "--density", "0", "--base", "BASE"],
     "--density 0.0: expected"),
    (["--method", "greedy", "--candidates", "ingredients,greedy"],
     "--candidates greedy: not a fixed-weight merge"),
])
def test_bad_init_is_one_error_line_and_nothing_is_written(tmp_path, capsys, argv, message):
    ings = write_ingredients(tmp_path / "ings", 3)
    held = write_lines(tmp_path / "held.txt", ["x"])
    out = tmp_path / "out"
    argv = [str(_base(tmp_path).path) if a == "BASE" else a for a in argv]
    code = main(["soup", *[str(i.path) for i in ings], *argv, "--held-out", str(held),
                 "--out", str(out), "--quiet"])
    lines = _err(capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("upcycle soup: error:") and message in lines[0], lines
    assert not out.exists()


def lm_ingredients(root, n=3):
    """A tiny tied Llama saved as the base and ``n`` perturbed copies of it (folders)."""
    tok = tiny_tokenizer()
    model = tiny_lm("llama", tie=True)
    base = save_lm(model, root / "base", tok)
    folders = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        m = type(model)(model.config)
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        folders.append(str(save_lm(m, root / f"ing{i}", tok)))
    return base, folders


def test_cli_mehl_from_task_arithmetic_and_greedy_over_merges(tmp_path, capsys):
    base, folders = lm_ingredients(tmp_path)
    held = write_lines(tmp_path / "held.txt", CORPUS)
    common = [*folders, "--held-out", str(held), "--base", str(base), "--quiet",
              "--max-length", "16", "--batch-size", "4"]
    out = tmp_path / "mehl"
    assert main(["soup", "--method", "mehl+", "--init", "task-arithmetic", "--lambda", "0.5",
                 "--epochs", "1", "--model-batch", "2", "--out", str(out), *common]) == 0
    report = json.loads((out / "report.json").read_text())
    info = report["soup"]["info"]
    assert info["init"] == "task-arithmetic" and "keep_best" in info
    assert report["soup"]["ingredients"][0] == str(base)  # the base row comes first
    assert main(["soup", "--method", "greedy", "--candidates", "ingredients,task-arithmetic",
                 "--out", str(tmp_path / "greedy"), *common]) == 0
    report = json.loads((tmp_path / "greedy" / "report.json").read_text())
    assert report["soup"]["info"]["candidates"][-1] == "<task-arithmetic merge>"
    capsys.readouterr()
