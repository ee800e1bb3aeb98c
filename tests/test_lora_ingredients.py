"""peft LoRA adapters as soup ingredients: base + scale * B @ A formed per tensor, on demand."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
from lm_models import save_lm, tiny_lm

from upcycle.errors import UpcycleError
from upcycle.io.ingredients import open_ingredients, validate_ingredients
from upcycle.io.lora import LoraIngredient
from upcycle.soup import uniform_soup

GPT2_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
         use_rslora=True, modules_to_save=["ln_f"]),
    dict(r=8, lora_alpha=16, target_modules=["c_proj", "c_fc"], fan_in_fan_out=True,
         rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"c_proj": 3}, bias="lora_only"),
]
LLAMA_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
         use_rslora=True, rank_pattern={"layers.0.self_attn.q_proj": 6}),
    dict(r=3, lora_alpha=5, target_modules=["gate_proj", "down_proj", "embed_tokens"],
         alpha_pattern={"down_proj": 7}),
]


def _make_adapters(kind, tmp_path, configs):
    """Base folder, adapter folders and the merged state dict of each (peft merge_and_unload)."""
    from peft import LoraConfig, get_peft_model

    base_model = tiny_lm(kind, tie=(kind == "gpt2"))
    base = save_lm(base_model, tmp_path / "base")
    folders, merged = [], []
    for i, cfg in enumerate(configs):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(copy.deepcopy(base_model),
                                    LoraConfig(init_lora_weights=False, **cfg))
        with torch.no_grad():  # non-zero B and trained-looking saved modules / biases
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        folder = tmp_path / f"adapter{i}"
        peft_model.save_pretrained(folder)
        merged.append({k: v.detach().clone()
                       for k, v in peft_model.merge_and_unload().state_dict().items()})
        folders.append(folder)
    return base, folders, merged


@pytest.mark.parametrize("kind,configs", [("gpt2", GPT2_CONFIGS), ("llama", LLAMA_CONFIGS)])
def test_uniform_soup_of_adapters_is_the_mean_of_merged_models(kind, configs, tmp_path):
    base, folders, merged = _make_adapters(kind, tmp_path, configs)
    ings = open_ingredients(folders, base=base)
    assert all(isinstance(ing, LoraIngredient) for ing in ings)
    validate_ingredients(ings)
    for ing, m in zip(ings, merged):  # each ingredient is its merged model, tensor by tensor
        for name in ing.keys():
            assert torch.allclose(ing.get(name), m[name], atol=1e-6, rtol=0), name
    soup = uniform_soup(ings)
    changed = 0
    for name in ings[0].keys():
        mean = sum(m[name].double() for m in merged) / len(merged)
        assert torch.allclose(soup.state[name].double(), mean, atol=1e-6, rtol=0), name
        changed += not torch.equal(soup.state[name], ings[0].base.get(name))
    assert changed >= 4


def test_adapters_and_full_checkpoints_mix(tmp_path):
    base, folders, merged = _make_adapters("llama", tmp_path, LLAMA_CONFIGS[:2])
    full = tiny_lm("llama", tie=False, seed=5)
    full_dir = save_lm(full, tmp_path / "full")
    ings = open_ingredients([folders[0], full_dir, folders[1]], base=base)
    validate_ingredients(ings)
    soup = uniform_soup(ings)
    full_state = full.state_dict()
    for name in ings[0].keys():
        mean = (merged[0][name].double() + full_state[name].double() + merged[1][name].double()) / 3
        assert torch.allclose(soup.state[name].double(), mean, atol=1e-6, rtol=0), name
    # a folder of adapters and checkpoints expands like any folder of checkpoints
    assert len(open_ingredients([tmp_path], base=base)) == 4  # adapter0, adapter1, base, full


def test_get_keeps_no_merged_tensor(tmp_path):
    base, folders, _ = _make_adapters("gpt2", tmp_path, GPT2_CONFIGS[:1])
    ing = open_ingredients(folders, base=base)[0]
    name = ing.targets[0]
    t = ing.get(name)
    ref = weakref.ref(t)
    first = t.clone()
    del t
    gc.collect()
    assert ref() is None  # nothing inside the ingredient holds the merged tensor
    assert torch.equal(ing.get(name), first)  # formed again, identically, on the next call
    held = [v for v in vars(ing).values() if isinstance(v, torch.Tensor)]
    held += [v for v in vars(ing.base).values() if isinstance(v, torch.Tensor)]
    assert not held and ing._torch_state is None


def test_adapter_errors(tmp_path):
    from peft import LoraConfig, get_peft_model

    base, folders, _ = _make_adapters("llama", tmp_path, LLAMA_CONFIGS[:1])
    with pytest.raises(UpcycleError, match=r"adapter0.*LoRA adapter.*pass --base"):
        open_ingredients(folders)
    # an adapter trained on a wider model
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        vocab_size=320))
    get_peft_model(wide, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "w")
    with pytest.raises(UpcycleError, match=r"q_proj.*B @ A has shape \(48, 48\).*has \(32, 32\).*"
                                           r"another base"):
        open_ingredients([tmp_path / "w"], base=base)
    # an adapter recording another base folder that exists: the configs are compared
    wide.save_pretrained(tmp_path / "wide_base")
    cfg_file = folders[0] / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "wide_base")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UpcycleError, match=r"trained on .*wide_base, whose config differs from the "
                                           r"base .*hidden_size: 48 vs 32"):
        open_ingredients(folders, base=base)
    cfg["base_model_name_or_path"] = str(base)  # its own base: fine
    cfg_file.write_text(json.dumps(cfg))
    assert open_ingredients(folders, base=base)[0].targets
    cfg["use_dora"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UpcycleError, match=r"uses DoRA"):
        open_ingredients(folders, base=base)
    cfg["use_dora"], cfg["peft_type"] = False, "IA3"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UpcycleError, match=r"peft_type IA3; only LoRA"):
        open_ingredients(folders, base=base)


def test_mehl_soup_runs_on_adapters(tmp_path):
    from upcycle.soup import MehlConfig, mehl_soup
    from upcycle.tasks.causal_lm import causal_lm_loss

    base, folders, merged = _make_adapters("llama", tmp_path, LLAMA_CONFIGS[:2])
    ings = open_ingredients(folders, base=base)
    gen = torch.Generator().manual_seed(0)
    held_out = []
    for _ in range(2):
        ids = torch.randint(0, 320, (4, 12), generator=gen)
        held_out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    soup = mehl_soup(ings, tiny_lm("llama", tie=False), held_out, loss_fn=causal_lm_loss,
                     config=MehlConfig(model_batch=2, epochs=1))
    assert torch.allclose(soup.coefficients.sum(0), torch.ones(1, dtype=torch.float64))
    c = soup.coefficients[:, soup.blocks.index("model.layers.0.self_attn.q_proj.weight")]
    expected = c[0] * merged[0]["model.layers.0.self_attn.q_proj.weight"].double() + \
        c[1] * merged[1]["model.layers.0.self_attn.q_proj.weight"].double()
    assert torch.allclose(soup.state["model.layers.0.self_attn.q_proj.weight"].double(), expected,
                          atol=1e-5)
