"""``upcycle soup`` end to end on tiny HF BERT folders: HF folder in, HF folder out."""

import json

import pytest
import torch

from upcycle.cli.main import main

transformers = pytest.importorskip("transformers")

WORDS = ["good", "bad", "great", "awful", "fine", "poor", "movie", "film", "plot", "acting"]


@pytest.fixture(scope="module")
def tiny_bert_ingredients(tmp_path_factory):
    """Three perturbed copies of a tiny random BERT classifier, saved as HF folders, plus
    held-out and test JSONL files."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("soup")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=2,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    folders = []
    for i in range(3):
        model = BertForSequenceClassification(config)
        model.load_state_dict({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                               for k, v in base.state_dict().items()})
        folder = root / f"run{i}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    rng = torch.Generator().manual_seed(1)
    lines = []
    for _ in range(48):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5,), generator=rng)]
        label = int(sum(w in ("good", "great", "fine") for w in words) >= 2)
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    (root / "held_out.jsonl").write_text("\n".join(lines[:32]) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[32:]) + "\n")
    return root, folders


@pytest.mark.parametrize("method", ["uniform", "greedy", "learned+", "mehl+", "mehl"])
def test_soup_cli_writes_a_loadable_hf_folder(tiny_bert_ingredients, tmp_path, method):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, folders = tiny_bert_ingredients
    out = tmp_path / "soup"
    args = ["soup", "--method", method, *map(str, folders), "--out", str(out), "--quiet",
            "--epochs", "1", "--model-batch", "2", "--batch-size", "16"]
    if method != "uniform":
        args += ["--held-out", str(root / "held_out.jsonl"), "--test", str(root / "test.jsonl")]
    assert main(args) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert (out / "config.json").is_file() and (out / "soup.json").is_file()
    assert (out / "coefficients.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method
    if method != "uniform":
        assert report["rows"][0]["method"].startswith("best ingredient")
        assert "test_accuracy" in report["rows"][-1]
    # The folder holds exactly the soup's weights.
    from upcycle.io.ingredients import open_ingredients

    soup = open_ingredients([out])[0]
    for name, value in model.state_dict().items():
        if name in soup.keys():
            assert torch.equal(value, soup.get(name)), name


def test_sharded_output_loads(tiny_bert_ingredients, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _, folders = tiny_bert_ingredients
    out = tmp_path / "sharded"
    assert main(["soup", *map(str, folders), "--out", str(out), "--quiet",
                 "--max-shard-size", "20KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-0000*-of-*.safetensors"))) > 1
    a = AutoModelForSequenceClassification.from_pretrained(out)
    b = AutoModelForSequenceClassification.from_pretrained(folders[0])
    assert a.config.num_labels == b.config.num_labels


def _err(capsys):
    return capsys.readouterr().err


def test_cli_bad_inputs(tiny_bert_ingredients, tmp_path, capsys):
    root, folders = tiny_bert_ingredients
    ings = list(map(str, folders))
    held = str(root / "held_out.jsonl")
    out = tmp_path / "o"

    # an output that already holds a model
    assert main(["soup", *ings, "--out", str(out), "--quiet"]) == 0
    assert main(["soup", *ings, "--out", str(out), "--quiet"]) == 2
    assert "already holds a model" in _err(capsys)
    assert main(["soup", *ings, "--out", str(out), "--quiet", "--overwrite"]) == 0

    # K out of range, one ingredient for a learned method, no data for a data method
    assert main(["soup", "--method", "mehl+", *ings, "--held-out", held, "--model-batch", "5",
                 "--out", str(tmp_path / "k"), "--quiet"]) == 2
    assert "--model-batch 5 exceeds the number of ingredients (3)" in _err(capsys)
    assert main(["soup", "--method", "mehl+", *ings, "--held-out", held, "--model-batch", "0",
                 "--out", str(tmp_path / "k"), "--quiet"]) == 2
    assert "--model-batch must be >= 1" in _err(capsys)
    assert main(["soup", "--method", "learned+", ings[0], "--held-out", held,
                 "--out", str(tmp_path / "one"), "--quiet"]) == 2
    assert "at least 2 ingredients" in _err(capsys)
    assert main(["soup", "--method", "greedy", *ings, "--out", str(tmp_path / "g"),
                 "--quiet"]) == 2
    assert "needs held-out data" in _err(capsys)

    # an empty held-out set, and labels outside the model's classes
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["soup", "--method", "mehl+", *ings, "--held-out", str(tmp_path / "empty.jsonl"),
                 "--model-batch", "2", "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert "empty.jsonl: holds no examples" in _err(capsys)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "good film", "label": 7}) + "\n")
    assert main(["soup", "--method", "mehl+", *ings, "--held-out", str(tmp_path / "bad.jsonl"),
                 "--model-batch", "2", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "label 7 is outside the model's 2 classes" in _err(capsys)

    # different architectures
    from transformers import BertConfig, BertForSequenceClassification

    other = tmp_path / "other"
    BertForSequenceClassification(BertConfig(
        vocab_size=15, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(other)
    assert main(["soup", *ings, str(other), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = _err(capsys)
    assert "ingredient 4" in err and "other" in err and "has shape" in err
    # nothing was written by any refused run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl", "o", "other"]


def _interrupt_at_round(monkeypatch, round_no):
    """Ctrl-C at the start of MEHL round ``round_no`` (when its schedule is built)."""
    import upcycle.soup.mehl as mehl

    real = mehl.cosine_with_warmup
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == round_no:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mehl, "cosine_with_warmup", fake)


def test_ctrl_c_leaves_nothing_at_out_and_resume_gives_the_same_soup(
        tiny_bert_ingredients, tmp_path, capsys, monkeypatch):
    from upcycle.io.ingredients import open_ingredients

    root, folders = tiny_bert_ingredients
    common = ["soup", "--method", "mehl+", *map(str, folders), "--quiet", "--epochs", "1",
              "--model-batch", "1", "--batch-size", "16", "--held-out",
              str(root / "held_out.jsonl"), "--seed", "3"]
    whole = tmp_path / "whole"
    assert main([*common, "--out", str(whole)]) == 0
    capsys.readouterr()

    out = tmp_path / "soup"
    with monkeypatch.context() as m:
        _interrupt_at_round(m, 2)
        assert main([*common, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "interrupted; MEHL round 1/3 is saved in" in lines[0] and "--resume" in lines[0]
    assert not out.exists()
    partial = tmp_path / ".soup.partial"
    assert (partial / "mehl-checkpoint.safetensors").is_file()
    # Ctrl-C before any round finished: nothing was written, and the hint says so.
    with monkeypatch.context() as m:
        _interrupt_at_round(m, 1)
        assert main([*common, "--out", str(tmp_path / "early")]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted; nothing was written")
    assert not (tmp_path / "early").exists() and not (tmp_path / ".early.partial").exists()

    assert main([*common, "--out", str(out), "--resume"]) == 0
    assert "resuming mehl+ after round 1/3" in capsys.readouterr().err
    assert not partial.exists()  # the checkpoint goes once the soup is written
    a, b = open_ingredients([whole])[0], open_ingredients([out])[0]
    for name in a.keys():
        assert torch.allclose(a.get(name), b.get(name), atol=1e-6), name
    ca = json.loads((whole / "soup.json").read_text())["history"]
    cb = json.loads((out / "soup.json").read_text())["history"]
    assert [h["ingredients"] for h in ca] == [h["ingredients"] for h in cb]


@pytest.mark.parametrize("method", ["uniform", "mehl+"])
def test_dtype_bfloat16_writes_a_bf16_soup(tiny_bert_ingredients, tmp_path, method):
    from upcycle.io.ingredients import open_ingredients

    root, folders = tiny_bert_ingredients
    out = tmp_path / "bf16"
    args = ["soup", "--method", method, *map(str, folders), "--out", str(out), "--quiet",
            "--dtype", "bfloat16", "--device", "cpu"]
    if method != "uniform":
        args += ["--held-out", str(root / "held_out.jsonl"), "--epochs", "1",
                 "--model-batch", "2", "--batch-size", "16"]
    assert main(args) == 0
    soup = open_ingredients([out])[0]
    source = open_ingredients([folders[0]])[0]
    for name in soup.keys():
        expected = torch.bfloat16 if source.dtype(name).is_floating_point else source.dtype(name)
        assert soup.dtype(name) == expected, name


def test_device_precision_and_resume_errors(tiny_bert_ingredients, tmp_path, capsys,
                                            monkeypatch):
    root, folders = tiny_bert_ingredients
    ings = list(map(str, folders))
    held = str(root / "held_out.jsonl")
    base = ["soup", "--method", "mehl+", *ings, "--held-out", held, "--quiet", "--epochs", "1",
            "--model-batch", "2", "--batch-size", "16"]
    out = str(tmp_path / "o")
    if not torch.cuda.is_available():
        assert main([*base, "--out", out, "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available on this machine" in _err(capsys)
    assert main([*base, "--out", out, "--device", "tpu"]) == 2
    assert "--device 'tpu': expected one of auto, cpu, cuda, cuda:N, mps" in _err(capsys)
    assert main([*base, "--out", out, "--device", "cpu", "--fp16"]) == 2
    assert "--fp16: float16 mixed precision needs a GPU" in _err(capsys)
    assert main([*base, "--out", out, "--bf16", "--fp16"]) == 2
    assert "--bf16 and --fp16 exclude each other" in _err(capsys)
    assert main([*base, "--out", out, "--resume"]) == 2
    assert "--resume: no checkpoint of an interrupted soup for" in _err(capsys)
    assert main(["soup", *ings, "--out", out, "--resume", "--quiet"]) == 2
    assert "--resume applies to --method mehl or mehl+" in _err(capsys)
    # a checkpoint made with other settings, or from other ingredients
    with monkeypatch.context() as m:
        _interrupt_at_round(m, 2)
        assert main([*base, "--out", out]) == 130
    _err(capsys)
    assert main([*base, "--out", out, "--resume", "--epochs", "2"]) == 2
    assert "with other settings: epochs was 1, now 2" in _err(capsys)
    assert main([*base[:3], *ings[:2], *base[6:], "--out", out, "--resume"]) == 2
    assert "from other ingredients (3 ingredients then, 2 now)" in _err(capsys)
    assert main([*base[:2], "mehl", *base[3:], "--out", out, "--resume"]) == 2
    assert "by method mehl+, not mehl" in _err(capsys)
    # nothing was written at --out by any refused or interrupted run
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.partial"]


def test_mehl_model_batch_defaults_to_at_most_the_number_of_ingredients(
        tiny_bert_ingredients, tmp_path, capsys):
    """K defaults to min(18, N): three ingredients run as one model batch of 3; an explicit K
    above N is still an error."""
    root, folders = tiny_bert_ingredients
    base = ["soup", "--method", "mehl+", *map(str, folders), "--held-out",
            str(root / "held_out.jsonl"), "--quiet", "--epochs", "1", "--batch-size", "16"]
    assert main(base + ["--out", str(tmp_path / "soup")]) == 0
    report = json.loads((tmp_path / "soup" / "report.json").read_text())
    assert report["config"]["model-batch"] == 3
    assert report["soup"]["info"]["model_batch"] == 3
    assert main(base + ["--out", str(tmp_path / "k4"), "--model-batch", "4"]) == 2
    assert "--model-batch 4 exceeds the number of ingredients (3)" in capsys.readouterr().err
    assert not (tmp_path / "k4").exists()


def test_out_of_core_refuses_a_legacy_pickle_in_one_line(tiny_bert_ingredients, tmp_path,
                                                        capsys):
    """--directions out-of-core re-reads the files at every step: a legacy pickle (which
    cannot be memory-mapped) is one error saying how to convert it; nothing is written."""
    import shutil

    from safetensors.torch import load_file

    root, folders = tiny_bert_ingredients
    legacy = tmp_path / "legacy"
    shutil.copytree(folders[1], legacy)
    state = load_file(str(legacy / "model.safetensors"))
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    out = tmp_path / "soup"
    code = main(["soup", "--method", "mehl+", str(folders[0]), str(legacy), "--out", str(out),
                 "--quiet", "--epochs", "1", "--model-batch", "2", "--directions", "out-of-core",
                 "--held-out", str(root / "held_out.jsonl")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("upcycle soup: error:"), err
    assert "pytorch_model.bin is a legacy" in lines[0] and "convert" in lines[0].lower()
    assert not out.exists()
