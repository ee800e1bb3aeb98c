"""Issue 19, part 7: every bad input is one line.

One table of bad inputs for ``upcycle soup``, ``tune`` and ``grow``: bad paths, flags and
values, data files of each format, model folders, ingredients and ``--config`` files. Each
must end with exit code 2 and exactly one line on stderr, ``upcycle VERB: error: ...`` (an
argparse error may come after its usage lines), no traceback anywhere, nothing new at
``--out`` or beside it, and every input left as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shown
from lm_models import save_lm, tiny_lm, tiny_tokenizer
from safetensors.torch import save_file

from upcycle.cli.main import main

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film", "was",
         "a", "day", "really"]


def _bert_files(folder: Path, vocab: Path, *, hidden: int = 32, labels: int | None = 2,
                seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                     num_labels=labels or 2)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg) if labels else BertModel(cfg)
    model.save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


def _text_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        pool = WORDS[:4] if label else WORDS[4:8]
        rows.append({"text": " ".join(["the", "film", "was", *rng.choice(pool, 2)]),
                     "label": label})
    return rows


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix not in (".safetensors", ".bin"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good models and data, and bad ones beside them; returns name -> path (str)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    p = {}
    p["bert0"] = _bert_files(root / "bert0", vocab, seed=0)
    p["bert1"] = _bert_files(root / "bert1", vocab, seed=1)
    p["bert_wide"] = _bert_files(root / "bert-wide", vocab, hidden=48, seed=2)
    p["bert3"] = _bert_files(root / "bert-3labels", vocab, labels=3, seed=3)
    p["base"] = _bert_files(root / "base", vocab, labels=None, seed=4)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    gpt2.save_pretrained(root / "gpt2")
    p["gpt2"] = root / "gpt2"
    p["lm"] = save_lm(tiny_lm("gpt2"), root / "lm", tiny_tokenizer())

    # data
    rows = _text_rows(48)
    p["train"] = _jsonl(root / "train.jsonl", rows[:32])
    p["held"] = _jsonl(root / "held.jsonl", rows[32:40])
    p["test"] = _jsonl(root / "test.jsonl", rows[40:])
    p["empty_jsonl"] = _jsonl(root / "empty.jsonl", [])
    (root / "badjson.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", \n')
    p["badjson"] = root / "badjson.jsonl"
    p["nolabel"] = _jsonl(root / "nolabel.jsonl", [{"text": "good film"}] * 8)
    p["list_rows"] = _jsonl(root / "list-rows.jsonl", [[1, 2]] * 8)
    p["label_str_mix"] = _jsonl(root / "label-mix.jsonl",
                                [{"text": "good", "label": 1}, {"text": "bad", "label": [0]}] * 4)
    p["one_class"] = _jsonl(root / "one-class.jsonl", [{"text": "good film", "label": 0}] * 8)
    p["null_text"] = _jsonl(root / "null-text.jsonl", [{"text": None, "label": 0},
                                                       *rows[:7]])
    p["bool_label"] = _jsonl(root / "bool-label.jsonl", [{"text": "good", "label": True},
                                                         *rows[:7]])
    p["overflow_label"] = _jsonl(root / "overflow-label.jsonl",
                                 [{"text": "good", "label": 2**70}, *rows[:7]])
    (root / "nonutf8.jsonl").write_bytes(b'{"text": "good", "label": 1}\n{"text": "\xff\xfe", '
                                         b'"label": 0}\n')
    p["nonutf8_jsonl"] = root / "nonutf8.jsonl"
    (root / "train.csv").write_text("text,label\n" + "".join(
        f"{r['text']},{r['label']}\n" for r in rows[:32]))
    p["csv"] = root / "train.csv"
    (root / "notext.csv").write_text("sentence,label\ngood film,1\nbad film,0\n")
    p["notext_csv"] = root / "notext.csv"
    (root / "header-only.csv").write_text("text,label\n")
    p["header_csv"] = root / "header-only.csv"
    (root / "nonutf8.csv").write_bytes(b"text,label\ngood,1\n\xff\xfe,0\n")
    p["nonutf8_csv"] = root / "nonutf8.csv"
    (root / "data.xml").write_text("<rows/>\n")
    p["xml"] = root / "data.xml"
    np.savez(root / "bad.npz", foo=np.zeros(3))
    p["bad_npz"] = root / "bad.npz"
    (root / "notzip.npz").write_bytes(b"not a zip file at all")
    p["notzip_npz"] = root / "notzip.npz"
    (root / "lm.txt").write_text("the film was good\nthe day was bad\n" * 8)
    p["lm_txt"] = root / "lm.txt"
    (root / "empty.txt").write_text("")
    p["empty_txt"] = root / "empty.txt"
    (root / "nonutf8.txt").write_bytes(b"the film\n\xff\xfe was\n")
    p["nonutf8_txt"] = root / "nonutf8.txt"
    (root / "a-dir").mkdir()
    p["dir"] = root / "a-dir"

    # bad model folders
    p["empty_dir"] = root / "empty-dir"
    p["empty_dir"].mkdir()
    p["noweights"] = _copy_without_weights(p["bert0"], root / "noweights")
    p["bin_random"] = _copy_without_weights(p["bert0"], root / "bin-random")
    (p["bin_random"] / "pytorch_model.bin").write_bytes(os.urandom(4096))
    p["bin_trunc"] = _copy_without_weights(p["bert0"], root / "bin-trunc")
    torch.save(transformers.BertForSequenceClassification.from_pretrained(
        p["bert0"]).state_dict(), p["bin_trunc"] / "pytorch_model.bin")
    data = (p["bin_trunc"] / "pytorch_model.bin").read_bytes()
    (p["bin_trunc"] / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    p["bin_object"] = _copy_without_weights(p["bert0"], root / "bin-object")
    torch.save({"a": Path("x")}, p["bin_object"] / "pytorch_model.bin")  # not weights_only
    p["st_trunc"] = _copy_without_weights(p["bert0"], root / "st-trunc")
    data = (p["bert0"] / "model.safetensors").read_bytes()
    (p["st_trunc"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    p["st_garbage"] = _copy_without_weights(p["bert0"], root / "st-garbage")
    (p["st_garbage"] / "model.safetensors").write_bytes(os.urandom(2048))
    p["loop"] = _copy_without_weights(p["bert0"], root / "loop")
    os.symlink("model.safetensors", p["loop"] / "model.safetensors")
    p["dangling"] = _copy_without_weights(p["bert0"], root / "dangling")
    os.symlink(root / "nowhere.safetensors", p["dangling"] / "model.safetensors")
    p["config_notjson"] = root / "config-notjson"
    shutil.copytree(p["bert0"], p["config_notjson"])
    (p["config_notjson"] / "config.json").write_text("{not json")
    p["config_list"] = root / "config-list"
    shutil.copytree(p["bert0"], p["config_list"])
    (p["config_list"] / "config.json").write_text("[1, 2]")
    p["config_unknown_type"] = root / "config-unknown"
    shutil.copytree(p["bert0"], p["config_unknown_type"])
    cfg = json.loads((p["bert0"] / "config.json").read_text())
    (p["config_unknown_type"] / "config.json").write_text(json.dumps(
        {**cfg, "model_type": "no-such-model", "architectures": ["NoSuchModel"]}))
    p["auto_map"] = root / "auto-map"
    shutil.copytree(p["bert0"], p["auto_map"])
    (p["auto_map"] / "config.json").write_text(json.dumps(
        {**cfg, "model_type": "custom-thing", "auto_map": {
            "AutoConfig": "modeling.CustomConfig",
            "AutoModelForSequenceClassification": "modeling.CustomModel"}}))
    (p["auto_map"] / "modeling.py").write_text("raise SystemExit('custom code ran')\n")
    p["no_config"] = root / "no-config"
    shutil.copytree(p["bert0"], p["no_config"])
    (p["no_config"] / "config.json").unlink()
    p["no_tokenizer"] = root / "no-tokenizer"
    p["no_tokenizer"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(p["bert0"] / name, p["no_tokenizer"] / name)
    p["st_wrong_names"] = _copy_without_weights(p["bert0"], root / "st-wrong-names")
    save_file({"foo": torch.zeros(3)}, p["st_wrong_names"] / "model.safetensors")
    p["index_bad"] = _copy_without_weights(p["bert0"], root / "index-bad")
    (p["index_bad"] / "model.safetensors.index.json").write_text("{oops")
    p["index_missing_shard"] = _copy_without_weights(p["bert0"], root / "index-shard")
    (p["index_missing_shard"] / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"bert.embeddings.word_embeddings.weight": "shard-1.safetensors"}}))

    # bad ingredient files
    p["st_file_trunc"] = root / "trunc.safetensors"
    p["st_file_trunc"].write_bytes(data[: len(data) // 3])
    p["bin_file_random"] = root / "random.bin"
    p["bin_file_random"].write_bytes(os.urandom(1000))
    p["pt_file_object"] = root / "object.pt"
    torch.save({"w": torch.zeros(2), "x": [1, 2]}, p["pt_file_object"])
    p["pt_zip_broken"] = root / "broken.pt"
    with zipfile.ZipFile(p["pt_zip_broken"], "w") as z:
        z.writestr("archive/data.pkl", b"garbage")
    p["st_empty"] = root / "empty.safetensors"
    save_file({}, p["st_empty"])
    p["notes"] = root / "notes.txt"
    p["notes"].write_text("hello\n")
    p["st_nan"] = root / "nan.safetensors"
    sd = {k: v.clone() for k, v in transformers.BertForSequenceClassification.from_pretrained(
        p["bert0"]).state_dict().items()}
    sd["classifier.weight"][0, 0] = float("nan")
    save_file(sd, p["st_nan"])
    p["st_subset"] = root / "subset.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("classifier")}, p["st_subset"])
    p["st_int"] = root / "int.safetensors"
    save_file({k: v.to(torch.int32) if k == "classifier.bias" else v for k, v in sd.items()
               if k != "classifier.weight"} | {"classifier.weight": torch.zeros(2, 32)},
              p["st_int"])

    # LoRA adapter folder without --base
    p["lora"] = root / "lora"
    p["lora"].mkdir()
    (p["lora"] / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"],
         "base_model_name_or_path": "nowhere"}))
    save_file({"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight":
               torch.zeros(2, 32),
               "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight":
               torch.zeros(32, 2)}, p["lora"] / "adapter_model.safetensors")

    p["lora_cfg_bad"] = root / "lora-cfg-bad"
    shutil.copytree(p["lora"], p["lora_cfg_bad"])
    (p["lora_cfg_bad"] / "adapter_config.json").write_text("{oops")
    p["lora_cfg_list"] = root / "lora-cfg-list"
    shutil.copytree(p["lora"], p["lora_cfg_list"])
    (p["lora_cfg_list"] / "adapter_config.json").write_text("[]")
    p["lora_trunc"] = root / "lora-trunc"
    shutil.copytree(p["lora"], p["lora_trunc"])
    weights = p["lora_trunc"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    p["lora_bin_random"] = root / "lora-bin-random"
    shutil.copytree(p["lora"], p["lora_bin_random"])
    (p["lora_bin_random"] / "adapter_model.safetensors").unlink()
    (p["lora_bin_random"] / "adapter_model.bin").write_bytes(os.urandom(512))
    p["lora_other_base"] = root / "lora-other-base"
    shutil.copytree(p["lora"], p["lora_other_base"])
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 2)},
              p["lora_other_base"] / "adapter_model.safetensors")

    # --config files
    (root / "bad.yaml").write_text("method: [uniform\n")
    p["cfg_bad_yaml"] = root / "bad.yaml"
    (root / "bad.json").write_text("{nope")
    p["cfg_bad_json"] = root / "bad.json"
    (root / "unknown.yaml").write_text("methd: uniform\n")
    p["cfg_unknown"] = root / "unknown.yaml"
    (root / "list.yaml").write_text("- 1\n- 2\n")
    p["cfg_list"] = root / "list.yaml"
    (root / "wrongtype.yaml").write_text("epochs: many\n")
    p["cfg_wrong_type"] = root / "wrongtype.yaml"
    (root / "nonutf8.yaml").write_bytes(b"method: \xff\xfe\n")
    p["cfg_nonutf8"] = root / "nonutf8.yaml"
    p["existing"] = root / "existing-out"
    p["existing"].mkdir()
    (p["existing"] / "keep.txt").write_text("keep\n")
    p["root"] = root
    return {k: str(v) for k, v in p.items()}


Case = namedtuple("Case", "id verb args warning")


def case(verb, id, *args, xfail=None, warning=None):
    """A bad input: ``args`` of ``upcycle`` ({name} for the world's paths, --out added when
    absent). ``warning``: the input is allowed, with one ``upcycle VERB: warning:`` line
    holding this text (exit 0). ``xfail``: the part of issue 19 that fixes it."""
    marks = [pytest.mark.xfail(strict=False, reason=f"issue 19 {xfail}")] if xfail else []
    return pytest.param(Case(id, verb, list(args), warning), id=f"{verb}-{id}", marks=marks)


SOUP_OK = ("{bert0}", "{bert1}")
TUNE = ("tune", "--method", "snell", "--model", "{base}", "--data", "{train}",
        "--max-steps", "1", "--batch-size", "4", "--quiet")
GROW = ("grow", "--model", "{gpt2}", "--hidden-size", "48")
GREEDY = ("soup", "--method", "greedy", *SOUP_OK, "--quiet")

CASES = [
    # -- soup: paths and ingredients ------------------------------------------------------
    case("soup", "missing-ingredient", "soup", "{root}/nowhere", "{bert1}"),
    case("soup", "glob-matches-nothing", "soup", "{root}/nomatch*", "{bert1}"),
    case("soup", "empty-folder", "soup", "{empty_dir}", "{bert1}"),
    case("soup", "unknown-format", "soup", "{notes}", "{bert1}"),
    case("soup", "truncated-safetensors-file", "soup", "{st_file_trunc}", "{bert1}"),
    case("soup", "random-bytes-bin", "soup", "{bin_file_random}", "{bert1}"),
    case("soup", "pt-with-a-list", "soup", "{pt_file_object}", "{bert1}"),
    case("soup", "zip-without-pickle", "soup", "{pt_zip_broken}", "{bert1}"),
    case("soup", "empty-safetensors", "soup", "{st_empty}", "{bert1}"),
    case("soup", "folder-random-bin", "soup", "{bin_random}", "{bert1}"),
    case("soup", "folder-truncated-bin", "soup", "{bin_trunc}", "{bert1}"),
    case("soup", "folder-bin-with-object", "soup", "{bin_object}", "{bert1}"),
    case("soup", "folder-truncated-safetensors", "soup", "{st_trunc}", "{bert1}"),
    case("soup", "folder-garbage-safetensors", "soup", "{st_garbage}", "{bert1}"),
    case("soup", "folder-symlink-loop", "soup", "{loop}", "{bert1}"),
    case("soup", "folder-dangling-symlink", "soup", "{dangling}", "{bert1}"),
    case("soup", "folder-without-weights", "soup", "{noweights}", "{bert1}"),
    case("soup", "bad-index", "soup", "{index_bad}", "{bert1}"),
    case("soup", "index-missing-shard", "soup", "{index_missing_shard}", "{bert1}"),
    case("soup", "mismatched-shapes", "soup", "{bert0}", "{bert_wide}"),
    case("soup", "mismatched-heads", "soup", "{bert0}", "{bert3}"),
    case("soup", "mismatched-names", "soup", "{bert0}", "{st_wrong_names}"),
    case("soup", "missing-tensors", "soup", "{bert0}", "{st_subset}"),
    case("soup", "other-family", "soup", "{bert0}", "{gpt2}"),
    case("soup", "nan-weight", "soup", "{bert0}", "{st_nan}"),
    case("soup", "integer-tensor-differs", "soup", "{bert0}", "{st_int}"),
    case("soup", "lora-without-base", "soup", "{lora}", "{bert1}"),
    case("soup", "lora-config-not-json", "soup", "--base", "{bert0}", "{lora_cfg_bad}",
         "{bert1}"),
    case("soup", "lora-config-a-list", "soup", "--base", "{bert0}", "{lora_cfg_list}",
         "{bert1}"),
    case("soup", "lora-truncated-weights", "soup", "--base", "{bert0}", "{lora_trunc}",
         "{bert1}"),
    case("soup", "lora-random-bin", "soup", "--base", "{bert0}", "{lora_bin_random}",
         "{bert1}"),
    case("soup", "lora-for-another-base", "soup", "--base", "{bert0}", "{lora_other_base}",
         "{bert1}"),
    case("soup", "base-truncated", "soup", "--base", "{st_trunc}", "{lora}", "{bert1}"),
    case("soup", "config-not-json", "soup", "{config_notjson}", "{bert1}"),
    # -- soup: flags and values ----------------------------------------------------------
    case("soup", "unknown-method", "soup", "--method", "stew", *SOUP_OK),
    case("soup", "unknown-flag", "soup", "--epocs", "3", *SOUP_OK),
    case("soup", "bad-shard-size", "soup", "--max-shard-size", "lots", *SOUP_OK),
    case("soup", "bad-device", "soup", "--device", "tpu", *SOUP_OK),
    case("soup", "existing-out", "soup", *SOUP_OK, "--out", "{existing}"),
    case("soup", "greedy-without-data", *GREEDY),
    case("soup", "held-out-fraction-too-big", *GREEDY, "--data", "{train}",
         "--held-out-fraction", "1.5"),
    case("soup", "shard-directions-uniform", "soup", "--shard-directions", *SOUP_OK),
    case("soup", "out-is-ingredient", "soup", *SOUP_OK, "--out", "{bert0}", "--overwrite"),
    # -- soup: data files ----------------------------------------------------------------
    case("soup", "missing-held-out", *GREEDY, "--held-out", "{root}/nowhere.jsonl"),
    case("soup", "held-out-is-folder", *GREEDY, "--held-out", "{dir}"),
    case("soup", "empty-jsonl", *GREEDY, "--held-out", "{empty_jsonl}"),
    case("soup", "bad-json-line", *GREEDY, "--held-out", "{badjson}"),
    case("soup", "no-label", *GREEDY, "--held-out", "{nolabel}"),
    case("soup", "rows-not-objects", *GREEDY, "--held-out", "{list_rows}"),
    case("soup", "label-a-list", *GREEDY, "--held-out", "{label_str_mix}"),
    case("soup", "csv-without-text", *GREEDY, "--held-out", "{notext_csv}"),
    case("soup", "csv-header-only", *GREEDY, "--held-out", "{header_csv}"),
    case("soup", "unknown-data-suffix", *GREEDY, "--held-out", "{xml}"),
    case("soup", "npz-without-images", *GREEDY, "--held-out", "{bad_npz}"),
    case("soup", "labels-outside-head", *GREEDY, "--held-out", "{train}", "--test",
         "{label_str_mix}"),
    case("soup", "nonutf8-jsonl", *GREEDY, "--held-out", "{nonutf8_jsonl}"),
    case("soup", "nonutf8-csv", *GREEDY, "--held-out", "{nonutf8_csv}"),
    case("soup", "null-text", *GREEDY, "--held-out", "{null_text}"),
    case("soup", "bool-label", *GREEDY, "--held-out", "{bool_label}"),
    case("soup", "overflow-label", *GREEDY, "--held-out", "{overflow_label}"),
    case("soup", "model-folder-truncated", *GREEDY, "--held-out", "{held}", "--model",
         "{st_trunc}"),
    # -- soup: --config ------------------------------------------------------------------
    case("soup", "config-missing", "soup", *SOUP_OK, "--config", "{root}/nowhere.yaml"),
    case("soup", "config-bad-yaml", "soup", *SOUP_OK, "--config", "{cfg_bad_yaml}"),
    case("soup", "config-bad-json", "soup", *SOUP_OK, "--config", "{cfg_bad_json}"),
    case("soup", "config-unknown-key", "soup", *SOUP_OK, "--config", "{cfg_unknown}"),
    case("soup", "config-a-list", "soup", *SOUP_OK, "--config", "{cfg_list}"),
    case("soup", "config-nonutf8", "soup", *SOUP_OK, "--config", "{cfg_nonutf8}"),
    # -- tune ----------------------------------------------------------------------------
    case("tune", "missing-model", "tune", "--method", "snell", "--model", "{root}/nowhere",
         "--data", "{train}"),
    case("tune", "model-is-a-file", "tune", "--method", "snell", "--model", "{train}",
         "--data", "{train}"),
    case("tune", "model-empty-folder", *TUNE[:3], "--model", "{empty_dir}", *TUNE[5:]),
    case("tune", "model-without-weights", *TUNE[:3], "--model", "{noweights}", *TUNE[5:]),
    case("tune", "model-random-bin", *TUNE[:3], "--model", "{bin_random}", *TUNE[5:]),
    case("tune", "model-truncated-bin", *TUNE[:3], "--model", "{bin_trunc}", *TUNE[5:]),
    case("tune", "model-bin-with-object", *TUNE[:3], "--model", "{bin_object}", *TUNE[5:]),
    case("tune", "model-truncated-safetensors", *TUNE[:3], "--model", "{st_trunc}",
         *TUNE[5:]),
    case("tune", "model-garbage-safetensors", *TUNE[:3], "--model", "{st_garbage}",
         *TUNE[5:]),
    case("tune", "model-symlink-loop", *TUNE[:3], "--model", "{loop}", *TUNE[5:]),
    case("tune", "model-dangling-symlink", *TUNE[:3], "--model", "{dangling}", *TUNE[5:]),
    case("tune", "model-without-config", *TUNE[:3], "--model", "{no_config}", *TUNE[5:]),
    case("tune", "model-config-list", *TUNE[:3], "--model", "{config_list}", *TUNE[5:]),
    case("tune", "model-unknown-type", *TUNE[:3], "--model", "{config_unknown_type}",
         *TUNE[5:]),
    case("tune", "model-without-tokenizer", *TUNE[:3], "--model", "{no_tokenizer}",
         *TUNE[5:]),
    case("tune", "model-wrong-tensor-names", *TUNE[:3], "--model", "{st_wrong_names}",
         *TUNE[5:]),
    case("tune", "model-config-not-json", *TUNE[:3], "--model", "{config_notjson}",
         *TUNE[5:]),
    case("tune", "model-auto-map", *TUNE[:3], "--model", "{auto_map}", *TUNE[5:]),
    case("tune", "unknown-method", "tune", "--method", "lora", "--model", "{base}", "--data",
         "{train}"),
    case("tune", "zero-epochs", *TUNE, "--epochs", "0"),
    case("tune", "zero-max-steps", *TUNE[:-5], "--max-steps", "0"),
    case("tune", "zero-batch-size", *TUNE[:-3], "--batch-size", "0"),
    case("tune", "batch-not-divisible", *TUNE, "--grad-accum", "3"),
    case("tune", "sparsity-above-one", *TUNE, "--sparsity", "1.5"),
    case("tune", "rank-not-int", *TUNE, "--r", "four"),
    case("tune", "resume-without-checkpoints", *TUNE, "--resume"),
    case("tune", "merge-sherl", *TUNE[:2], "sherl", *TUNE[3:], "--merge"),
    case("tune", "fp16-on-cpu", *TUNE, "--device", "cpu", "--fp16"),
    case("tune", "existing-out", *TUNE, "--out", "{existing}"),
    case("tune", "chunk-classification", *TUNE, "--chunk"),
    case("tune", "missing-data", *TUNE[:5], "--data", "{root}/nowhere.jsonl", *TUNE[7:]),
    case("tune", "empty-data", *TUNE[:5], "--data", "{empty_jsonl}", *TUNE[7:]),
    case("tune", "data-bad-json", *TUNE[:5], "--data", "{badjson}", *TUNE[7:]),
    case("tune", "data-csv-without-text", *TUNE[:5], "--data", "{notext_csv}", *TUNE[7:]),
    case("tune", "data-npz-not-zip", *TUNE[:5], "--data", "{notzip_npz}", *TUNE[7:]),
    case("tune", "held-out-missing", *TUNE, "--held-out", "{root}/nowhere.jsonl"),
    case("tune", "test-no-label", *TUNE, "--test", "{nolabel}"),
    case("tune", "lm-empty-txt", *TUNE[:3], "--model", "{lm}", "--data", "{empty_txt}",
         *TUNE[7:]),
    case("tune", "lm-nonutf8-txt", *TUNE[:3], "--model", "{lm}", "--data", "{nonutf8_txt}",
         *TUNE[7:]),
    case("tune", "lm-sherl-late-layers", *TUNE[:2], "sherl", "--model", "{lm}", "--data",
         "{lm_txt}", *TUNE[7:], "--late-layers", "99"),
    case("tune", "lm-max-length-over-limit", *TUNE[:3], "--model", "{lm}", "--data",
         "{lm_txt}", *TUNE[7:], "--max-length", "4096"),
    case("tune", "lm-without-tokenizer", *TUNE[:3], "--model", "{gpt2}", "--data", "{lm_txt}",
         *TUNE[7:]),
    case("tune", "nonutf8-jsonl", *TUNE[:5], "--data", "{nonutf8_jsonl}", *TUNE[7:]),
    case("tune", "bool-label", *TUNE[:5], "--data", "{bool_label}", *TUNE[7:]),
    case("tune", "config-wrong-type", *TUNE, "--config", "{cfg_wrong_type}"),
    case("tune", "config-bad-yaml", *TUNE, "--config", "{cfg_bad_yaml}"),
    case("tune", "out-is-model", *TUNE, "--out", "{base}", "--overwrite"),
    # -- grow ----------------------------------------------------------------------------
    case("grow", "missing-model", "grow", "--model", "{root}/nowhere", "--hidden-size", "48"),
    case("grow", "model-empty-folder", "grow", "--model", "{empty_dir}", "--hidden-size",
         "48"),
    case("grow", "model-without-weights", "grow", "--model", "{noweights}", "--hidden-size",
         "48"),
    case("grow", "model-random-bin", "grow", "--model", "{bin_random}", "--hidden-size", "48"),
    case("grow", "model-truncated-bin", "grow", "--model", "{bin_trunc}", "--hidden-size",
         "48"),
    case("grow", "model-bin-with-object", "grow", "--model", "{bin_object}", "--hidden-size",
         "48"),
    case("grow", "model-truncated-safetensors", "grow", "--model", "{st_trunc}",
         "--hidden-size", "48"),
    case("grow", "model-garbage-safetensors", "grow", "--model", "{st_garbage}",
         "--hidden-size", "48"),
    case("grow", "model-symlink-loop", "grow", "--model", "{loop}", "--hidden-size", "48"),
    case("grow", "model-dangling-symlink", "grow", "--model", "{dangling}", "--hidden-size",
         "48"),
    case("grow", "model-without-config", "grow", "--model", "{no_config}", "--hidden-size",
         "48"),
    case("grow", "model-unknown-type", "grow", "--model", "{config_unknown_type}",
         "--hidden-size", "48"),
    case("grow", "model-wrong-tensor-names", "grow", "--model", "{st_wrong_names}",
         "--hidden-size", "48"),
    case("grow", "model-config-not-json", "grow", "--model", "{config_notjson}",
         "--hidden-size", "48"),
    case("grow", "model-auto-map", "grow", "--model", "{auto_map}", "--hidden-size", "48"),
    case("grow", "narrower", *GROW[:3], "--hidden-size", "16"),
    case("grow", "hidden-not-heads-multiple", *GROW[:3], "--hidden-size", "50"),
    case("grow", "too-deep", *GROW, "--layers", "9"),
    case("grow", "nothing-to-grow", *GROW[:3], warning="the output is a copy of it"),
    case("grow", "unknown-method", *GROW, "--method", "magic"),
    case("grow", "existing-out", *GROW, "--out", "{existing}"),
    case("grow", "train-without-lr", *GROW, "--train", "{train}", "--steps", "2"),
    case("grow", "train-missing-data", *GROW, "--train", "{root}/nowhere.jsonl", "--steps",
         "2", "--scratch-lr", "1e-3", "--scratch-warmup", "1"),
    case("grow", "train-zero-steps", *GROW, "--train", "{train}", "--steps", "0",
         "--scratch-lr", "1e-3", "--scratch-warmup", "1"),
    case("grow", "resume-without-checkpoints", *GROW, "--train", "{train}", "--steps", "2",
         "--scratch-lr", "1e-3", "--scratch-warmup", "1", "--resume"),
    case("grow", "out-is-model", *GROW, "--out", "{gpt2}", "--overwrite"),
]


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and mtime (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


ARGPARSE_USAGE = re.compile(r"^(usage: | {2,})")


@pytest.mark.parametrize("c", CASES)
def test_bad_input_is_one_error_line(c, world, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative temp names, if any, land where we look
    paths = {**world, "out": str(tmp_path / "out")}
    args = [a.format(**paths) for a in c.args]
    if "--out" not in args:
        args += ["--out", paths["out"]]
    before_world = _tree(Path(world["root"]))
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err
    lines = [line for line in shown(captured.err) if line.strip()]
    if lines and lines[0].startswith("usage: "):  # argparse: its usage, then the one line
        lines = [line for line in lines if not ARGPARSE_USAGE.match(line)]
    if c.warning is not None:
        assert code == 0, captured.err
        assert len(lines) == 1 and lines[0].startswith(f"upcycle {c.verb}: warning: "), \
            captured.err
        assert c.warning in lines[0]
    else:
        assert code == 2, captured.err
        assert len(lines) == 1 and lines[0].startswith(f"upcycle {c.verb}: error: "), \
            captured.err
        assert os.listdir(tmp_path) == [], "something was written beside --out"
    assert _tree(Path(world["root"])) == before_world, "an input changed"


def _safetensors_shards_to_bin(folder):
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    names = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(folder / shard), folder / name)
        (folder / shard).unlink()
        names[shard] = name
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_model_folders_still_grow(safe, tmp_path):
    """The weights check before transformers loads a model accepts sharded folders
    (safetensors with its index, and .bin shards with pytorch_model.bin.index.json)."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    if not safe:  # transformers 5 writes safetensors only: .bin shards as 4.x wrote them
        _safetensors_shards_to_bin(tmp_path / "src")
    names = os.listdir(tmp_path / "src")
    assert ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json") in names
    assert main(["grow", "--model", str(tmp_path / "src"), "--hidden-size", "48",
                 "--out", str(tmp_path / "big")]) == 0
