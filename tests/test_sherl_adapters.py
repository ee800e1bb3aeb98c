"""Adapter folders of upcycle's own tuners (SHERL, LST, SNELL): the marker that tells them
from peft adapters, what ``upcycle soup`` says about them, and LST's save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from upcycle.cli.main import main
from upcycle.errors import UpcycleError
from upcycle.tune.lst import LadderSideModel, LstConfig, get_lst_model
from upcycle.tune.sherl import SherlConfig, get_sherl_model
from upcycle.tune.snell import SnellConfig, get_snell_model, save_snell

T = pytest.importorskip("transformers")


def llama(head: str = "classifier", seed: int = 0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                           pad_token_id=0, num_labels=2)
    cls = T.LlamaForSequenceClassification if head == "classifier" else T.LlamaForCausalLM
    return cls(config).eval()


@pytest.fixture
def base_folder(tmp_path):
    return llama("lm").save_pretrained(tmp_path / "base") or tmp_path / "base"


def soup_error(capsys, *ingredients, base=None) -> str:
    args = ["soup", *map(str, ingredients), "--out", "unused-out", "--quiet"]
    if base is not None:
        args += ["--base", str(base)]
    capsys.readouterr()  # what came before (progress bars of saving the base)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("upcycle soup: error: "), err
    return err[0]


@pytest.mark.parametrize("method", ["sherl", "lst", "snell"])
def test_adapter_folders_carry_the_marker_and_soup_says_what_to_do(method, tmp_path, capsys,
                                                                  base_folder):
    model = {"sherl": lambda: get_sherl_model(llama("lm"), SherlConfig(late_layers=1)),
             "lst": lambda: get_lst_model(llama(), LstConfig(reduction=4)),
             "snell": lambda: get_snell_model(llama("lm"), SnellConfig(r=2))}[method]()
    if method == "snell":  # a peft method: peft's folder, marked by its peft_type
        folder = save_snell(model, tmp_path / method)
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["peft_type"] == "SNELL"
    else:
        folder = model.save_pretrained(tmp_path / method)
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["upcycle_adapter"] == method == saved["method"]
        assert "peft_type" not in saved
    line = soup_error(capsys, folder, folder, base=base_folder)
    assert f"a {method.upper()} adapter" in line and "not a LoRA adapter" in line
    if method == "snell":
        assert "soup the folder written by `upcycle tune --merge`" in line
    else:
        assert "cannot be souped (it replaces the forward;" in line
    # also without --base (the question of a base never comes up)
    assert "not a LoRA adapter" in soup_error(capsys, folder, folder)


@pytest.mark.parametrize("config", [{"peft_type": "SNELL", "r": 2},
                                    {"method": "sherl", "late_layers": 1}])
def test_peft_format_snell_and_unmarked_old_folders(config, tmp_path, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    line = soup_error(capsys, folder, folder)
    if "peft_type" in config:
        assert "a SNELL adapter" in line and "`upcycle tune --merge`" in line
    else:
        assert "a SHERL adapter" in line and "cannot be souped" in line


def test_lst_save_load_and_trainer_save_model(tmp_path):
    from upcycle.training.trainer import UpcycleTrainer, UpcycleTrainingArguments

    model = get_lst_model(llama(), LstConfig(reduction=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(1, 40, (2, 7))
    trainer = UpcycleTrainer(model=model, args=UpcycleTrainingArguments(
        output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True))
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["method"] == "lst" and saved["base"]["family"] == "llama"
    loaded = LadderSideModel.from_pretrained(llama(), tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)
    torch.manual_seed(0)
    wider = T.LlamaForSequenceClassification(T.LlamaConfig(
        vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, pad_token_id=0, num_labels=2))
    with pytest.raises(UpcycleError, match="trained on another backbone: hidden_size 32 "
                                           "\\(base model: 64\\)"):
        LadderSideModel.from_pretrained(wider, tmp_path / "saved")
