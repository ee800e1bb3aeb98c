"""Reading ingredients in every format, validating them, and writing atomically."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from upcycle import UpcycleError
from upcycle.io.ingredients import open_ingredients, validate_ingredients
from upcycle.io.writing import atomic_dir, save_model, write_safetensors_shards


def _state(seed=0, shape=(4, 3), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(shape, generator=g).to(dtype),
            "layer.bias": torch.randn(shape[0], generator=g).to(dtype),
            "steps": torch.tensor([seed], dtype=torch.int64)}


def test_every_format_reads_the_same_tensors(tmp_path):
    state = _state()
    save_file(state, str(tmp_path / "a.safetensors"))
    torch.save(state, tmp_path / "b.pt")
    torch.save(state, tmp_path / "c.bin")
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(state, str(hf / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = write_safetensors_shards(sharded, state, max_shard_bytes=40)
    assert len(names) > 1 and (sharded / "model.safetensors.index.json").is_file()
    ings = open_ingredients([tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.bin",
                             hf, sharded])
    for ing in ings:
        assert set(ing.keys()) == set(state)
        for k, v in state.items():
            assert torch.equal(ing.get(k), v), (ing, k)
    assert ings[3].hf_dir == hf


def test_folder_of_checkpoints_and_globs_in_sorted_order(tmp_path):
    for i in (2, 0, 1):
        save_file(_state(i), str(tmp_path / f"run{i}.safetensors"))
    by_folder = open_ingredients([tmp_path])
    by_glob = open_ingredients([str(tmp_path / "run*.safetensors")])
    assert [i.path.name for i in by_folder] == ["run0.safetensors", "run1.safetensors",
                                               "run2.safetensors"]
    assert [i.path for i in by_glob] == [i.path for i in by_folder]
    assert [i.index for i in by_folder] == [1, 2, 3]


def test_shape_mismatch_names_ingredient_path_and_tensor(tmp_path):
    save_file(_state(0), str(tmp_path / "a.safetensors"))
    save_file(_state(1, shape=(4, 5)), str(tmp_path / "b.safetensors"))
    ings = open_ingredients([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    with pytest.raises(UpcycleError) as err:
        validate_ingredients(ings)
    msg = str(err.value)
    assert "ingredient 2" in msg and "b.safetensors" in msg and "'layer.weight'" in msg
    assert "(4, 5)" in msg and "ingredient 1 has (4, 3)" in msg


def test_dtype_and_architecture_mismatch(tmp_path):
    save_file(_state(0), str(tmp_path / "a.safetensors"))
    save_file(_state(1, dtype=torch.bfloat16), str(tmp_path / "b.safetensors"))
    other = {"encoder.weight": torch.zeros(2)}
    save_file(other, str(tmp_path / "c.safetensors"))
    with pytest.raises(UpcycleError, match="dtype torch.bfloat16"):
        validate_ingredients(open_ingredients([tmp_path / "a.safetensors",
                                               tmp_path / "b.safetensors"]))
    with pytest.raises(UpcycleError, match="not the same architecture"):
        validate_ingredients(open_ingredients([tmp_path / "a.safetensors",
                                               tmp_path / "c.safetensors"]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(tmp_path, bad):
    save_file(_state(0), str(tmp_path / "a.safetensors"))
    broken = _state(1)
    broken["layer.bias"][2] = bad
    save_file(broken, str(tmp_path / "b.safetensors"))
    with pytest.raises(UpcycleError, match=r"ingredient 2 .*'layer.bias' contains (NaN|Inf)"):
        validate_ingredients(open_ingredients([tmp_path / "a.safetensors",
                                               tmp_path / "b.safetensors"]))


def test_truncated_and_foreign_files(tmp_path):
    save_file(_state(0), str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    (tmp_path / "text.safetensors").write_text("hello, not tensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01junk")
    for name in ("cut.safetensors", "text.safetensors", "junk.pt"):
        with pytest.raises(UpcycleError, match=name):
            open_ingredients([tmp_path / name])
    with pytest.raises(UpcycleError, match="no ingredients"):
        open_ingredients([])
    with pytest.raises(UpcycleError, match="matches no files"):
        open_ingredients([str(tmp_path / "nothing*.safetensors")])


def test_pickled_objects_are_not_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UpcycleError, match="evil.pt"):
        open_ingredients([tmp_path / "evil.pt"])


def test_save_model_refuses_existing_model_unless_overwrite(tmp_path):
    out = tmp_path / "soup"
    save_model(out, _state(0))
    with pytest.raises(UpcycleError, match="already holds a model"):
        save_model(out, _state(1))
    save_model(out, _state(1), overwrite=True)
    assert torch.equal(open_ingredients([out])[0].get("layer.weight"), _state(1)["layer.weight"])


def test_interrupted_write_leaves_no_partial_output(tmp_path, monkeypatch):
    import upcycle.io.writing as ck

    out = tmp_path / "soup"
    save_model(out, _state(0))
    before = sorted(p.name for p in tmp_path.iterdir())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(out, _state(1), overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "fresh", _state(1))
    # The old soup is intact, nothing new or temporary is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert torch.equal(open_ingredients([out])[0].get("layer.weight"), _state(0)["layer.weight"])


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "folder"
    with atomic_dir(out) as tmp:
        (tmp / "a.json").write_text(json.dumps(1))
    assert (out / "a.json").is_file()
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "b.json").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_pytorch_files_are_read_tensor_by_tensor_with_views_and_dtypes(tmp_path):
    import upcycle.io.checkpoints as ck

    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    state = {"w": base, "t": base.t(), "slice": base[1:3, 2:5], "half": torch.randn(3, 5).half(),
             "bf": torch.randn(7).bfloat16(), "empty": torch.zeros(0, 3),
             "ids": torch.arange(5), "scalar": torch.tensor(2.5)}
    torch.save(state, tmp_path / "zip.pt")
    ing = open_ingredients([tmp_path / "zip.pt"])[0]
    assert ing._torch_state is None  # nothing loaded or mapped at open
    for k, v in state.items():
        got = ing.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert not ck._legacy_reported


def test_legacy_pickles_are_reported_once(tmp_path, capsys):
    import upcycle.io.checkpoints as ck

    ck._legacy_reported.clear()
    for i in range(2):
        torch.save(_state(i), tmp_path / f"old{i}.bin", _use_new_zipfile_serialization=False)
    ings = open_ingredients([tmp_path / "old0.bin", tmp_path / "old1.bin"])
    for i, ing in enumerate(ings):
        for k, v in _state(i).items():
            assert torch.equal(ing.get(k), v)
    err = capsys.readouterr().err
    assert err.count("legacy (non-zip) PyTorch file") == 1
    assert "old0.bin" in err and "Convert it once" in err
    ck._legacy_reported.clear()


VALIDATE_SCRIPT = """
import json, sys
from upcycle.io import open_ingredients, validate_ingredients
from upcycle.runtime.memory import current_rss_mb
ings = open_ingredients([sys.argv[1]])
base = current_rss_mb()
validate_ingredients(ings)  # reads every tensor of every ingredient once
print(json.dumps({"kept_mb": current_rss_mb() - base}))
"""


def test_validating_pt_ingredients_keeps_nothing_resident(tmp_path):
    """8 zip-format .pt ingredients of 8 MiB: after validation (every tensor read once) the
    process holds less than one ingredient more than before (memory-mapped reading kept
    every touched page: +8 ingredients)."""
    import subprocess
    import sys

    folder = tmp_path / "pts"
    folder.mkdir()
    for i in range(8):
        torch.save({f"layer{j}.weight": torch.randn(128, 1024) for j in range(16)},
                   folder / f"ing{i}.pt")
    script = tmp_path / "validate.py"
    script.write_text(VALIDATE_SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True,
                         text=True, check=True, env=env)
    kept = json.loads(out.stdout.strip().splitlines()[-1])["kept_mb"]
    assert kept < 8, kept
