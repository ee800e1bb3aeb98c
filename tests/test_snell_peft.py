"""SNELL as a peft method: what peft and TRL do for LoRA, they do for SNELL (issue #20)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_decoded, shown
from lm_models import CORPUS, save_lm, tiny_lm, tiny_tokenizer
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import upcycle
from upcycle.errors import UpcycleError
from upcycle.tune.snell import (
    PEFT_ERROR,
    TESTED_PEFT,
    SnellConfig,
    SnellLayer,
    get_snell_model,
    load_snell,
)

SRC = str(Path(upcycle.__file__).resolve().parents[1])


def cfg(**over) -> SnellConfig:
    return SnellConfig(**{"r": 4, "sparsity": 0.5, "dropout": 0.0, "drop_path": 0.0, **over})


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(seed))


def bump(model, adapter: str = "default", scale: float = 30.0):
    """A larger update than the init's (B scaled), so that outputs move."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SnellLayer) and adapter in module.snell_B:
                module.snell_B[adapter].mul_(scale)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_installed_peft_is_a_tested_one():
    # a peft outside the tested range turns SNELL off; CI must notice, not skip
    assert PEFT_ERROR is None, PEFT_ERROR
    assert PeftConfig.from_peft_type(peft_type="SNELL", r=4).__class__ is SnellConfig
    assert TESTED_PEFT in (Path(SRC).parent / "pyproject.toml").read_text()


def test_get_peft_model_save_and_the_three_peft_loaders(tmp_path):
    base_dir = save_lm(tiny_lm("llama"), tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg())  # peft's own entry point
    assert isinstance(model, PeftModel)
    bump(model)
    model.eval()
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert record["peft_type"] == "SNELL" and record["base_model_name_or_path"] == str(base_dir)
    assert isinstance(PeftConfig.from_pretrained(str(tmp_path / "adapter")), SnellConfig)
    for loaded in (PeftModel.from_pretrained(tiny_lm("llama"), str(tmp_path / "adapter")),
                   AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")),
                   upcycle.tune.load(tmp_path / "adapter")):
        torch.testing.assert_close(logits(loaded.eval(), x), expected, atol=1e-6, rtol=0)


def test_merge_and_unload_disable_adapter_and_named_adapters():
    x = ids()
    model = get_snell_model(tiny_lm("llama"), cfg())
    plain = logits(model.get_base_model(), x)  # the adapter starts near zero, not at zero
    bump(model)
    model.eval()
    first = logits(model, x)
    with model.disable_adapter():  # what TRL's DPO does for its reference model
        torch.testing.assert_close(logits(model, x), logits(tiny_lm("llama"), x))
    torch.testing.assert_close(logits(model, x), first)
    model.add_adapter("other", cfg(sparsity=0.8))
    bump(model, "other", 100.0)
    model.set_adapter("other")
    other = logits(model, x)
    assert not torch.allclose(other, first)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, x), first)
    model.delete_adapter("other")
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SnellLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), first, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(first, plain)


def test_all_linear_targets_every_linear_but_the_head():
    model = get_snell_model(tiny_lm("llama"), cfg(target_modules="all-linear"))
    adapted = set(model.snell_layers())
    assert len(adapted) == 2 * 7 and not any("lm_head" in n for n in adapted)


def test_a_module_snell_cannot_wrap_is_named_before_training():
    with pytest.raises(UpcycleError, match=r"'model\.embed_tokens', a Embedding; SNELL adapts "
                                           r"nn\.Linear"):
        get_snell_model(tiny_lm("llama"), cfg(target_modules=["embed_tokens"]))


def test_folders_of_the_earlier_format_still_load(tmp_path):
    """A folder written before SNELL was a peft method: "method": "snell", names without
    peft's prefix (what upcycle 0.2's save_pretrained wrote)."""
    model = get_snell_model(tiny_lm("gpt2"), cfg(learnable_coeffs=True))
    bump(model)
    model.eval()
    x = ids()
    expected = logits(model, x)
    folder = tmp_path / "old"
    folder.mkdir()
    config = model.snell_config.method_dict()
    for key in ("exclude_modules", "target_parameters", "base_model_class",
                "base_model_labels"):
        config.pop(key)  # fields added since
    config.update(method="snell", base_model_type="gpt2", base_model_name_or_path=None)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = {n.removeprefix("base_model.model.").replace(".default", ""): t.contiguous()
             for n, t in model.state_dict().items() if ".snell_" in n and "fixed" not in n}
    save_file(state, str(folder / "adapter_model.safetensors"))
    reloaded = load_snell(tiny_lm("gpt2"), folder)
    torch.testing.assert_close(logits(reloaded, x), expected, atol=1e-6, rtol=0)
    state.pop(next(iter(state)))
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(UpcycleError, match="is missing"):
        load_snell(tiny_lm("gpt2"), folder)


def test_a_peft_outside_the_tested_range_is_one_clear_error(tmp_path):
    code = ("import peft; peft.__version__ = '9.0.0'\n"
            "from upcycle.cli.main import main\n"
            "raise SystemExit(main(['tune', '--method', 'snell', '--model', 'm', '--data', "
            "'d.jsonl', '--out', 'o']))\n")
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    done = run_decoded([sys.executable, "-c", code], cwd=tmp_path, env=env)
    lines = [line for line in shown(done.stderr) if line.startswith("upcycle")]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert lines and lines[0].startswith("upcycle tune: error: SNELL's peft integration is "
                                         "tested with peft") and "9.0.0" in lines[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_base_trains_and_merges(bits, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = save_lm(tiny_lm("llama"), tmp_path / "base")
    quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32) if bits == 4
                    else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    peft_model = get_snell_model(model, cfg(target_modules=["q_proj", "v_proj"]))
    wrapped = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, SnellLayer) and isinstance(wrapped.base_layer, kind)
    assert wrapped.snell_A["default"].dtype == torch.float32  # the compute dtype
    packed = wrapped.base_layer.weight
    x = ids()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    A0 = wrapped.snell_A["default"].detach().clone()
    peft_model.train()
    for _ in range(2):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and not torch.equal(A0, wrapped.snell_A["default"])
    assert wrapped.base_layer.weight is packed  # the base was never dequantized nor replaced
    bump(peft_model)
    peft_model.eval()
    before = logits(peft_model, x)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, kind)
    # requantized after the merge: equal up to the rounding of the updated weights
    assert (logits(merged, x) - before).abs().max() < 0.5


def test_torchao_int8_base_trains():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny_lm("llama")
    quantize_(model.model.layers, Int8WeightOnlyConfig())
    peft_model = get_snell_model(model, cfg(target_modules=["q_proj"]))
    x = ids()
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    del torchao


def test_trl_sft_trainer_with_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4,
                         max_steps=3, bf16=False, use_cpu=True, report_to=[],
                         save_strategy="no", max_length=32, learning_rate=1e-2)
    trainer = trl.SFTTrainer(model=tiny_lm("llama", vocab_size=len(tokenizer)), args=args,
                             processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"text": t} for t in CORPUS]),
                             peft_config=cfg())
    assert isinstance(trainer.model, PeftModel)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    trainer.train()
    assert before and all(".snell_" in n for n in before)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()
               if n in before)
    trainer.save_model(str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert saved and all(".snell_" in k for k in saved)  # the adapter only
    reloaded = PeftModel.from_pretrained(tiny_lm("llama", vocab_size=len(tokenizer)),
                                         str(tmp_path / "out"))
    trainer.model.eval()
    x = ids()
    torch.testing.assert_close(logits(reloaded, x), logits(trainer.model, x))
