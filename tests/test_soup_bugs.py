"""Soup bugs an LLM merger hits (#21): evaluation batch size, sharded .bin checkpoints,
mixed-dtype ingredients under --dtype and the config's dtype, the whole run's peak memory,
paths checked before any ingredient is opened, the best ingredient named."""

from __future__ import annotations

import json

import pytest
import torch
from lm_models import CORPUS, save_lm, tiny_lm, tiny_tokenizer, write_lines
from safetensors.torch import load_file, save_file

from upcycle.cli.main import main
from upcycle.io.ingredients import open_ingredients
from upcycle.jobs.soup import SoupConfig, run_soup


def _state(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g).to(dtype),
            "b.weight": torch.randn(5, generator=g).to(dtype),
            "steps": torch.tensor([seed])}


def _sharded_bin(folder, state):
    """A HF folder of .bin shards with pytorch_model.bin.index.json (as save_pretrained with
    safe_serialization=False writes it)."""
    folder.mkdir()
    weight_map = {}
    for i, names in enumerate((["a.weight"], ["b.weight", "steps"])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in names}, folder / shard)
        weight_map.update({n: shard for n in names})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return folder


def test_a_sharded_bin_folder_is_one_ingredient(tmp_path):
    states = [_state(0), _state(1)]
    parent = tmp_path / "runs"
    parent.mkdir()
    folders = [_sharded_bin(parent / f"run{i}", s) for i, s in enumerate(states)]
    ings = open_ingredients([parent])  # a folder of two sharded-.bin folders: 2 ingredients
    assert [i.path for i in ings] == folders
    for ing, state in zip(ings, states):
        assert all(torch.equal(ing.get(k), v) for k, v in state.items())
    run = run_soup(SoupConfig([str(parent)], device="cpu", progress=False))
    mean = (states[0]["a.weight"].double() + states[1]["a.weight"].double()) / 2
    assert torch.equal(run.soup.state["a.weight"], mean.float())


def test_fp32_and_bf16_ingredients_need_dtype_and_then_mix(tmp_path, capsys):
    save_file(_state(0), tmp_path / "a.safetensors")
    save_file(_state(1, torch.bfloat16), tmp_path / "b.safetensors")
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert main(["soup", *paths, "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has dtype torch.bfloat16" in err and "pass --dtype" in err
    assert main(["soup", *paths, "--out", str(tmp_path / "x.safetensors"), "--quiet",
                 "--dtype", "float32"]) == 0
    soup = load_file(tmp_path / "x.safetensors")
    want = (_state(0)["a.weight"].double() + _state(1, torch.bfloat16)["a.weight"].double()) / 2
    assert soup["a.weight"].dtype == torch.float32
    assert torch.equal(soup["a.weight"], want.float())


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """Two tiny Llama fine-tunes (HF folders with a tokenizer), held-out and test text."""
    root = tmp_path_factory.mktemp("lm")
    tokenizer = tiny_tokenizer()
    folders = []
    for i in range(2):
        folders.append(save_lm(tiny_lm("llama", tie=False, seed=i), root / f"ft{i}", tokenizer))
    write_lines(root / "held.txt", CORPUS[:6])
    write_lines(root / "test.txt", CORPUS[6:9])
    return root, folders


def test_eval_batch_size_defaults_to_batch_size_and_the_report_names_the_best(lm, tmp_path):
    root, folders = lm
    common = dict(held_out=root / "held.txt", test=root / "test.txt", max_length=16,
                  device="cpu", progress=False)
    run = run_soup(SoupConfig([str(f) for f in folders], batch_size=2, **common))
    assert run.job.eval_batch_size == 2
    assert all(len(b["input_ids"]) <= 2 for b in run.job.batches("held_out"))
    best = run.rows[0]
    assert best["method"] in ("best ingredient (1: ft0)", "best ingredient (2: ft1)")
    run = run_soup(SoupConfig([str(f) for f in folders], batch_size=2, eval_batch_size=3,
                              **common))
    assert run.job.eval_batch_size == 3


def test_dtype_is_written_into_the_config_and_the_peak_is_the_whole_runs(lm, tmp_path):
    from transformers import AutoConfig

    root, folders = lm
    out = tmp_path / "soup"
    run = run_soup(SoupConfig([str(f) for f in folders], out=out, method="linear",
                              dtype="bfloat16", held_out=root / "held.txt", max_length=16,
                              device="cpu", progress=False))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in load_file(out / "model.safetensors").values()
               if v.is_floating_point())
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][-1]["peak_rss_mb"] == pytest.approx(run.rows[-1]["peak_rss_mb"])


def test_a_mistyped_path_is_reported_before_any_ingredient_is_opened(tmp_path, capsys):
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")  # opening it fails
    code = main(["soup", str(tmp_path / "broken.safetensors"), "--held-out",
                 str(tmp_path / "held_outt.txt"), "--out", str(tmp_path / "soup"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"upcycle soup: error: --held-out {tmp_path / 'held_outt.txt'}:"
                                 f" no such file or folder")


def test_an_lm_soup_card_is_an_lm_card(lm, tmp_path):
    root, folders = lm
    out = tmp_path / "soup"
    run_soup(SoupConfig([str(f) for f in folders[1:]], out=out, method="task-arithmetic",
                        base=str(folders[0]), method_settings={"lambda_": 0.5},
                        held_out=root / "held.txt", test=root / "test.txt", max_length=16,
                        device="cpu", progress=False))
    card = (out / "README.md").read_text()
    meta = card.split("---")[1]
    assert "pipeline_tag: text-generation" in meta and "base_model_relation: merge" in meta
    assert f'- "{folders[0]}"' in meta  # base_model: the --base
    assert "held-out ppl" in card and "test ppl" in card and "held-out acc" not in card
    assert "AutoModelForCausalLM.from_pretrained" in card
    assert "lambda = 0.5" in card and "# Task arithmetic of 1 fine-tune\n" in card
    assert f"| 1 | {folders[0]} (base) |" in card
