"""``upcycle grow``: writes a loadable folder, reports the difference, refuses bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from upcycle.cli.main import main
from upcycle.grow import example_inputs, max_output_difference

transformers = pytest.importorskip("transformers")


@pytest.fixture
def tiny_vit(tmp_path):
    T = transformers
    model = T.ViTForImageClassification(T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=8, patch_size=4, num_channels=1, num_labels=3)).eval()
    path = tmp_path / "small"
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_gpt2(tmp_path):
    T = transformers
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=32)).eval()
    path = tmp_path / "gpt2"
    model.save_pretrained(path)
    return path


def test_grow_writes_loadable_lossless_folder(tiny_gpt2, tmp_path, capsys):
    out = tmp_path / "big"
    code = main(["grow", "--model", str(tiny_gpt2), "--hidden-size", "64", "--layers", "4",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "max output difference vs source" in printed and "argmax identical" in printed
    source = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    grown = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert grown.config.n_embd == 64 and grown.config.n_layer == 4
    assert max_output_difference(source, grown, example_inputs(source))["max_rel"] <= 1e-5
    report = json.loads((out / "growth.json").read_text())
    assert report["max_rel_difference"] <= 1e-5

    # an existing output is refused unless --overwrite
    code = main(["grow", "--model", str(tiny_gpt2), "--hidden-size", "64", "--out", str(out)])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    code = main(["grow", "--model", str(tiny_gpt2), "--hidden-size", "48", "--out", str(out),
                 "--overwrite"])
    assert code == 0
    assert transformers.GPT2LMHeadModel.from_pretrained(out).config.n_embd == 48


def test_grow_then_train(tiny_vit, tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "train.npz"
    np.savez(data, images=rng.integers(0, 255, size=(24, 8, 8)).astype(np.uint8),
             labels=rng.integers(0, 3, size=24))
    out = tmp_path / "big"
    code = main(["grow", "--model", str(tiny_vit), "--hidden-size", "64", "--layers", "3",
                 "--out", str(out), "--train", str(data), "--steps", "3", "--batch-size", "8",
                 "--scratch-lr", "1e-4", "--scratch-warmup", "1", "--grad-accum", "2",
                 "--device", "cpu", "--quiet"])
    assert code == 0
    assert "trained 3 steps on cpu" in capsys.readouterr().out
    model = transformers.ViTForImageClassification.from_pretrained(out)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 3
    assert json.loads((out / "growth.json").read_text())["train"]["steps"] == 3


def test_grow_train_bad_device_or_precision(tiny_vit, tmp_path, capsys):
    data = tmp_path / "train.npz"
    np.savez(data, images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    base = ["grow", "--model", str(tiny_vit), "--hidden-size", "64", "--out",
            str(tmp_path / "big"), "--train", str(data), "--steps", "2", "--scratch-lr", "1e-4",
            "--scratch-warmup", "1", "--quiet"]
    assert main(base + ["--device", "cpu", "--fp16"]) == 2
    assert "--fp16: float16 mixed precision needs a GPU" in capsys.readouterr().err
    assert main(base + ["--batch-size", "6", "--grad-accum", "4"]) == 2
    assert "batch size 6 does not split" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("args, message", [
    (["--hidden-size", "16"], "hidden_size: target 16 is smaller"),
    (["--hidden-size", "50"], "multiple of head_dim"),
    (["--layers", "5"], "stages"),
])
def test_grow_bad_input_is_a_clear_error(tiny_gpt2, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code = main(["grow", "--model", str(tiny_gpt2), "--out", str(out), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_grow_refuses_unsupported_family(tmp_path, capsys):
    T = transformers
    path = tmp_path / "bloom"
    T.BloomModel(T.BloomConfig(vocab_size=50, hidden_size=32, n_layer=1,
                               n_head=4)).save_pretrained(path)
    code = main(["grow", "--model", str(path), "--hidden-size", "64", "--out",
                 str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unsupported family" in err and "Llama" in err


def test_grow_missing_model_folder(tmp_path, capsys):
    code = main(["grow", "--model", str(tmp_path / "nope"), "--hidden-size", "64", "--out",
                 str(tmp_path / "o")])
    assert code == 2
    assert "no config.json" in capsys.readouterr().err
    torch.manual_seed(0)


def test_grow_train_ctrl_c_then_resume_equals_an_uninterrupted_run(tiny_vit, tmp_path, capsys,
                                                                   monkeypatch):
    from safetensors.torch import load_file

    from upcycle.training.trainer import UpcycleTrainer

    rng = np.random.default_rng(0)
    data = tmp_path / "train.npz"
    np.savez(data, images=rng.integers(0, 255, size=(24, 8, 8)).astype(np.uint8),
             labels=rng.integers(0, 3, size=24))

    def argv(out, *extra):
        return ["grow", "--model", str(tiny_vit), "--hidden-size", "64", "--out", str(out),
                "--train", str(data), "--steps", "4", "--batch-size", "8", "--save-steps", "2",
                "--scratch-lr", "1e-4", "--scratch-warmup", "1", "--device", "cpu", "--quiet",
                *extra]

    assert main(argv(tmp_path / "whole")) == 0
    step = UpcycleTrainer.training_step

    def interrupted(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UpcycleTrainer, "training_step", interrupted)
    capsys.readouterr()
    assert main(argv(tmp_path / "parts")) == 130
    assert "checkpoint of step 2 saved" in capsys.readouterr().err
    assert not (tmp_path / "parts").exists()
    monkeypatch.setattr(UpcycleTrainer, "training_step", step)
    assert main(argv(tmp_path / "parts", "--resume", "--scratch-lr", "1e-3")) == 2
    assert "scratch_lr: 0.0001 in the checkpoint, 0.001 now" in capsys.readouterr().err
    assert main(argv(tmp_path / "parts", "--resume")) == 0
    train = json.loads((tmp_path / "parts" / "growth.json").read_text())["train"]
    assert train["steps"] == 4 and train["resumed_from"].endswith("checkpoint-2")
    assert not (tmp_path / "parts.checkpoints").exists()
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "model.safetensors"))
    for name, value in whole.items():
        torch.testing.assert_close(parts[name], value, atol=1e-6, rtol=1e-5)
