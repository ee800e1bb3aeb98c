"""Soups of causal-LM ingredients: tied embeddings are one parameter, the written soup
reloads tied, keeps dtype and generation_config; MEHL with the token loss lowers held-out loss."""

from __future__ import annotations

import json

import pytest
import torch
from lm_models import CORPUS, save_lm, tiny_lm, tiny_tokenizer, write_lines
from safetensors import safe_open
from safetensors.torch import save_file

from upcycle.io.ingredients import open_ingredients
from upcycle.soup import LearnedConfig, MehlConfig, learned_soup, mehl_soup, uniform_soup
from upcycle.soup.common import load_state, parameter_names
from upcycle.tasks.causal_lm import CausalLMTask, causal_lm_loss, evaluate

KINDS = [("gpt2", True), ("llama", True), ("llama", False)]
WTE = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}


def _pretrained(kind, tie, tokenizer, tmp_path):
    """A briefly trained tiny LM (so perturbations of it hurt)."""
    model = tiny_lm(kind, tie=tie)
    folder = save_lm(model, tmp_path / "base", tokenizer)
    task = CausalLMTask(folder, max_length=16)
    data = task.read(write_lines(tmp_path / "train.txt", CORPUS))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        for batch in task.batches(data, 8):
            opt.zero_grad()
            causal_lm_loss(model, batch).backward()
            opt.step()
    model.eval()
    return model, task, data


def _ingredients(model, tokenizer, tmp_path, *, noise=(0.002, 0.15, 0.15), both_keys=False,
                 dtype=torch.float32):
    """Ingredient folders: the model plus noise of each scale; optionally written with both
    tied keys (lm_head.weight beside the embedding), as some fine-tuning scripts do."""
    folders = []
    for i, sigma in enumerate(noise):
        gen = torch.Generator().manual_seed(100 + i)
        m = type(model)(model.config)
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(sigma * torch.randn(p.shape, generator=gen))
        m.generation_config.max_new_tokens = 7
        m = m.to(dtype)
        folder = save_lm(m, tmp_path / f"ing{i}", tokenizer)
        if both_keys:
            state = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders


def _stored_keys(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("kind,tie", KINDS)
def test_tied_embedding_is_one_parameter(kind, tie, tokenizer, tmp_path):
    model, _, _ = _pretrained(kind, tie, tokenizer, tmp_path)
    ings = open_ingredients(_ingredients(model, tokenizer, tmp_path, both_keys=True))
    names, others = parameter_names(model, ings)
    assert "lm_head.weight" in ings[0].keys()
    assert ("lm_head.weight" in names) == (not tie)
    assert "lm_head.weight" not in others  # never averaged like a buffer
    assert WTE[kind] in names


@pytest.mark.parametrize("kind,tie", KINDS)
@pytest.mark.parametrize("both_keys", [False, True])
def test_uniform_lm_soup_is_the_mean_and_reloads_tied(kind, tie, both_keys, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, _ = _pretrained(kind, tie, tokenizer, tmp_path)
    folders = _ingredients(model, tokenizer, tmp_path, both_keys=both_keys, dtype=torch.bfloat16)
    ings = open_ingredients(folders)
    soup = uniform_soup(ings)
    for name in ings[0].keys():
        mean = sum(ing.get(name).double() for ing in ings) / len(ings)
        assert soup.state[name].dtype == torch.bfloat16
        assert torch.equal(soup.state[name], mean.to(torch.bfloat16)), name
    out = soup.save(tmp_path / "soup", source_dir=folders[0])
    keys = _stored_keys(out)
    assert ("lm_head.weight" in keys) == (not tie)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tie
    assert torch.equal(loaded.get_input_embeddings().weight, soup.state[WTE[kind]])
    assert torch.equal(loaded.lm_head.weight, soup.state["lm_head.weight" if not tie or both_keys
                                                         else WTE[kind]])
    assert loaded.generation_config.max_new_tokens == 7


@pytest.mark.parametrize("kind,tie", KINDS)
def test_mehl_lm_soup_lowers_held_out_loss_and_stays_tied(kind, tie, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, task, data = _pretrained(kind, tie, tokenizer, tmp_path)
    folders = _ingredients(model, tokenizer, tmp_path, both_keys=True)
    ings = open_ingredients(folders)
    held_out = task.batches(data, 8)
    soup_model = task.load_model()
    uniform = uniform_soup(ings)
    load_state(soup_model, uniform.state)
    uniform_loss = evaluate(soup_model, held_out)["loss"]
    soup = mehl_soup(ings, soup_model, held_out, loss_fn=causal_lm_loss,
                     config=MehlConfig(model_batch=3, epochs=3, lr=0.1))
    assert soup.state["lm_head.weight"] is soup.state[WTE[kind]] if tie else True
    fitted = task.load_model()
    load_state(fitted, soup.state)
    mehl_loss = evaluate(fitted, held_out)["loss"]
    assert mehl_loss < uniform_loss - 0.02
    out = soup.save(tmp_path / "soup", source_dir=folders[0])
    assert ("lm_head.weight" in _stored_keys(out)) == (not tie)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tie
    assert evaluate(loaded, held_out)["loss"] == pytest.approx(mehl_loss, abs=1e-6)


def test_learned_lm_soup_keeps_the_tie(tokenizer, tmp_path):
    model, task, data = _pretrained("gpt2", True, tokenizer, tmp_path)
    ings = open_ingredients(_ingredients(model, tokenizer, tmp_path, both_keys=True))
    held_out = task.batches(data, 8)
    soup = learned_soup(ings, task.load_model(), held_out, loss_fn=causal_lm_loss,
                        config=LearnedConfig(epochs=2))
    assert soup.state["lm_head.weight"] is soup.state["transformer.wte.weight"]
    assert soup.coefficients[0].mean() > soup.coefficients[1].mean()


def test_checkpoint_storing_only_the_head_alias(tokenizer, tmp_path):
    """A checkpoint keeping lm_head.weight instead of the embedding: souped once, written
    under the embedding's name so from_pretrained loads and re-ties it."""
    from transformers import AutoModelForCausalLM

    model, task, data = _pretrained("gpt2", True, tokenizer, tmp_path)
    folders = _ingredients(model, tokenizer, tmp_path, noise=(0.002, 0.05))
    for folder in folders:
        state = {k: v.contiguous() for k, v in
                 AutoModelForCausalLM.from_pretrained(folder).state_dict().items()
                 if k != "transformer.wte.weight"}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ings = open_ingredients(folders)
    soup = mehl_soup(ings, task.load_model(), task.batches(data, 8), loss_fn=causal_lm_loss,
                     config=MehlConfig(model_batch=2, epochs=1))
    out = soup.save(tmp_path / "soup", source_dir=folders[0])
    keys = _stored_keys(out)
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.transformer.wte.weight, soup.state["lm_head.weight"])
