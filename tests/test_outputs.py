"""Shareable outputs and no silent surprises: permissions follow the umask, ``--config``,
model cards, one-line adapter loading, warnings for runs that do nothing, refusals before
any work."""

import json
import os
import stat

import pytest
import torch
from conftest import write_sentiment_jsonl

from upcycle.cli.main import main
from upcycle.errors import UpcycleError

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film", "was",
         "a", "day", "really"]




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT classifier folder, two perturbed copies (soup ingredients) and
    train / held-out / test JSONL files."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("outputs")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                     num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg).eval()
    folders = []
    for i, name in enumerate(["base", "run0", "run1"]):
        model = BertForSequenceClassification(cfg)
        noise = 0.0 if i == 0 else 0.05
        model.load_state_dict({k: v + noise * torch.randn_like(v) if v.is_floating_point()
                               else v for k, v in base.state_dict().items()})
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders.append(root / name)
    return {"root": root, "base": folders[0], "runs": folders[1:],
            "train": write_sentiment_jsonl(root / "train.jsonl", 40, 0),
            "held_out": write_sentiment_jsonl(root / "held_out.jsonl", 16, 1),
            "test": write_sentiment_jsonl(root / "test.jsonl", 16, 2)}


# -- permissions ------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    from upcycle.io.writing import save_model, write_json

    old = os.umask(umask)
    try:
        save_model(tmp_path / "model", {"w": torch.ones(2)})
        write_json(tmp_path / "report.json", {"a": 1})
        save_model(tmp_path / "single.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "model") == 0o777 & ~umask
    assert mode(tmp_path / "model" / "model.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "report.json") == 0o666 & ~umask
    assert mode(tmp_path / "single.safetensors") == 0o666 & ~umask


# -- soup: --config, model card, report ---------------------------------------------------------

def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _soup_argv(tiny, out, *extra):
    return ["soup", *map(str, tiny["runs"]), "--method", "greedy", "--held-out",
            str(tiny["held_out"]), "--test", str(tiny["test"]), "--batch-size", "8", "--quiet",
            "--out", str(out), *extra]


def test_soup_config_equals_the_same_flags(tiny, tmp_path, capsys):
    import yaml

    assert main(_soup_argv(tiny, tmp_path / "flags")) == 0
    config = tmp_path / "soup.yaml"
    config.write_text(yaml.safe_dump({
        "ingredients": [str(p) for p in tiny["runs"]], "method": "greedy",
        "held-out": str(tiny["held_out"]), "test": str(tiny["test"]), "batch_size": 8,
        "quiet": True, "out": str(tmp_path / "config")}))
    assert main(["soup", "--config", str(config)]) == 0
    a, b = _weights(tmp_path / "flags"), _weights(tmp_path / "config")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "flags" / "report.json").read_text())
    rb = json.loads((tmp_path / "config" / "report.json").read_text())
    assert {k: v for k, v in ra["config"].items() if k != "out"} == \
        {k: v for k, v in rb["config"].items() if k != "out"}
    # The report's resolved configuration repeats the run.
    assert main(["soup", "--config", str(tmp_path / "flags" / "report.json"),
                 "--out", str(tmp_path / "again")]) == 0
    c = _weights(tmp_path / "again")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert "overrides" in capsys.readouterr().err  # --out differs from the report's


def test_soup_config_flag_wins_and_says_so(tiny, tmp_path, capsys):
    config = tmp_path / "soup.yaml"
    config.write_text(f"method: uniform\nout: {tmp_path / 'from-config'}\nquiet: true\n")
    assert main(["soup", *map(str, tiny["runs"]), "--config", str(config), "--method", "greedy",
                 "--held-out", str(tiny["held_out"]), "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "--method greedy on the command line overrides uniform in" in err
    report = json.loads((tmp_path / "from-config" / "report.json").read_text())
    assert report["method"] == "greedy"


@pytest.mark.parametrize("text,message", [
    ("methd: mehl\n", "unknown key 'methd' (did you mean 'method'?)"),
    ("held_out_fracton: 0.2\n", "(did you mean 'held-out-fraction'?)"),
    ("method: mehl++\n", "invalid choice 'mehl++'"),
    ("quiet: 3\n", "expected true or false"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_soup_config_bad_key_is_a_clear_error_and_nothing_is_written(tiny, tmp_path, capsys,
                                                                      text, message):
    config = tmp_path / "soup.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(_soup_argv(tiny, tmp_path / "out", "--config", str(config)))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(config) in err
    assert not (tmp_path / "out").exists()


def test_soup_writes_a_model_card(tiny, tmp_path):
    out = tmp_path / "soup"
    assert main(_soup_argv(tiny, out)) == 0
    card = (out / "README.md").read_text()
    assert "Greedy soup" in card and "- greedy" in card and "model-soup" in card
    assert "upcycle soup" in card and "--method greedy" in card  # the command
    assert "held-out acc" in card and "test acc" in card and "(this model)" in card
    for run in tiny["runs"]:
        assert str(run) in card


def test_one_ingredient_soup_warns(tiny, tmp_path, capsys):
    assert main(["soup", str(tiny["runs"][0]), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert "warning: only one ingredient" in capsys.readouterr().err


def test_soup_save_checks_source_dir_first_and_keeps_the_soup(tiny, tmp_path):
    from upcycle.io.ingredients import open_ingredients
    from upcycle.soup import uniform_soup

    soup = uniform_soup(open_ingredients(tiny["runs"]), progress=False)
    with pytest.raises(UpcycleError, match="source_dir .*no such folder.*still in this SoupResult"):
        soup.save(tmp_path / "soup", source_dir=tmp_path / "runs" / "run0")
    assert not (tmp_path / "soup").exists()
    soup.save(tmp_path / "soup", source_dir=tiny["runs"][0])
    assert (tmp_path / "soup" / "README.md").is_file()
    transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "soup")


# -- tune: one-line load, --merge refused early, cards -------------------------------------------

def test_one_line_adapter_load_equals_the_trained_model(tiny, tmp_path):
    import upcycle.tune
    from upcycle.tune import SherlConfig, get_sherl_model, get_snell_model

    cls = transformers.AutoModelForSequenceClassification
    inputs = {"input_ids": torch.tensor([[2, 13, 14, 15, 5, 3], [2, 13, 9, 10, 3, 0]]),
              "attention_mask": torch.tensor([[1] * 6, [1] * 5 + [0]])}
    for build in (lambda m: get_snell_model(m, r=4),
                  lambda m: get_sherl_model(m, SherlConfig(late_layers=1))):
        torch.manual_seed(0)
        trained = build(cls.from_pretrained(tiny["base"]))
        with torch.no_grad():  # "training": move every trainable tensor
            for p in trained.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        trained.eval()
        folder = tmp_path / type(trained).__name__
        trained.save_pretrained(folder)
        record = json.loads((folder / "adapter_config.json").read_text())
        assert record["base_model_name_or_path"] == str(tiny["base"])
        assert record["base_model_class"] == "BertForSequenceClassification"
        loaded = upcycle.tune.load(folder)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, trained(**inputs).logits)


def test_adapter_load_with_a_missing_base_says_what_to_pass(tiny, tmp_path):
    import shutil

    import upcycle.tune
    from upcycle.tune import get_snell_model

    base = tmp_path / "moved-base"
    shutil.copytree(tiny["base"], base)
    model = get_snell_model(
        transformers.AutoModelForSequenceClassification.from_pretrained(base), r=4)
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(base)
    with pytest.raises(UpcycleError, match=r"base model '.*moved-base' \(recorded in .*"
                                           r"adapter_config.json\) is not a HF model folder here"
                                           r".*base_model='path/to/base-model'"):
        upcycle.tune.load(tmp_path / "adapter")
    loaded = upcycle.tune.load(tmp_path / "adapter", base_model=tiny["base"])
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"


def test_tune_card_config_and_load(tiny, tmp_path):
    import upcycle.tune

    out = tmp_path / "run"
    assert main(["tune", "--method", "snell", "--model", str(tiny["base"]), "--data",
                 str(tiny["train"]), "--test", str(tiny["test"]), "--r", "4", "--max-steps",
                 "2", "--batch-size", "8", "--merge", "--quiet", "--out", str(out)]) == 0
    for folder in ("adapter", "merged"):
        card = (out / folder / "README.md").read_text()
        assert "SNELL" in card and "upcycle tune --method snell" in card
        assert "| held-out |" in card and "| test |" in card
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["method"] == "snell" and report["config"]["r"] == 4
    loaded = upcycle.tune.load(out / "adapter")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged")
    ids = torch.tensor([[2, 13, 14, 15, 5, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_tune_sherl_merge_is_refused_before_training(tiny, tmp_path, capsys, monkeypatch):
    import upcycle.jobs.finetune as finetune

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(finetune, "train_task", no_training)
    rc = main(["tune", "--method", "sherl", "--model", str(tiny["base"]), "--data",
               str(tiny["train"]), "--merge", "--max-steps", "2", "--quiet",
               "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "--merge: a sherl model cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- grow ---------------------------------------------------------------------------------------

def test_grow_without_a_larger_target_warns(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50,
                               n_positions=32)).save_pretrained(tmp_path / "small")
    assert main(["grow", "--model", str(tmp_path / "small"), "--out", str(tmp_path / "g")]) == 0
    assert "warning: the target size equals --model's" in capsys.readouterr().err
    assert main(["grow", "--model", str(tmp_path / "small"), "--layers", "4",
                 "--out", str(tmp_path / "g4")]) == 0
    assert "warning" not in capsys.readouterr().err


# -- --config at parse time ---------------------------------------------------------------------

def _parse(argv):
    from upcycle.cli.main import build_parser

    args, unknown = build_parser().parse_known_args(argv)
    assert unknown == []
    return args


def test_config_supplies_required_flags_and_positionals(tmp_path, capsys):
    config = tmp_path / "tune.yaml"
    config.write_text("method: sherl\nmodel: base\ndata: train.jsonl\nout: runs/x\n"
                      "late_layers: 2\ntaps: [0, 1]\nlr: 1e-3\n")
    args = _parse(["tune", "--config", str(config)])
    assert (args.method, args.model, args.data, args.out) == ("sherl", "base", "train.jsonl",
                                                              "runs/x")
    assert args.late_layers == 2 and args.taps == [0, 1] and args.lr == 1e-3
    assert args.config == str(config)
    # the same flags typed give the same namespace (but for --config itself)
    typed = _parse(["tune", "--method", "sherl", "--model", "base", "--data", "train.jsonl",
                    "--out", "runs/x", "--late-layers", "2", "--taps", "0", "1", "--lr", "1e-3"])
    assert vars(typed) | {"config": None} == vars(args) | {"config": None}
    assert capsys.readouterr().err == ""  # nothing disagrees: no note

    soup = tmp_path / "soup.yaml"
    soup.write_text("ingredients: [a, b]\nout: s\nmax-shard-size: 2GB\n")
    args = _parse(["soup", "--config", str(soup)])
    assert args.ingredients == ["a", "b"] and args.max_shard_size == 2 * 10**9
    # typed ingredients win, wherever they stand on the line
    for argv in (["soup", "--config", str(soup), "c", "d"],
                 ["soup", "--method", "greedy", "c", "d", "--config", str(soup)],
                 ["soup", "c", "d", "--config", str(soup)]):
        assert _parse(argv).ingredients == ["c", "d"], argv
    assert capsys.readouterr().err.count("note: ingredients c d on the command line "
                                         "overrides a b in") == 3


def test_config_missing_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["soup", "--config", str(tmp_path / "nope.yaml")])
    assert exc.value.code == 2
    assert f"--config {tmp_path / 'nope.yaml'}: no such file" in capsys.readouterr().err
