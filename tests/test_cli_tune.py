"""``upcycle tune``: end to end on tiny random models saved in tmp_path (text and image)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import torchrun

from upcycle.cli.main import main

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film", "was",
         "a", "day", "really"]


@pytest.fixture(scope="module")
def text_task(tmp_path_factory):
    """A tiny random BERT folder (no head) with a tokenizer, and train/test JSONL files."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("text")
    model_dir = root / "tiny-bert"
    model_dir.mkdir()
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(model_dir)
    rng = np.random.default_rng(0)

    def write(path, n):
        with open(path, "w") as f:
            for _ in range(n):
                label = int(rng.integers(2))
                pool = WORDS[:4] if label else WORDS[4:8]
                text = " ".join(["the", "film", "was", *rng.choice(pool, 2)])
                f.write(json.dumps({"text": text, "label": label}) + "\n")
        return path

    return model_dir, write(root / "train.jsonl", 48), write(root / "test.jsonl", 16)


def test_tune_snell_text_end_to_end(text_task, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from upcycle.tune.snell import SnellModel

    model_dir, train_file, test_file = text_task
    out = tmp_path / "run"
    rc = main(["tune", "--method", "snell", "--model", str(model_dir), "--data", str(train_file),
               "--test", str(test_file), "--r", "4", "--sparsity", "0.5", "--max-steps", "6",
               "--batch-size", "8", "--lr", "1e-2", "--out", str(out), "--merge", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "test accuracy" in printed and "peak RSS" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 6 and report["world_size"] == 1
    assert report["examples"] == {"train": 43, "held_out": 5, "test": 16}
    assert 0 <= report["test_metrics"]["accuracy"] <= 1 and report["peak_rss_mb"] > 0
    assert report["merge_max_abs_logit_diff"] < 1e-5
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    # the merged folder is a plain HF model; it equals the base + adapter
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    adapted = SnellModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[2, 13, 14, 15, 5, 6, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
    # an existing output is never silently replaced
    argv = ["tune", "--method", "snell", "--model", str(model_dir), "--data", str(train_file),
            "--max-steps", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--held-out", str(test_file)]) == 0
    assert json.loads((out / "report.json").read_text())["examples"]["held_out"] == 16
    assert not (out / "merged").exists()


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--r", "3"], "r=3 is not divisible by num_pieces=2"),
    (["--target-modules", "qkv"], "'qkv' matches no module"),
    (["--target-modules", "LayerNorm"], "SNELL adapts nn.Linear"),
])
def test_tune_bad_input_is_a_clear_error(text_task, tmp_path, capsys, extra, message):
    model_dir, train_file, _ = text_task
    rc = main(["tune", "--method", "snell", "--model", str(model_dir), "--data", str(train_file),
               "--max-steps", "1", "--out", str(tmp_path / "o"), "--quiet", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tune_snell_image(tmp_path, capsys):
    from transformers import ViTConfig, ViTModel

    model_dir = tmp_path / "tiny-vit"
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    images = (rng.random((40, 8, 8)) * 60 + labels[:, None, None] * 80).astype(np.uint8)
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    out = tmp_path / "run"
    rc = main(["tune", "--method", "snell", "--model", str(model_dir),
               "--data", str(tmp_path / "digits.npz"), "--held-out-fraction", "0.25",
               "--max-steps", "3", "--batch-size", "10", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["examples"]["held_out"] == 10 and report["held_out_metrics"]["n"] == 10


def test_tune_ddp_two_ranks_gloo(text_task, tmp_path):
    model_dir, train_file, test_file = text_task
    out = tmp_path / "ddp"
    torchrun(["-m", "upcycle.cli.main", "tune", "--method", "snell",
              "--model", model_dir, "--data", train_file, "--test", test_file,
              "--max-steps", "3", "--batch-size", "8", "--out", out, "--quiet",
              "--device", "cpu"])  # gloo, also on a machine with one GPU
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 3
    assert report["test_metrics"]["n"] == 16  # every test example counted once over the ranks


# -- Trainer: resume, Ctrl-C, evaluation, devices ----------------------------------------------

def _tune_argv(model_dir, train_file, out, *extra):
    return ["tune", "--method", "snell", "--model", str(model_dir), "--data", str(train_file),
            "--r", "4", "--max-steps", "6", "--batch-size", "8", "--lr", "1e-2",
            "--save-steps", "3", "--device", "cpu", "--out", str(out), "--quiet", *extra]


@pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++")
                         or shutil.which("clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_tune_snell_compile_is_saved_with_the_adapter(text_task, tmp_path):
    """--snell-compile trains with the compiled kernel, saves compile=true in the adapter's
    config, and the reloaded adapter (compiled again) gives the merged model's outputs."""
    from transformers import AutoModelForSequenceClassification

    from upcycle.tune.snell import SnellModel

    model_dir, train_file, _ = text_task
    out = tmp_path / "run"
    assert main(_tune_argv(model_dir, train_file, out, "--snell-compile", "--merge")) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["compile"] is True
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    adapted = SnellModel.from_pretrained(base, out / "adapter").eval()
    assert all(layer.settings().compile for layer in adapted.snell_layers().values())
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[2, 13, 14, 15, 5, 6, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_tune_ctrl_c_then_resume_equals_an_uninterrupted_run(text_task, tmp_path, capsys,
                                                             monkeypatch):
    from upcycle.training.trainer import UpcycleTrainer

    model_dir, train_file, _ = text_task
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(_tune_argv(model_dir, train_file, whole)) == 0
    assert not (tmp_path / "whole.checkpoints").exists()  # a complete run keeps no checkpoints

    step = UpcycleTrainer.training_step

    def interrupted(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UpcycleTrainer, "training_step", interrupted)
    capsys.readouterr()
    assert main(_tune_argv(model_dir, train_file, parts)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted; checkpoint of step 3 saved in" in err[0]
    assert "--resume" in err[0]
    assert not parts.exists()  # nothing half-written at --out
    folder = tmp_path / "parts.checkpoints"
    assert (folder / "checkpoint-3").is_dir()

    # without --resume the checkpoints are not silently thrown away
    assert main(_tune_argv(model_dir, train_file, parts)) == 2
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    # other settings: refused, naming what differs; nothing written
    assert main(_tune_argv(model_dir, train_file, parts, "--resume", "--sparsity", "0.3")) == 2
    err = capsys.readouterr().err
    assert "was made by another run (sparsity: 0.5 in the checkpoint, 0.3 now" in err
    assert not parts.exists()

    monkeypatch.setattr(UpcycleTrainer, "training_step", step)
    assert main(_tune_argv(model_dir, train_file, parts, "--resume")) == 0
    report = json.loads((parts / "report.json").read_text())
    assert report["steps"] == 6 and report["resumed_from"].endswith("checkpoint-3")
    assert report["steps_this_run"] == 3  # it continued at step 3, not from the start
    assert not folder.exists()
    expected, got = _adapter(whole), _adapter(parts)
    assert set(expected) == set(got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_tune_resume_without_checkpoint_is_an_error(text_task, tmp_path, capsys):
    model_dir, train_file, _ = text_task
    out = tmp_path / "o"
    assert main(_tune_argv(model_dir, train_file, out, "--resume")) == 2
    assert "--resume: no checkpoint to resume from" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "o.checkpoints").exists()


def test_tune_eval_steps_keeps_the_best_checkpoint(text_task, tmp_path, capsys):
    model_dir, train_file, _ = text_task
    out = tmp_path / "o"
    argv = _tune_argv(model_dir, train_file, out, "--eval-steps", "2", "--grad-accum", "2",
                      "--held-out-fraction", "0.25")
    argv[argv.index("--save-steps") + 1] = "2"
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    evals = [e for e in report["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert report["best_step"] == best["step"]
    # the written adapter is the best checkpoint's: its held-out loss is the best one
    assert report["held_out_metrics"]["loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
    assert "best checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--fp16"], "--fp16: float16 mixed precision needs a GPU"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
    (["--device", "tpu"], "--device 'tpu': expected one of"),
    (["--batch-size", "6", "--grad-accum", "4"], "batch size 6 does not split"),
    (["--eval-steps", "2", "--save-steps", "3"], "save_steps 3 must be a multiple of eval_steps"),
])
def test_tune_bad_device_and_precision(text_task, tmp_path, capsys, extra, message):
    model_dir, train_file, _ = text_task
    out = tmp_path / "o"
    argv = [a for a in _tune_argv(model_dir, train_file, out) if a not in ("--save-steps", "3")]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "o.checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_tune_cuda_without_cuda_is_a_clear_error(text_task, tmp_path, capsys):
    model_dir, train_file, _ = text_task
    out = tmp_path / "o"
    argv = _tune_argv(model_dir, train_file, out)
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "o.checkpoints").exists()


def test_tune_bf16_weights_and_autocast_on_cpu(text_task, tmp_path):
    model_dir, train_file, _ = text_task
    out = tmp_path / "o"
    assert main(_tune_argv(model_dir, train_file, out, "--dtype", "bfloat16", "--bf16")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == "bf16" and report["dtype"] == "bfloat16"
    assert report["steps"] == 6
    adapter = _adapter(out)  # trained in float32 under autocast, saved as loaded
    assert adapter["base_model.model.classifier.weight"].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for k, t in adapter.items() if ".snell_" in k)
