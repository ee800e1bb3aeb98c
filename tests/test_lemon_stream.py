"""Streamed LEMON (upcycle.grow.expand_folder, ``upcycle grow``'s default): the same tensors
as the in-memory expand for every family, sharded safetensors that load, the piecewise check
catches a wrong tensor, bad input refused before a shard is written, the shard writer, and the
scale benchmark's quick mode."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from safetensors import safe_open
from test_architectures import MAIN, build

from upcycle.cli.main import main
from upcycle.errors import UpcycleError
from upcycle.grow import expand, expand_folder
from upcycle.io import shards as shards_module
from upcycle.io.shards import ShardWriter, TensorEntry

T = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

# (family, dims): width and depth at once; an indivisible width where the family allows it
GROWTHS = {
    "bert": {"hidden_size": 64, "num_layers": 4},
    "roberta": {"hidden_size": 64, "num_layers": 3},
    "distilbert": {"hidden_size": 64, "num_layers": 4},
    "vit": {"hidden_size": 48, "num_layers": 3},
    "gpt2": {"hidden_size": 48, "num_layers": 4},
    "llama": {"hidden_size": 48, "num_layers": 3},
    "mistral": {"hidden_size": 64, "num_layers": 4},
    "qwen2": {"hidden_size": 48, "num_layers": 3},
    "phi3": {"hidden_size": 64, "num_layers": 3},
    "gpt_neox": {"hidden_size": 64, "num_layers": 4},
}


def _saved(family: str, folder: Path, cls_name: str | None = None) -> Path:
    model = build(cls_name or MAIN[family], family, dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def _same_tensors(reference: torch.nn.Module, folder: Path) -> None:
    grown = type(reference).from_pretrained(folder).eval()
    a, b = reference.state_dict(), grown.state_dict()
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("family", list(GROWTHS))
def test_streamed_equals_in_memory(family, tmp_path):
    src = _saved(family, tmp_path / "src")
    source = getattr(T, MAIN[family]).from_pretrained(src).eval()
    reference = expand(source, seed=5, **GROWTHS[family])
    result = expand_folder(src, tmp_path / "out", seed=5, **GROWTHS[family])
    _same_tensors(reference, tmp_path / "out")
    assert result.difference["max_rel"] <= 1e-5 and result.difference["argmax_equal"]
    assert result.parameters[1] == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("method", ["net2net", "aki"])
def test_streamed_baselines_equal_in_memory(method, tmp_path):
    src = _saved("bert", tmp_path / "src")
    source = T.BertForSequenceClassification.from_pretrained(src).eval()
    reference = expand(source, hidden_size=64, num_layers=3, method=method)
    expand_folder(src, tmp_path / "out", hidden_size=64, num_layers=3, method=method)
    _same_tensors(reference, tmp_path / "out")


def test_bf16_source_written_in_its_dtype_and_sharded(tmp_path):
    model = build("LlamaForCausalLM", "llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    reference = expand(T.LlamaForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
                       .eval(), hidden_size=64, num_layers=4)
    out = tmp_path / "out"
    expand_folder(tmp_path / "src", out, hidden_size=64, num_layers=4, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    with safe_open(str(out / sorted(files)[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    _same_tensors(reference, out)


def test_cli_streams_by_default_and_in_memory_on_request(tmp_path, capsys):
    src = _saved("gpt2", tmp_path / "src")
    assert main(["grow", "--model", str(src), "--hidden-size", "64", "--layers", "3",
                 "--out", str(tmp_path / "s"), "--max-shard-size", "50KB"]) == 0
    printed = capsys.readouterr().out
    assert "(streamed)" in printed and "argmax identical" in printed
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    report = json.loads((tmp_path / "s" / "growth.json").read_text())
    assert report["streamed"] and report["max_rel_difference"] <= 1e-5
    assert main(["grow", "--model", str(src), "--hidden-size", "64", "--layers", "3",
                 "--out", str(tmp_path / "m"), "--in-memory"]) == 0
    assert "(streamed)" not in capsys.readouterr().out
    a = T.GPT2LMHeadModel.from_pretrained(tmp_path / "s").state_dict()
    b = T.GPT2LMHeadModel.from_pretrained(tmp_path / "m").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("upcycle grow:")]
    assert len(err) == 1, err
    return err[0]


def test_the_check_catches_a_corrupted_tensor(tmp_path, capsys, monkeypatch):
    src = _saved("llama", tmp_path / "src")
    real = ShardWriter.write

    def corrupt(self, name, tensor):
        if name == "model.layers.1.mlp.down_proj.weight":
            tensor = tensor.clone()
            tensor[0, 0] += 0.5
        real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", corrupt)
    out = tmp_path / "out"
    assert main(["grow", "--model", str(src), "--hidden-size", "64", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "differs from --model" in line and "nothing written" in line
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.fixture
def no_shard_written(monkeypatch):
    """Fails the test if a shard file is created."""
    def refuse(self, index):
        raise AssertionError(f"shard {self.files[index]} written")

    monkeypatch.setattr(ShardWriter, "_fd", refuse)


def test_legacy_pickle_source_is_refused_with_advice(tmp_path, capsys, no_shard_written):
    model = build("GPT2LMHeadModel", "gpt2", dtype=torch.float32)
    src = tmp_path / "src"
    model.config.architectures = ["GPT2LMHeadModel"]
    model.config.save_pretrained(src)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    out = tmp_path / "out"
    assert main(["grow", "--model", str(src), "--hidden-size", "64", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "legacy (non-zip) PyTorch pickle" in line and "pytorch_model.bin" in line
    assert "save_pretrained" in line and "--in-memory" in line
    assert not out.exists()


def test_no_room_on_disk_is_refused_before_writing(tmp_path, capsys, monkeypatch,
                                                   no_shard_written):
    src = _saved("llama", tmp_path / "src")
    real = shutil.disk_usage

    def full(path):
        usage = real(path)
        return usage._replace(free=10_000)

    monkeypatch.setattr(shutil, "disk_usage", full)
    out = tmp_path / "out"
    assert main(["grow", "--model", str(src), "--hidden-size", "64", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith("upcycle grow: error: --out") and "GB free" in line
    assert "nothing was written" in line
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("dims, expected", [
    ({"layers": 5}, "more than twice"),
    ({"hidden-size": 44}, "not a multiple of head_dim"),
])
def test_a_target_lemon_cannot_grow_is_refused_before_any_shard(dims, expected, tmp_path,
                                                                capsys, no_shard_written):
    src = _saved("llama", tmp_path / "src")
    flags = [x for k, v in dims.items() for x in (f"--{k}", str(v))]
    out = tmp_path / "out"
    assert main(["grow", "--model", str(src), *flags, "--out", str(out)]) == 2
    assert expected in _error_line(capsys)
    assert not out.exists()


def test_an_unknown_layer_tensor_is_refused_before_any_shard(tmp_path, monkeypatch,
                                                           no_shard_written):
    import upcycle.grow.stream as stream

    src = _saved("llama", tmp_path / "src")
    real = stream._Source.__init__

    def with_extra(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.shapes["model.layers.1.self_attn.q_norm.weight"] = (8,)

    monkeypatch.setattr(stream._Source, "__init__", with_extra)
    with pytest.raises(UpcycleError, match="q_norm.weight' in a Llama layer is not one LEMON"):
        expand_folder(src, tmp_path / "out", hidden_size=64)
    assert not (tmp_path / "out").exists()


def test_shard_writer_any_order_and_index(tmp_path):
    tensors = {f"t{i}": torch.randn(10 * (i + 1)).to(dt)
               for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16,
                                       torch.int64, torch.float64])}
    tensors["empty"] = torch.zeros(0, 3)
    entries = [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with ShardWriter(tmp_path, entries, max_shard_bytes=200) as writer:
        for name in reversed(list(tensors)):
            writer.write(name, tensors[name])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), "pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])
    with pytest.raises(UpcycleError, match="never written"):
        with ShardWriter(tmp_path / "x", entries[:2]) as writer:
            (tmp_path / "x").mkdir()
            writer.write("t0", tensors["t0"])
    assert shards_module.SAFETENSORS_SINGLE == "model.safetensors"


def test_scale_benchmark_quick(tmp_path, monkeypatch):
    bench = load_benchmark("scale", monkeypatch)

    def in_process(script, spec):  # the harness runs each contender in a fresh process
        return {"spec": spec, **bench.WORKERS[spec["section"]](spec)}

    monkeypatch.setattr(bench, "run_contender", in_process)
    args = argparse.Namespace(size="quick", section="lemon", memory_budget=10.0,
                              workdir=str(tmp_path), out=str(tmp_path / "r.json"))
    results = bench.run(args)
    rows = results["sections"]["lemon"]["rows"]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert all(r["max_rel"] <= 1e-5 for r in rows)
    assert results["n_grown"] >= 1.5 * results["n_source"]
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]  # the models were removed
    # an in-memory contender over the budget is not started; its prediction is reported
    args.memory_budget, args.out = 1e-6, None
    rows = bench.run(args)["sections"]["lemon"]["rows"]
    assert rows[1]["status"].startswith("not run") and rows[1]["predicted_gb"] > 0


def test_zip_bin_source_streams_and_nan_is_named(tmp_path, capsys):
    model = build("LlamaForCausalLM", "llama", dtype=torch.float32)
    src = tmp_path / "src"
    model.config.architectures = ["LlamaForCausalLM"]  # as save_pretrained writes it
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")  # zip format: read per tensor
    reference = expand(model, hidden_size=64)
    expand_folder(src, tmp_path / "out", hidden_size=64)
    _same_tensors(reference, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["dtype"] == "float32"

    state = model.state_dict()
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(state, src / "pytorch_model.bin")
    out = tmp_path / "nan"
    assert main(["grow", "--model", str(src), "--hidden-size", "64", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "'model.layers.1.mlp.up_proj.weight' contains NaN" in line
    assert not out.exists()


def test_scale_benchmark_mehl_section_quick(tmp_path, monkeypatch):
    """The MEHL section on the tiny model: synthetic ingredients are the source plus a
    rank-1 update per matrix, and one out-of-core round runs; contenders over the budget are
    not started (their prediction is reported)."""
    bench = load_benchmark("scale", monkeypatch)
    monkeypatch.setattr(bench, "MEHL_N", 3)
    ran = []

    def in_process(script, spec):
        ran.append(spec["name"])
        return {"spec": spec, **bench.WORKERS[spec["section"]](spec)}

    monkeypatch.setattr(bench, "run_contender", in_process)
    # only the out-of-core contenders' predictions (1 GB + 6 bytes a parameter) fit
    monkeypatch.setattr(bench, "mehl_need", lambda n, method, k, big_n, largest=0:
                        (1.0 if method == "out-of-core" else 99.0) * bench.GB)
    args = argparse.Namespace(size="quick", section="mehl", memory_budget=10.0,
                              workdir=str(tmp_path), out=None)
    rows = bench.run(args)["sections"]["mehl"]["rows"]
    assert ran == ["MEHL+ out-of-core, K = 2", "MEHL+ out-of-core, K = 3"]
    assert [r["status"] for r in rows[:2]] == ["done", "done"]
    assert all(r["status"].startswith("not run") for r in rows[2:])
    assert rows[0]["live_gb"] > 0 and rows[0]["epoch_s"] > 0
    assert list(tmp_path.iterdir()) == []  # ingredients and source removed
