"""The shape of the code that users and contributors rely on: the protocols every task and
tensor source satisfy, and the house rules (file size, imports) that keep the layers honest.
The layers themselves are checked by import-linter (``make lint``)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from lm_models import save_lm, tiny_lm, tiny_tokenizer, write_lines

from upcycle.io import Ingredient, LoraIngredient, TensorSource, open_ingredients
from upcycle.tasks import Task, load_task

SRC = Path(__file__).resolve().parents[1] / "src" / "upcycle"


def test_checkpoints_and_lora_adapters_are_tensor_sources(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_model = tiny_lm("llama")
    base = save_lm(base_model, tmp_path / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base_model),
                                LoraConfig(r=2, target_modules=["q_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    full, lora = open_ingredients([base, tmp_path / "adapter"], base=base)
    assert isinstance(full, Ingredient) and isinstance(lora, LoraIngredient)
    for source in (full, lora):
        assert isinstance(source, TensorSource)
        state = source.state_dict()
        assert source.numel() == sum(v.numel() for v in state.values())
        assert list(state) == source.keys()
        assert all(tuple(state[k].shape) == source.shape(k) for k in state)
    merged = peft_model.merge_and_unload().state_dict()
    name = next(k for k in lora.keys() if "q_proj.weight" in k)
    assert torch.equal(lora.get(name), merged[name])
    assert not torch.equal(full.get(name), merged[name])


@pytest.mark.parametrize("kind", ["classification", "causal-lm"])
def test_both_task_kinds_implement_the_task_protocol(kind, tmp_path):
    tokenizer = tiny_tokenizer()
    if kind == "causal-lm":
        folder = save_lm(tiny_lm("llama"), tmp_path / "lm", tokenizer)
        data = write_lines(tmp_path / "data.txt", ["a b c d e f", "g h i j k l"] * 4)
    else:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32, num_labels=2)
        folder = tmp_path / "bert"
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        data = tmp_path / "data.jsonl"
        data.write_text("".join(f'{{"text": "a b c {i}", "label": {i % 2}}}\n'
                                for i in range(8)))
    task = load_task(folder, data)
    assert isinstance(task, Task) and task.name == kind
    model = task.load_model()
    examples = task.read_training(data)
    batches = task.batches(examples, 4)
    metrics = task.evaluate(model, batches)
    assert set(task.metric_names) <= set(metrics)
    assert isinstance(task.score(metrics), float) and task.describe(metrics)
    assert torch.isfinite(task.loss(model, batches[0]))
    collated = task.collator()([task.dataset(examples)[i] for i in range(2)])
    assert "labels" in collated
    task.save_tokenizer(tmp_path / "tok")
    assert any((tmp_path / "tok").iterdir())


def _sources():
    return sorted(SRC.rglob("*.py"))


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these by concern: {long}"


def test_own_modules_are_imported_at_module_level():
    """A function-level import of upcycle's own modules hides a cycle; only a deferred heavy
    optional dependency (transformers, peft...) may be imported inside a function."""
    found = []
    for path in _sources():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            own = (isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("upcycle"))) or (
                isinstance(node, ast.Import) and any(a.name.startswith("upcycle")
                                                     for a in node.names))
            if not own or id(node) in top:
                continue
            if "deferred" not in lines[node.lineno - 2] + lines[node.lineno - 1]:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, f"import these at module level: {found}"
