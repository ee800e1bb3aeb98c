"""benchmarks/merge_quality.py on tiny LMs: every kind of contender runs through the soup job
and the summary gives bootstrap intervals (the BBC setup itself is lm_soup's)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import load_benchmark
from lm_models import CORPUS
from test_soup_init import lm_ingredients

from upcycle.errors import UpcycleWarning

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("merge_quality")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("mq")
    base, folders = lm_ingredients(root)
    files = {}
    for split, lines in (("held_out", CORPUS[:6]), ("test", CORPUS[6:] or CORPUS)):
        files[split] = str(root / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return {"base": str(base), "ingredients": folders, **files}


def test_every_kind_of_contender_and_the_summary(bench, paths, monkeypatch):
    monkeypatch.setattr(bench, "GRIDS", {"ties": {"density": (0.5,), "lambda_": (0.5, 1.0)}})
    common = {"paths": paths, "seq": 16, "batch": 4, "threads": 1}
    specs = [
        {"name": "base", "kind": "base", "method": "base"},
        {"name": "best ingredient", "kind": "best", "method": "best"},
        {"name": "ties", "kind": "merge", "method": "ties"},
        {"name": "slerp", "kind": "merge", "method": "slerp"},
        {"name": "greedy (ingredients + merges)", "kind": "fit", "method": "greedy",
         "settings": {"candidates": ["ingredients", "ties"], "density": 0.5}},
        {"name": "mehl+ (init ties)", "kind": "fit", "method": "mehl+",
         "settings": {"init": "ties", "epochs": 1, "model_batch": 2}},
    ]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpcycleWarning)
        for spec in specs:
            rows.append({**spec, **common, **bench.run_worker({**spec, **common})})
    by = {r["name"]: r for r in rows}
    assert by["ties"]["picked"] in ("density=0.5, lambda=0.5", "density=0.5, lambda=1.0")
    assert len(by["ties"]["grid"]) == 2
    assert by["slerp"]["picked"].count("+") == 1  # the two best ingredients
    assert "keep_best" in by["mehl+ (init ties)"]
    for r in rows:
        assert r["test_ppl"] > 1 and r["held_out_ppl"] > 1
    from lm_soup import summarize

    text = summarize(rows)
    assert "mehl+ (init ties)" in text and all("test_ppl_ci95" in r for r in rows)


def test_qwen2_family_adapters_train_the_tied_head(bench, tmp_path):
    """lm_setup's second family: a tied Qwen2 whose LoRA recipes also train the tied
    embedding/head (a LoRA on it, or saved whole, peft's ensure_weight_tying); upcycle reads
    each adapter as the model it trained (the logits of peft's unmerged adapter model)."""
    import torch
    from lm_models import save_lm, tiny_tokenizer
    from lm_setup import Sizes, _config, _lora_config, recipes
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from upcycle.io.ingredients import open_ingredients

    tok = tiny_tokenizer()
    sizes = Sizes(hidden=32, layers=1, heads=4, seq=16, family="qwen2")
    config = _config(sizes, tok)
    assert config.model_type == "qwen2" and config.tie_word_embeddings
    assert config.num_key_value_heads == 2
    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_config(config)
    base = save_lm(base_model, tmp_path / "base", tok)
    x = torch.randint(0, len(tok), (2, 12))
    loras = [r for r in recipes(4) if r["kind"] == "lora"]  # a LoRA on the embedding; saved whole
    kinds = set()
    for recipe in loras:
        lora = _lora_config(sizes, recipe)
        kinds.add("modules_to_save" if lora.modules_to_save else "lora")
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
        with torch.no_grad():  # as if trained: every trainable tensor moved
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        peft_model.save_pretrained(tmp_path / recipe["name"])
        with torch.no_grad():
            want = peft_model.eval()(input_ids=x).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UpcycleWarning)
            ing = open_ingredients([str(tmp_path / recipe["name"])], base=str(base))[0]
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        model.load_state_dict(ing.state_dict(), strict=False)
        with torch.no_grad():
            got = model(input_ids=x).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert not torch.equal(ing.get("model.embed_tokens.weight"),
                               base_model.model.embed_tokens.weight)
    assert kinds == {"lora", "modules_to_save"}
