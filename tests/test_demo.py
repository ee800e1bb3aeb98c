"""``upcycle demo`` end to end on a tiny random BERT and a tiny 3-class corpus standing in for
MiniLM and BBC News (the real fine-tunes, scoring, soups, output folder and figure run; only
the model and the data are small)."""

import json
import re

import pytest
import torch

from upcycle.cli.main import main

transformers = pytest.importorskip("transformers")

TOPICS = {
    "sport": ["match", "goal", "team", "cup", "coach"],
    "tech": ["phone", "chip", "software", "web", "data"],
    "business": ["market", "shares", "bank", "profit", "deal"],
}
COMMON = ["the", "a", "new", "said", "year"]
SPLITS = {"train": 32, "held_out": 24, "test": 24}
SENTENCE = re.compile(r"^MEHL-Soup\+ reached \d+\.\d% test accuracy, (\d+\.\d points (above|below) "
                      r"the best single fine-tune \(lr[^)]+\)|matching the best single "
                      r"fine-tune \(lr[^)]+\)), in \d+ s and \d+\.\d GiB\.$")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny BERT without a classification head (like MiniLM) and its corpus."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("demo")
    words = [w for ws in TOPICS.values() for w in ws] + COMMON
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = root / "tiny-minilm"
    BertModel(config).save_pretrained(base)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(base)
    rng = torch.Generator().manual_seed(0)
    texts, labels = [], []
    for i in range(120):
        label = i % len(TOPICS)
        topic = list(TOPICS.values())[label]
        picks = [topic[int(j)] for j in torch.randint(0, 5, (4,), generator=rng)]
        picks += [COMMON[int(j)] for j in torch.randint(0, 5, (4,), generator=rng)]
        texts.append(" ".join(picks))
        labels.append(label)
    return base, (texts, labels, sorted(TOPICS))


@pytest.fixture(scope="module")
def demo_run(tiny_world, tmp_path_factory):
    base, corpus = tiny_world
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("upcycle.demo.bbc.minilm_path", lambda: str(base))
        mp.setattr("upcycle.demo.bbc.bbc_news", lambda: corpus)
        mp.setattr("upcycle.demo.bbc.SPLIT_SIZES", SPLITS)
        mp.setattr("upcycle.demo.bbc.MAX_LENGTH", 16)
        runs = []
        for argv in (["--epochs", "1"], ["--ingredients", "2", "-K", "5", "--epochs", "1"]):
            code, stdout, stderr = _run(["demo", "--out", str(root / "out"), "--cache",
                                         str(root / "cache"), "--device", "cpu", *argv])
            report = json.loads((root / "out" / "report.json").read_text())
            runs.append((code, stdout, stderr, report))
        # as on a terminal: progress bars (here into a StringIO) over the cached fine-tunes
        mp.setattr("upcycle.cli.demo.bars_wanted", lambda quiet: True)
        runs.append((*_run(["demo", "--out", str(root / "out-bars"), "--cache",
                            str(root / "cache"), "--device", "cpu", "--ingredients", "2",
                            "--epochs", "1"]), None))
    return root, runs


def _run(argv):
    """Run the CLI with stdout and stderr going to files (not a terminal), as `make demo >
    log 2>&1` would; return (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_demo_writes_its_output_folder(demo_run):
    root, runs = demo_run
    code, stdout, _, report = runs[0]
    assert code == 0
    out = root / "out"
    for name in ("uniform", "greedy", "learned-plus", "mehl-plus"):
        folder = out / "soups" / name
        assert (folder / "model.safetensors").is_file()
        assert (folder / "config.json").is_file()
        assert (folder / "soup.json").is_file()
        assert not (folder / "train.json").exists()
        card = (folder / "README.md").read_text()
        assert "upcycle demo --ingredients" in card and "## Metrics" in card
        assert "lr1.5e-4-ep1" in card  # ingredients named by their recipe
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        out / "soups" / "mehl-plus")
    assert model.config.num_labels == 3
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "README.md").is_file()
    assert stdout.rstrip().splitlines()[-1] == report["sentence"]
    assert [i["name"] for i in report["ingredients"]] == ["lr1.5e-4-ep1", "lr1e-4-ep1",
                                                          "lr8e-5-ep1", "lr2e-4-ep1"]
    assert str(out / "soups") in stdout and str(out / "report.json") in stdout
    assert str(root / "cache" / "ingredients") in stdout  # where the fine-tunes are


def test_ingredients_are_named_by_recipe_in_fine_tune_order(demo_run):
    from upcycle.demo.bbc import demo_recipes, recipe_names

    root, runs = demo_run
    report_names = ["lr1.5e-4-ep1", "lr1e-4-ep1", "lr8e-5-ep1", "lr2e-4-ep1"]
    assert recipe_names(demo_recipes(4)) == report_names
    stdout = runs[0][1]
    table = stdout[stdout.index("| ingredient | held-out acc"):]
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:6]]
    assert rows == report_names
    assert re.search(r"\| best ingredient \(lr[0-9.e-]+-ep1\) \|", stdout)
    assert "ingredient 1 " not in stdout


def test_ends_with_one_sentence(demo_run):
    _, runs = demo_run
    last = runs[0][1].rstrip().splitlines()[-1]
    assert SENTENCE.match(last), last


def test_no_escape_codes_when_not_a_terminal(demo_run):
    _, runs = demo_run
    for code, stdout, stderr, _ in runs[:2]:
        assert code == 0
        for text in (stdout, stderr):
            assert "\x1b" not in text and "\r" not in text
    assert "[demo] 1/5 fine-tuning" in runs[0][1]


def test_rerun_reuses_the_cache_and_clamps_k(demo_run):
    root, runs = demo_run
    code, stdout, _, report = runs[1]
    assert code == 0
    assert stdout.count(": cached (") == 2  # the fine-tunes of the first run
    assert report["settings"]["model_batch"] == 2  # K = min(5, N)
    assert len(report["ingredients"]) == 2


def test_bad_arguments(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "mine")]) == 2
    assert "not a demo output folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for argv, message in ((["--ingredients", "1"], "--ingredients 1: expected 2 to 12"),
                          (["-K", "0"], "--model-batch 0"), (["--epochs", "0"], "--epochs 0"),
                          (["--device", "tpu"], "--device 'tpu': expected one of")):
        assert main(["demo", "--out", str(tmp_path / "new"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_sentence_wording():
    from upcycle.demo.run import sentence

    best = {"test_accuracy": 0.882}
    row = {"method": "mehl+", "test_accuracy": 0.895, "seconds": 118.2, "peak_rss_mb": 2048}
    assert sentence(row, best, "lr1.5e-4-ep1") == (
        "MEHL-Soup+ reached 89.5% test accuracy, 1.3 points above the best single fine-tune "
        "(lr1.5e-4-ep1, 88.2%), in 118 s and 2.0 GiB.")
    assert "matching the best single fine-tune" in sentence({**row, "test_accuracy": 0.882},
                                                             best, "x")
    assert "0.7 points below" in sentence({**row, "test_accuracy": 0.875}, best, "x")


def test_progress_bars_on_a_terminal(demo_run):
    root, runs = demo_run
    code, stdout, stderr, _ = runs[2]
    assert code == 0
    assert "fine-tuning ingredients" in stderr and "scoring ingredients" in stderr
    assert "MEHL soup" in stderr
    assert ": cached (" not in stdout  # the per-ingredient lines are for logs only
    assert (root / "out-bars" / "results.png").is_file()
