"""mergekit interop: ``upcycle soup --config mergekit.yml`` reads mergekit's configs for the
merges upcycle has (same soup as the flags), refuses what it cannot do with one line naming
the key; the soups that are per-tensor linear combinations write a ``mergekit_config.yml``
whose combination (evaluated by the reader here, mergekit's filter rule) is the written soup.
A cross-check against mergekit itself runs only where mergekit is importable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from lm_models import CORPUS, save_lm, tiny_lm, tiny_tokenizer, write_lines
from safetensors.torch import load_file

from upcycle.cli.main import main
from upcycle.jobs.soup import SoupConfig, run_soup
from upcycle.soup.mergekit import yaml_weight


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny tied GPT-2 base and three fine-tunes of it (HF folders with a tokenizer)."""
    root = tmp_path_factory.mktemp("mk")
    tok = tiny_tokenizer()
    base = tiny_lm("gpt2", vocab_size=300)
    folders = [save_lm(base, root / "base", tok)]
    for i in range(3):
        m = tiny_lm("gpt2", vocab_size=300)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        folders.append(save_lm(m, root / f"ft{i}", tok))
    held = write_lines(root / "held.txt", CORPUS[:6])
    return root, folders[0], folders[1:], held


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _yaml_combination(config: dict, tensor: str, read) -> torch.Tensor:
    """The tensor mergekit's linear / task_arithmetic computes from ``config`` (fp64)."""
    method = config["merge_method"]
    params = config.get("parameters", {})
    models = config["models"]
    weights = [yaml_weight(m["parameters"]["weight"], tensor) for m in models]
    tensors = [read(m["model"], tensor) for m in models]
    if method == "linear":
        acc = sum(w * t for w, t in zip(weights, tensors))
        return acc / sum(weights) if params.get("normalize", True) else acc
    assert method == "task_arithmetic"
    base = read(config["base_model"], tensor)
    merged = sum(w * (t - base) for w, t in zip(weights, tensors))
    if params.get("normalize", False):
        merged = merged / sum(weights)
    return base + params.get("lambda", 1.0) * merged


def _check_yaml_reproduces(out):
    cache: dict = {}
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    soup = _weights(out)

    def read(ref, name):
        path = ref.split("+")[0]
        if path not in cache:
            cache[path] = _weights(Path(path))
        state = cache[path]
        t = state.get(name, state.get("transformer.wte.weight") if name == "lm_head.weight"
                      else None)
        return t.double()

    assert soup
    for name, tensor in soup.items():
        if not tensor.is_floating_point():
            continue
        expected = _yaml_combination(config, name, read)
        torch.testing.assert_close(tensor.double(), expected.to(tensor.dtype).double(),
                                   rtol=0, atol=2e-6, msg=name)
    return config


@pytest.mark.parametrize("method,settings", [
    ("uniform", {}), ("linear", {"weights": [1.0, 2.0, 0.5]}),
    ("task-arithmetic", {"weights": [0.5, 0.3, 0.2], "lambda_": 1.5})])
def test_written_yaml_reproduces_the_fixed_soups(family, method, settings, tmp_path):
    root, base, fts, _ = family
    out = tmp_path / "soup"
    run_soup(SoupConfig([str(f) for f in fts], method=method, out=out, device="cpu",
                        base=str(base) if method == "task-arithmetic" else None,
                        method_settings=settings, progress=False))
    config = _check_yaml_reproduces(out)
    assert config["merge_method"] == ("task_arithmetic" if method == "task-arithmetic"
                                      else "linear")


@pytest.mark.parametrize("method", ["learned+", "mehl+"])
def test_written_yaml_reproduces_blockwise_fitted_soups(family, method, tmp_path):
    root, _, fts, held = family
    out = tmp_path / "soup"
    settings = {"epochs": 1, "lr": 0.05} if method == "learned+" else {
        "model_batch": 2, "epochs": 1, "rounds": 1}
    run_soup(SoupConfig([str(f) for f in fts], method=method, out=out, device="cpu",
                        held_out=str(held), batch_size=4, method_settings=settings,
                        progress=False))
    config = _check_yaml_reproduces(out)
    weight = config["models"][0]["parameters"]["weight"]
    assert isinstance(weight, list) and len(weight) > 5  # one filter per block
    # longest names first: no filter is a substring of one written before it
    filters = [w["filter"] for w in weight if "filter" in w]
    assert all(not any(f in g for g in filters[:i]) for i, f in enumerate(filters))


def _run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_reading_a_mergekit_yaml_gives_the_flags_soup(family, tmp_path, capsys):
    root, base, fts, _ = family
    cfg = tmp_path / "mergekit.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(base)},
                   *[{"model": str(f), "parameters": {"weight": w, "density": 0.5}}
                     for f, w in zip(fts, [1.0, 0.5, 0.25])]],
        "parameters": {"lambda": 0.8}, "dtype": "float32", "tokenizer_source": "base"}))
    code, _ = _run_cli(["soup", "--config", str(cfg), "--out", str(tmp_path / "a"),
                        "--quiet"], capsys)
    assert code == 0
    code, _ = _run_cli(["soup", *map(str, fts), "--method", "ties", "--base", str(base),
                        "--weights", "1", "0.5", "0.25", "--density", "0.5", "--lambda", "0.8",
                        "--normalize", "--dtype", "float32", "--out", str(tmp_path / "b"),
                        "--quiet"], capsys)
    assert code == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mergekit_defaults_normalize_per_method(tmp_path, family):
    from upcycle.soup.mergekit import read_mergekit
    _, base, fts, _ = family
    raw = {"merge_method": "dare_ties", "base_model": str(base),
           "models": [{"model": str(f)} for f in fts], "parameters": {"density": 0.3}}
    flags = read_mergekit(raw, tmp_path / "x.yml")
    assert flags["method"] == "dare-ties" and flags["normalize"] is False
    assert flags["rescale"] == "l1" and flags["density"] == 0.3
    raw = {"merge_method": "slerp", "base_model": str(fts[0]),
           "models": [{"model": str(fts[1])}, {"model": str(fts[0])}], "parameters": {"t": 0.3}}
    flags = read_mergekit(raw, tmp_path / "x.yml")
    assert flags["ingredients"] == [str(fts[0]), str(fts[1])] and flags["t"] == 0.3
    lora = read_mergekit({"merge_method": "linear", "models": [
        {"model": f"{base}+{tmp_path}/adapter"}]}, tmp_path / "x.yml")
    assert lora["base"] == str(base) and lora["ingredients"] == [f"{tmp_path}/adapter"]


@pytest.mark.parametrize("raw,key", [
    ({"merge_method": "passthrough", "slices": [{"sources": []}]}, "slices"),
    ({"merge_method": "nuslerp", "models": [{"model": "a"}]}, "nuslerp"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {
        "weight": [{"filter": "mlp", "value": 1}]}}]}, "models[0].parameters.weight"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"t": 0.5}},
     "parameters.t"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union"},
     "tokenizer_source"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": "x"},
     "chat_template"),
    ({"merge_method": "ties", "models": [{"model": "a"}]}, "base_model"),
])
def test_unsupported_mergekit_keys_are_one_error_naming_them(raw, key, tmp_path, capsys):
    cfg = tmp_path / "mergekit.yml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["soup", "--config", str(cfg), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("upcycle soup: error:") and key in err[-1], err
    assert not out.exists()


def _mergekit_merge(config: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False,
                                   lora_merge_cache=str(out.parent / "lora_cache")))
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None,
                    reason="mergekit is not installed beside upcycle")
@pytest.mark.parametrize("merge_method,parameters", [
    ("linear", {}), ("task_arithmetic", {"lambda": 0.7}), ("ties", {"lambda": 1.0}),
    ("slerp", {"t": 0.3}), ("written-linear", {}), ("written-learned+", {})])
def test_against_mergekit_itself(family, merge_method, parameters, tmp_path, capsys):
    """The same YAML through mergekit and through upcycle (``--config``), or the YAML
    upcycle wrote beside its soup through mergekit: the same tensors (mergekit computes in
    fp32, so to fp32 rounding)."""
    root, base, fts, held = family
    ours = tmp_path / "ours"
    if merge_method.startswith("written"):
        method = merge_method.split("-", 1)[1]
        run_soup(SoupConfig([str(f) for f in fts], method=method, out=ours, device="cpu",
                            held_out=str(held), batch_size=4, progress=False,
                            method_settings={"weights": [1.0, 2.0, 3.0]} if method == "linear"
                            else {"epochs": 1, "lr": 0.05}))
        config = yaml.safe_load((ours / "mergekit_config.yml").read_text())
    else:
        models = fts[:1] if merge_method == "slerp" else fts
        config = {"merge_method": merge_method, "base_model": str(base), "dtype": "float32",
                  "models": [{"model": str(f), "parameters": {"weight": w}}
                             for f, w in zip(models, [0.5, 0.3, 0.2])],
                  "parameters": parameters}
        if merge_method == "slerp":
            config["models"] = [{"model": str(base)}, {"model": str(fts[0])}]
        if merge_method == "linear":
            del config["base_model"]
        cfg = tmp_path / "mergekit.yml"
        cfg.write_text(yaml.safe_dump(config))
        assert main(["soup", "--config", str(cfg), "--out", str(ours), "--quiet"]) == 0
    theirs = _mergekit_merge(config, tmp_path / "mk")
    mine = _weights(ours)
    assert set(theirs) <= set(mine) | {"lm_head.weight"}
    for name, tensor in theirs.items():
        expected = mine.get(name, mine.get("transformer.wte.weight"))
        torch.testing.assert_close(tensor.double(), expected.double(), rtol=1e-5, atol=1e-6,
                                   msg=name)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny tied Llama base and three peft LoRA adapters of it: two on projections, one with
    a LoRA on the tied embedding trained with ``ensure_weight_tying``."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("mk_lora")
    base_model = tiny_lm("llama", tie=True)
    base = save_lm(base_model, root / "base", tiny_tokenizer())
    folders = []
    for i, extra in enumerate(([], [], ["embed_tokens"])):
        torch.manual_seed(i)
        m = type(base_model)(base_model.config)
        m.load_state_dict(base_model.state_dict())
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                            target_modules=["q_proj", "v_proj", "down_proj", *extra],
                            ensure_weight_tying=bool(extra))
        get_peft_model(m, config).save_pretrained(root / f"ad{i}")
        folders.append(root / f"ad{i}")
    return base, folders


def test_yaml_of_adapters_says_how_to_run_it_and_where_mergekit_differs(adapters, tmp_path):
    base, ads = adapters
    out = tmp_path / "soup"
    run_soup(SoupConfig([str(a) for a in ads], method="uniform", out=out, device="cpu",
                        base=str(base), progress=False))
    text = (out / "mergekit_config.yml").read_text()
    config = yaml.safe_load(text)
    assert [m["model"] for m in config["models"]] == [f"{base}+{a}" for a in ads]
    assert "--lora-merge-cache" in text
    notes = [line for line in text.splitlines() if line.startswith("# note:")]
    assert len(notes) == 1 and str(ads[2]) in notes[0] and "embed_tokens" in notes[0]


@pytest.mark.skipif(importlib.util.find_spec("mergekit") is None,
                    reason="mergekit is not installed beside upcycle")
@pytest.mark.parametrize("method,settings", [
    ("uniform", {}), ("linear", {"weights": [1.0, 3.0]}), ("task-arithmetic", {"lambda_": 0.7})])
def test_yaml_of_adapters_runs_in_mergekit(adapters, method, settings, tmp_path):
    """``base+adapter`` models in the YAML written beside a soup of LoRA adapters: mergekit
    merges each with peft and reproduces the soup (to fp32 rounding)."""
    base, ads = adapters
    out = tmp_path / "soup"
    run_soup(SoupConfig([str(a) for a in ads[:2]], method=method, out=out, device="cpu",
                        base=str(base), method_settings=settings, progress=False))
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    theirs = _mergekit_merge(config, tmp_path / "mk")
    mine = _weights(out)
    assert set(theirs) == set(mine)
    for name, tensor in theirs.items():
        torch.testing.assert_close(tensor.double(), mine[name].double(), rtol=1e-5, atol=1e-6,
                                   msg=name)
