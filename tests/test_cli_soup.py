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
    from upcycle.checkpoints import open_ingredients

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
