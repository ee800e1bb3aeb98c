"""Issue 19, nothing silently wrong and bounded resources: non-finite weights and output
differences in grow, config.json that is not JSON, bad text and labels, identical splits,
the resume fingerprint's weight digest, and texts cut before tokenising."""

from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest
import torch
from lm_models import CORPUS, save_lm, tiny_lm, tiny_tokenizer

from upcycle.cli.main import main
from upcycle.errors import UpcycleError, UpcycleWarning
from upcycle.grow import expand, max_output_difference
from upcycle.grow.check import check_clone, worst
from upcycle.tasks.base import CHARS_PER_TOKEN, cut_text
from upcycle.tasks.causal_lm import CausalLMTask
from upcycle.tasks.classification import ClassificationTask
from upcycle.training.runs import RUN_FILE, prepare_checkpoints, run_fingerprint

transformers = pytest.importorskip("transformers")


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    T = transformers
    root = tmp_path_factory.mktemp("bert")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b",
                                              "c", "d"]))
    folder = root / "bert"
    T.BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(folder)
    T.BertForSequenceClassification(T.BertConfig(
        vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=3)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_lm(tiny_lm("gpt2", positions=64), tmp_path_factory.mktemp("lm") / "gpt2",
                   tiny_tokenizer())


@pytest.fixture
def tiny_gpt2(tmp_path):
    T = transformers
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=32)).eval()
    path = tmp_path / "gpt2"
    model.save_pretrained(path)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fails(capsys, *argv):
    """Run the CLI: exit 2, one error line, no traceback."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


# -- grow: non-finite weights and differences ----------------------------------------------------

@pytest.mark.parametrize("value, word", [(math.nan, "NaN"), (math.inf, "Inf")])
def test_grow_refuses_a_non_finite_weight_naming_the_tensor(tiny_gpt2, tmp_path, capsys,
                                                            value, word):
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = value
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    out = tmp_path / "big"
    line = _fails(capsys, "grow", "--model", bad, "--hidden-size", "64", "--out", out)
    assert f"tensor 'transformer.h.1.mlp.c_fc.weight' contains {word} values" in line
    assert not out.exists()
    # the library refuses it too, before expanding
    with pytest.raises(UpcycleError, match=rf"'transformer.h.1.mlp.c_fc.weight' contains {word}"):
        expand(model.eval(), hidden_size=64)


def test_a_nan_output_difference_is_not_zero():
    assert math.isnan(worst(0.0, math.nan)) and math.isnan(worst(math.nan, 0.0))
    assert worst(0.0, 2.0, 1.0) == 2.0
    torch.manual_seed(0)
    source = torch.nn.Linear(4, 3).eval()
    grown = torch.nn.Linear(4, 3).eval()
    grown.load_state_dict(source.state_dict())
    with torch.no_grad():
        grown.bias[1] = math.nan
    x = {"input": torch.randn(2, 4)}
    result = max_output_difference(source, grown, x)
    assert math.isnan(result["max_abs"]) and math.isnan(result["max_rel"])
    assert not result["max_rel"] <= 1e-5  # fails every tolerance check
    with torch.no_grad():
        grown.bias[1] = math.inf
    assert not max_output_difference(source, grown, x)["max_rel"] <= 1e-5


def test_grow_with_a_nan_output_difference_writes_nothing(tiny_gpt2, tmp_path, capsys,
                                                          monkeypatch):
    import upcycle.jobs.grow as job

    real = job.max_output_difference

    def nan_in_one(source, grown, inputs):  # e.g. an overflow in the grown model
        result = real(source, grown, inputs)
        return {**result, "max_abs": math.nan, "max_rel": math.nan}

    monkeypatch.setattr(job, "max_output_difference", nan_in_one)
    out = tmp_path / "big"
    line = _fails(capsys, "grow", "--model", tiny_gpt2, "--hidden-size", "64", "--out", out,
                  "--in-memory")  # the streamed check: tests/test_lemon_stream.py
    assert "not finite (nan)" in line and "nothing written" in line
    assert not out.exists()


def test_check_clone_refuses_a_nan_difference():
    class Model(torch.nn.Module):
        def __init__(self, nan: bool):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.nan = nan
            self.growth_plan = argparse.Namespace(family="gpt2")

        def forward(self, input_ids, attention_mask=None):
            out = self.lin(torch.ones(2, 4))
            return out * math.nan if self.nan else out

    import upcycle.grow.check as check

    source, grown = Model(False).eval(), Model(True).eval()
    grown.load_state_dict(source.state_dict())
    monkey = pytest.MonkeyPatch()
    monkey.setattr(check, "example_inputs", lambda model, seed=0: {"input_ids": None})
    try:
        with pytest.raises(UpcycleError, match="computes something else"):
            check_clone(source, grown, argparse.Namespace(model_type="odd"))
    finally:
        monkey.undo()


# -- config.json that is not JSON ----------------------------------------------------------------

@pytest.mark.parametrize("text, what", [("{not json", "is not valid JSON"),
                                        ("[1, 2]", "is not a JSON object"),
                                        (b"{\"a\": \"\xff\"}", "is not UTF-8 text")])
def test_soup_refuses_an_ingredient_config_that_is_not_json(tiny_gpt2, tmp_path, capsys,
                                                            text, what):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_gpt2, other)
    cfg = other / "config.json"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "soup"
    line = _fails(capsys, "soup", tiny_gpt2, other, "--out", out, "--quiet")
    assert "ingredient 2" in line and f"{cfg} {what}" in line
    assert not out.exists()


def test_grow_and_tasks_refuse_a_config_that_is_not_json(tiny_gpt2, bert_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_gpt2, bad)
    (bad / "config.json").write_text('{"model_type": "gpt2",')
    line = _fails(capsys, "grow", "--model", bad, "--hidden-size", "64", "--out", tmp_path / "o")
    assert f"--model {bad}: {bad / 'config.json'} is not valid JSON" in line
    bert = tmp_path / "bert"
    shutil.copytree(bert_dir, bert)
    (bert / "config.json").write_text("null")
    with pytest.raises(UpcycleError, match=r"config.json is not a JSON object"):
        ClassificationTask(bert, "text")
    with pytest.raises(UpcycleError, match=r"config.json is not valid JSON"):
        CausalLMTask(bad)
    # tune --model: the same line through the task
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "a b", "label": 0}] * 4)
    line = _fails(capsys, "tune", "--model", bert, "--data", data, "--held-out", data,
                  "--out", tmp_path / "t", "--method", "sherl", "--max-steps", "1")
    assert "is not a JSON object" in line


# -- data: text and labels -----------------------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ({"text": None, "label": 0}, "line 2: 'text' is null (or missing), expected a string"),
    ({"text": 3, "label": 0}, "line 2: 'text' is a int, expected a string"),
    ({"text": ["a"], "label": 0}, "line 2: 'text' is a list, expected a string"),
    ({"text": "a", "label": True}, "line 2: label true is a boolean"),
    ({"text": "a", "label": 1.5}, "line 2: label 1.5 is not an integer class id"),
    ({"text": "a", "label": 1.0}, "line 2: label 1.0 is not an integer class id"),
    ({"text": "a", "label": "2.0"}, "line 2: label '2.0' is not an integer class id"),
    ({"text": "a", "label": None}, "line 2: label is null"),
    ({"text": "a", "label": 10 ** 30}, f"line 2: label {10 ** 30} does not fit a 64-bit"),
])
def test_bad_text_and_labels_name_file_and_line(bert_dir, tmp_path, row, message):
    task = ClassificationTask(bert_dir, "text")
    path = _jsonl(tmp_path / "train.jsonl", [{"text": "a b", "label": 0}, row])
    with pytest.raises(UpcycleError, match="train.jsonl, " + _re(message)):
        task.read(path, split="train")


def _re(text):
    import re

    return re.escape(text)


def test_labels_for_a_new_head_refuse_booleans_and_fractions(bert_dir, tmp_path):
    """Without a head the class names come from the data: true/false or 0.5 must not
    become class names."""
    from transformers import BertModel

    plain = tmp_path / "plain"
    BertModel.from_pretrained(bert_dir).save_pretrained(plain)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (bert_dir / name).is_file():
            (plain / name).write_bytes((bert_dir / name).read_bytes())
    task = ClassificationTask(plain, "text")
    with pytest.raises(UpcycleError, match=r"line 1: label true is a boolean"):
        task.read(_jsonl(tmp_path / "b.jsonl", [{"text": "a", "label": True},
                                                 {"text": "b", "label": False}]),
                  split="training", fix_num_labels=True)
    with pytest.raises(UpcycleError, match=r"line 1: label 0.5 is not an integer"):
        task.read(_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": 0.5}]),
                  split="training", fix_num_labels=True)
    # a huge label is one error line, not a set of range(10**12) in memory
    with pytest.raises(UpcycleError, match=r"skip 1, 2, 3, .* --num-labels 1000000000001"):
        task.read(_jsonl(tmp_path / "h.jsonl", [{"text": "a", "label": 0},
                                                 {"text": "b", "label": 10 ** 12}]),
                  split="training", fix_num_labels=True)
    # class names still work
    data = task.read(_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": "x"},
                                                    {"text": "b", "label": "y"}]),
                     split="training", fix_num_labels=True)
    assert data.labels.tolist() == [0, 1]


def test_csv_short_row_and_non_utf8_name_the_line(bert_dir, tmp_path):
    task = ClassificationTask(bert_dir, "text")
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\na b,0\nb a\n")
    with pytest.raises(UpcycleError, match=r"d.csv, line 3: label is null"):
        task.read(csv_file)
    csv_file.write_bytes(b"text,label\na b,0\n\xff\xfe,1\n")
    with pytest.raises(UpcycleError, match=r"d.csv, line 3: not UTF-8 text"):
        task.read(csv_file)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"text": "a", "label": 0}\n{"text": "\xe9", "label": 1}\n')
    with pytest.raises(UpcycleError, match=r"d.jsonl, line 2: not UTF-8 text"):
        task.read(jsonl)


def test_causal_lm_data_refuses_non_strings_and_non_utf8(lm_dir, tmp_path):
    task = CausalLMTask(lm_dir, max_length=16)
    for rows, message in (
            ([{"text": "the cat"}, {"text": None}], "line 2: no 'text' field"),
            ([{"text": "the cat"}, {"text": 12}], "line 2: 'text' is a int, expected a string"),
            ([{"text": "the cat"}, {"text": True}], "line 2: 'text' is true, expected a string"),
            ([{"prompt": "q", "completion": "a"}, {"prompt": ["q"], "completion": "a"}],
             "line 2: 'prompt' is a list, expected a string"),
            ([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": None}],
             "line 2: no 'completion' field")):
        with pytest.raises(UpcycleError, match=_re(message)):
            task.read(_jsonl(tmp_path / "lm.jsonl", rows))
    for name, raw in (("lm.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n'),
                      ("lm.csv", b"text\nthe cat\n\xe9 dog\n")):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(UpcycleError, match=rf"{name}, line \d: not UTF-8 text"):
            task.read(tmp_path / name)
    line = (tmp_path / "lm.csv").read_bytes().split(b"\n").index(b"\xe9 dog") + 1
    with pytest.raises(UpcycleError, match=rf"line {line}: not UTF-8"):
        task.read(tmp_path / "lm.csv")


# -- identical splits warn -----------------------------------------------------------------------

def test_held_out_equal_to_training_warns(bert_dir, lm_dir, tmp_path):
    task = ClassificationTask(bert_dir, "text")
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(["a b", "b c", "c d", "d a"])]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    same = _jsonl(tmp_path / "same.jsonl", rows[::-1])  # shuffled: the same examples
    other = _jsonl(tmp_path / "other.jsonl", rows[:3])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        task.read_training(train)
        task.read(other, split="held-out")
        assert not [w for w in seen if issubclass(w.category, UpcycleWarning)]
        task.read(same, split="held-out")
    found = [str(w.message) for w in seen if issubclass(w.category, UpcycleWarning)]
    assert len(found) == 1
    assert f"held-out file {same} holds the same examples as the training file {train}" \
        in found[0]

    lm = CausalLMTask(lm_dir, max_length=16)
    text = tmp_path / "a.txt"
    text.write_text("\n".join(CORPUS[:6]) + "\n")
    copy = tmp_path / "b.txt"
    copy.write_text(text.read_text())
    with pytest.warns(UpcycleWarning, match=r"test file .*b.txt holds the same examples as "
                                            r"the held-out file .*a.txt"):
        lm.read(text, split="held-out")
        lm.read(copy, split="test")


def test_soup_cli_warns_in_one_line_when_test_equals_held_out(bert_dir, tmp_path, capsys):
    import shutil

    second = tmp_path / "second"
    shutil.copytree(bert_dir, second)
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(["a b", "b c", "c d", "d a"])]
    held = _jsonl(tmp_path / "held.jsonl", rows)
    test = _jsonl(tmp_path / "test.jsonl", rows)
    capsys.readouterr()
    assert main(["soup", str(bert_dir), str(second), "--method", "uniform", "--held-out",
                 str(held), "--test", str(test), "--out", str(tmp_path / "soup"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "holds the same examples" in line]
    assert lines == [f"upcycle soup: warning: the test file {test} holds the same examples as "
                     f"the held-out file {held}: its scores say nothing about unseen data"], err


# -- resume: the weights' digest -----------------------------------------------------------------

def test_resume_refuses_base_weights_replaced_by_a_same_size_file(tiny_gpt2, tmp_path):
    args = argparse.Namespace(lr=0.1)
    before = run_fingerprint(args, {"model": str(tiny_gpt2)})
    folder = tmp_path / "ckpt"
    prepare_checkpoints(folder, before)
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "trainer_state.json").write_text("{}")
    assert json.loads((folder / RUN_FILE).read_text()) == json.loads(json.dumps(before))
    assert prepare_checkpoints(folder, run_fingerprint(args, {"model": str(tiny_gpt2)}),
                               resume=True) == folder / "checkpoint-1"
    # same names, same size, other values
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    size = (tiny_gpt2 / "model.safetensors").stat().st_size
    model.save_pretrained(tiny_gpt2)
    assert (tiny_gpt2 / "model.safetensors").stat().st_size == size
    after = run_fingerprint(args, {"model": str(tiny_gpt2)})
    assert after["model weight files"] == before["model weight files"]
    with pytest.raises(UpcycleError, match=r"another run \(model model.safetensors digest: "):
        prepare_checkpoints(folder, after, resume=True)


def test_weights_digest_reads_a_bounded_sample(tmp_path, monkeypatch):
    from upcycle.training.runs import weights_digest

    big = tmp_path / "w.bin"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    first = weights_digest(big)
    with open(big, "r+b") as f:  # other data in the middle of the file
        f.seek(40 << 20)
        f.write(b"\x01" * (1 << 20))
    assert weights_digest(big) != first
    read = []
    real_open = open

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, n):
            data = self.handle.read(n)
            read.append(len(data))
            return data

        def seek(self, offset):
            return self.handle.seek(offset)

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    weights_digest(big)
    assert sum(read) <= 3 << 20


# -- bounded tokenising --------------------------------------------------------------------------

class _Recording:
    """A tokenizer that records the longest string it is called with."""

    def __init__(self, tokenizer):
        self.__dict__["_tok"] = tokenizer
        self.__dict__["longest"] = 0

    def __call__(self, texts, *args, **kwargs):
        batch = [texts] if isinstance(texts, str) else texts
        self.__dict__["longest"] = max([self.longest, *map(len, batch)])
        return self._tok(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)

    def __len__(self):
        return len(self._tok)


HUGE = 5_000_000


def test_a_huge_classification_line_is_cut_before_tokenising(bert_dir, tmp_path):
    task = ClassificationTask(bert_dir, "text", max_length=16)
    recording = _Recording(task.tokenizer)
    task._tokenizer = recording
    normal = ["a b c d a", "b c"]
    rows = [{"text": normal[0], "label": 0}, {"text": "a b " * (HUGE // 4), "label": 1},
            {"text": normal[1], "label": 2}]
    data = task.read(_jsonl(tmp_path / "big.jsonl", rows))
    batch = task.batches(data, 3)[0]
    assert recording.longest <= 16 * CHARS_PER_TOKEN
    assert data.texts[0] == normal[0] and data.texts[2] == normal[1]
    whole = recording._tok(["a b c d a", "a b " * 200, "b c"], padding=True, truncation=True,
                           max_length=16, return_tensors="pt")
    assert torch.equal(batch["input_ids"], whole["input_ids"])  # same tokens as uncut
    collated = task.collator()([task.dataset(data)[i] for i in range(3)])
    assert torch.equal(collated["input_ids"], whole["input_ids"])


def test_a_huge_causal_lm_line_is_tokenised_in_bounded_pieces(lm_dir, tmp_path):
    task = CausalLMTask(lm_dir, max_length=16)
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(CORPUS) + "\n")
    expected = task.read(plain)  # normal lines: unchanged by the cut
    recording = _Recording(task.tokenizer)
    task.tokenizer = recording
    again = task.read(plain)
    assert again.input_ids == expected.input_ids and again.labels == expected.labels
    ids = task.tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in doc + [task.tokenizer.eos_token_id]]
    assert [t for block in expected.input_ids for t in block] == stream

    # packed: a 5 MB line is used whole, tokenised in pieces of bounded length
    line = " ".join(CORPUS) + " "
    huge = line * (HUGE // len(line))
    big = tmp_path / "big.txt"
    big.write_text(huge + "\n")
    recording.__dict__["longest"] = 0
    data = task.read(big)
    assert 0 < recording.longest <= 16 * CHARS_PER_TOKEN
    sample = line * 3
    tokens = recording._tok(sample, add_special_tokens=False)["input_ids"]
    packed = [t for block in data.input_ids for t in block]
    assert packed[:len(tokens) - 2] == tokens[:-2]  # the pieces tokenise as the whole
    assert packed[-1] == task.tokenizer.eos_token_id

    # truncated (pack=False) and prompt/completion: cut to max_length * 32 characters
    task.pack = False
    recording.__dict__["longest"] = 0
    data = task.read(big)
    assert recording.longest <= 16 * CHARS_PER_TOKEN and len(data.input_ids[0]) == 16
    paired = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x " * HUGE, "completion": huge}])
    recording.__dict__["longest"] = 0
    data = task.read(paired)
    assert recording.longest <= 16 * CHARS_PER_TOKEN and len(data.input_ids[0]) == 16


def test_cut_text_keeps_the_start_or_the_end():
    assert cut_text("abc", 1) == "abc"
    text = "x" * 100 + "y" * 100
    assert cut_text(text, 2) == "x" * 64
    assert cut_text(text, 2, keep="end") == "y" * 64
