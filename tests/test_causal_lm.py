"""The causal-LM task: reading, packing, prompt masking, token-mean loss, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lm_models import CORPUS, save_lm, tiny_lm, tiny_tokenizer, write_lines

from upcycle.errors import UpcycleError
from upcycle.tasks.causal_lm import (
    IGNORE_INDEX,
    CausalLMTask,
    causal_lm_loss,
    evaluate,
    is_causal_lm,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=["gpt2", "llama"])
def lm_dir(request, tmp_path, tokenizer):
    return save_lm(tiny_lm(request.param), tmp_path / request.param, tokenizer)


def test_text_is_packed_into_blocks_with_eos_between_documents(lm_dir, tmp_path, tokenizer):
    task = CausalLMTask(lm_dir, max_length=16)
    data = task.read(write_lines(tmp_path / "a.txt", ["", *CORPUS[:6], "  "]))
    stream = [t for ids in tokenizer(CORPUS[:6], add_special_tokens=False)["input_ids"]
              for t in ids + [tokenizer.eos_token_id]]
    assert [t for ids in data.input_ids for t in ids] == stream
    assert all(len(ids) == 16 for ids in data.input_ids[:-1])
    assert data.labels == data.input_ids
    # one full batch: the loss is HF's own shifted token mean
    model = task.load_model()
    batch = task.batches(data.subset(range(len(data) - 1)), 64)[0]
    assert torch.allclose(causal_lm_loss(model, batch), model(**batch).loss, atol=1e-6)


def test_pad_token_defaults_to_eos(lm_dir):
    task = CausalLMTask(lm_dir, max_length=16)
    assert task.tokenizer.pad_token_id == task.tokenizer.eos_token_id
    assert task.load_model().config.pad_token_id == task.tokenizer.eos_token_id


def test_prompt_and_padding_carry_no_loss(lm_dir, tmp_path, tokenizer):
    rows = [{"prompt": "the cat sat", "completion": " on the mat"},
            {"prompt": "stocks fell as the market opened", "completion": " lower"}]
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = CausalLMTask(lm_dir, max_length=32)
    data = task.read(path)
    batch = task.batches(data, 2)[0]
    for row, r in enumerate(rows):
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [0]
        k = len(p) + len(c)
        assert batch["input_ids"][row, :k].tolist() == p + c
        assert batch["labels"][row, :len(p)].eq(IGNORE_INDEX).all()
        assert batch["labels"][row, len(p):k].tolist() == c
        assert batch["labels"][row, k:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == k
    # the loss is the mean over completion tokens only: a per-example manual computation
    model = task.load_model()
    total, count = 0.0, 0
    for i in range(2):
        ids = torch.tensor([data.input_ids[i]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(data.labels[i][1:])
        keep = targets != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    assert math.isclose(float(causal_lm_loss(model, batch)), total / count, rel_tol=1e-5)
    assert evaluate(model, [batch])["tokens"] == count == data.target_tokens()


def test_paired_rows_are_never_packed_and_keep_the_completion(lm_dir, tmp_path, tokenizer):
    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": "", "completion": "the cat"}, {"prompt": "the dog " * 20, "completion": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = CausalLMTask(lm_dir, max_length=16).read(path)
    assert len(data) == 2 and all(len(ids) <= 16 for ids in data.input_ids)
    assert data.labels[0] == data.input_ids[0]  # empty prompt: every token is a target
    completion = tokenizer("x", add_special_tokens=False)["input_ids"] + [0]
    assert data.input_ids[1][-len(completion):] == completion  # the prompt was cut, not this
    assert data.labels[1] == [IGNORE_INDEX] * (16 - len(completion)) + completion


def test_evaluate_is_the_token_mean_not_a_mean_of_batch_means(lm_dir, tmp_path):
    task = CausalLMTask(lm_dir, max_length=16, pack=False)
    data = task.read(write_lines(tmp_path / "a.txt", ["the cat", *CORPUS[:5]]))
    model = task.load_model()
    one = evaluate(model, task.batches(data, 1))
    whole = evaluate(model, task.batches(data, 64))
    assert one["tokens"] == whole["tokens"] == data.target_tokens()
    assert math.isclose(one["loss"], whole["loss"], rel_tol=1e-5)
    assert math.isclose(whole["perplexity"], math.exp(whole["loss"]))
    per_batch = [float(causal_lm_loss(model, b)) for b in task.batches(data, 1)]
    assert not math.isclose(sum(per_batch) / len(per_batch), one["loss"], rel_tol=1e-4)


def test_csv_text_and_chunked_txt(lm_dir, tmp_path, tokenizer):
    task = CausalLMTask(lm_dir, max_length=16)
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("text,topic\n" + "".join(f"{t},x\n" for t in CORPUS[:3]))
    assert task.read(csv_path).target_tokens() > 0
    chunked = CausalLMTask(lm_dir, max_length=16, chunk=True)
    data = chunked.read(write_lines(tmp_path / "long.txt", CORPUS[:3]))
    expected = tokenizer("\n".join(CORPUS[:3]), add_special_tokens=False)["input_ids"] + [0]
    assert [t for ids in data.input_ids for t in ids] == expected


def test_task_is_chosen_from_the_config(lm_dir, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    assert is_causal_lm(lm_dir)
    clf = tmp_path / "clf"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32,
                                             vocab_size=50)).save_pretrained(clf)
    assert not is_causal_lm(clf)


def test_bad_inputs_name_file_and_line(lm_dir, tmp_path):
    task = CausalLMTask(lm_dir, max_length=16)
    with pytest.raises(UpcycleError, match=r"empty.txt: is empty"):
        task.read(write_lines(tmp_path / "empty.txt", ["", "  "]))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nanother\nbroken \xff\xfe here\n")
    with pytest.raises(UpcycleError, match=r"bad.txt, line 3: not UTF-8"):
        task.read(bad)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "the cat"}\n\n{"body": "no text"}\n')
    with pytest.raises(UpcycleError, match=r"rows.jsonl, line 3: no 'text' field"):
        task.read(rows)
    pc = tmp_path / "pc.jsonl"
    pc.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(UpcycleError, match=r"pc.jsonl, line 2: no 'completion' field"):
        task.read(pc)
    with pytest.raises(UpcycleError, match=r"unknown format '.npz'"):
        task.read(tmp_path / "x.npz")
    with pytest.raises(UpcycleError, match=r"max_length 65 exceeds the position limit .*64 tokens"):
        CausalLMTask(lm_dir, max_length=65)


def test_missing_tokenizer_is_looked_up_in_the_base(tmp_path, tokenizer):
    bare = save_lm(tiny_lm("gpt2"), tmp_path / "bare")
    with pytest.raises(UpcycleError, match=r"no tokenizer in .*bare"):
        CausalLMTask(bare)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UpcycleError, match=r"no tokenizer in .*bare or .*other"):
        CausalLMTask(bare, base_dir=other)
    base = save_lm(tiny_lm("gpt2"), tmp_path / "base", tokenizer)
    assert CausalLMTask(bare, base_dir=base).tokenizer.eos_token_id == 0


DDP_EVAL = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from lm_models import tiny_lm
from upcycle.runtime import distributed
from upcycle.tasks.causal_lm import evaluate
torch.set_num_threads(1)
distributed.init_from_env("cpu")  # gloo, also on a machine with one GPU
g = torch.Generator().manual_seed(0)
batches = []
for size, width in [(3, 12), (1, 5), (2, 9)]:  # unequal token counts per batch and rank
    ids = torch.randint(0, 320, (size, width), generator=g)
    labels = ids.clone()
    labels[:, : width // 3] = -100
    batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
metrics = evaluate(tiny_lm("gpt2"), distributed.shard(batches))
if distributed.rank() == 0:
    print(json.dumps(metrics))
"""


def test_evaluate_sums_tokens_over_ranks(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import torchrun

    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_EVAL)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), "x", tests_dir], check=True, env=env,
                         capture_output=True, text=True)
    two = torchrun([script, "x", tests_dir])
    a = json.loads(one.stdout.strip().splitlines()[-1])
    b = json.loads(two.stdout.strip().splitlines()[-1])
    assert a["tokens"] == b["tokens"] == 3 * 8 + 1 * 4 + 2 * 6  # targets after the shift
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6)
