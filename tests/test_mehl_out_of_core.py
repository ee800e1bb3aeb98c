"""Out-of-core MEHL (--directions out-of-core): no direction kept, the same soup as the
resident path, memory independent of K, and its bad inputs."""


import pytest
import torch
from safetensors.torch import save_file
from test_soup import Net, loss_fn, make_data, memory_probe, write_ingredients

from upcycle import UpcycleError
from upcycle.io import open_ingredients
from upcycle.soup import MehlConfig, mehl_offload, mehl_soup
from upcycle.soup.mehl_offload import SliceReader
from upcycle.soup.resume import StoredState, load_checkpoint


def _data64():
    return [{k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
            for batch in make_data()]


def _fit(ings, directions, tmp_path=None, **settings):
    config = MehlConfig(model_batch=2, epochs=3, lr=0.05, directions=directions, **settings)
    return mehl_soup(ings, Net().double(), _data64(), loss_fn=loss_fn, config=config,
                     checkpoint_dir=tmp_path)


@pytest.mark.parametrize("blockwise,piece", [(True, None), (False, None), (True, 7)])
def test_out_of_core_is_the_resident_soup(tmp_path, monkeypatch, blockwise, piece):
    """fp64 model, fp64 ingredients: the same soup and coefficients to 1e-6, and no direction
    is ever stored out of core; also when every tensor is read, combined, folded and
    written in pieces (of 7 elements here: how a vocabulary-sized one is handled)."""
    if piece is not None:
        monkeypatch.setattr(mehl_offload, "PIECE", piece)
    ings = write_ingredients(tmp_path, 4, dtype=torch.float64)
    rounds = []
    resident = _fit(ings, "resident", blockwise=blockwise)
    ooc = mehl_soup(ings, Net().double(), _data64(), loss_fn=loss_fn,
                    config=MehlConfig(model_batch=2, epochs=3, lr=0.05, blockwise=blockwise,
                                      directions="out-of-core"),
                    callback=rounds.append)
    assert resident.info["directions"] == "resident"
    assert ooc.info["directions"] == "out-of-core"
    assert [r["resident_directions"] for r in rounds] == [0, 0]
    assert [r["direction_rows"] for r in rounds] == [2, 2]
    assert torch.allclose(resident.coefficients, ooc.coefficients, atol=1e-6, rtol=0)
    # the fit moved the soup away from the uniform start, so the comparison means something
    assert (ooc.coefficients - 0.25).abs().max() > 1e-2
    for k, v in resident.state.items():
        assert torch.allclose(v, ooc.state[k], atol=1e-6, rtol=0), k


def test_auto_goes_out_of_core_when_the_directions_do_not_fit_and_leaves_no_files(
        tmp_path, monkeypatch):
    from upcycle.soup import mehl

    ings = write_ingredients(tmp_path / "ings", 3)
    ckpt = tmp_path / "ckpt"
    small = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn,
                      config=MehlConfig(model_batch=2, epochs=2, lr=0.05))
    assert small.info["directions"] == "resident"  # fits in memory: the fastest
    monkeypatch.setattr(mehl, "available_memory", lambda: 1000.0)
    soup = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn,
                     config=MehlConfig(model_batch=2, epochs=2, lr=0.05), checkpoint_dir=ckpt)
    assert soup.info["directions"] == "out-of-core"
    assert sorted(p.name for p in ckpt.iterdir()) == ["mehl-checkpoint.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ings"]  # scratch removed
    compact = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn,
                        config=MehlConfig(model_batch=2, epochs=2, compact_directions=True))
    assert compact.info["directions"] == "resident"  # compact asks for stored directions
    # on the CPU, directions over CPU_RESIDENT_UP_TO go out of core even when memory is ample
    monkeypatch.setattr(mehl, "available_memory", lambda: 1e15)
    monkeypatch.setattr(mehl, "CPU_RESIDENT_UP_TO", 1000)
    large = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn,
                      config=MehlConfig(model_batch=2, epochs=2, lr=0.05))
    assert large.info["directions"] == "out-of-core"


@pytest.mark.parametrize("first,then", [("resident", "out-of-core"),
                                        ("out-of-core", "resident")])
def test_a_run_resumes_the_other_way_round(tmp_path, first, then):
    """A run stopped after its first round resumes with the directions stored the other
    way: the same soup as one uninterrupted resident run (the anchor and the kept state come
    back from the checkpoint; out of core they are written to it one tensor at a time)."""
    ings = write_ingredients(tmp_path / "ings", 4, dtype=torch.float64)
    whole = _fit(ings, "resident", models_epochs=2)

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    config = MehlConfig(model_batch=2, epochs=3, lr=0.05, models_epochs=2, directions=first)
    with pytest.raises(Stop):
        mehl_soup(ings, Net().double(), _data64(), loss_fn=loss_fn, config=config,
                  checkpoint_dir=tmp_path / "ckpt", callback=stop)
    saved = load_checkpoint(tmp_path / "ckpt")
    assert saved.state["keep_best"]["kept"] != "start"  # the kept state is in the file too
    assert isinstance(saved.anchor, StoredState) and isinstance(saved.extra["best"], StoredState)
    resumed = mehl_soup(ings, Net().double(), _data64(), loss_fn=loss_fn,
                        config=MehlConfig(**{**config.__dict__, "directions": then}),
                        checkpoint_dir=tmp_path / "ckpt", resume=True)
    for k, v in whole.state.items():
        assert torch.allclose(v, resumed.state[k], atol=1e-6, rtol=0), k


@pytest.mark.parametrize("piece", [None, 5])
def test_bf16_ingredients_out_of_core(tmp_path, monkeypatch, piece):
    """bf16 checkpoints are read as they are and converted per slice (or per piece): the
    soup equals the resident (fp32 directions) one to fp32 rounding."""
    if piece is not None:
        monkeypatch.setattr(mehl_offload, "PIECE", piece)
    ings = write_ingredients(tmp_path, 4, dtype=torch.bfloat16)
    soups = [mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn, dtype=torch.float32,
                       config=MehlConfig(model_batch=2, epochs=2, lr=0.05, directions=d))
             for d in ("resident", "out-of-core")]
    for k in ("a.weight", "b.weight"):
        assert torch.allclose(soups[0].state[k], soups[1].state[k], atol=1e-5), k
    # a bf16 model (its weights rounded each step; the anchor and coefficients stay fp32)
    bf16 = [mehl_soup(ings, Net().to(torch.bfloat16), make_data(), loss_fn=loss_fn,
                      precision="bf16",
                      config=MehlConfig(model_batch=2, epochs=2, lr=0.05, directions=d))
            for d in ("resident", "out-of-core")]
    assert bf16[1].state["a.weight"].dtype == torch.bfloat16
    assert torch.allclose(bf16[0].coefficients, bf16[1].coefficients, atol=1e-3)
    for k in ("a.weight", "b.weight"):
        assert torch.allclose(bf16[0].state[k].float(), bf16[1].state[k].float(),
                              atol=1e-2), k


@pytest.mark.parametrize("kind", ["safetensors", "zip", "bf16"])
def test_the_reader_reads_ahead_and_any_order(tmp_path, kind):
    """Slices read straight into the reader's buffers (safetensors, zip .bin, bf16) equal
    the ingredients' tensors, in the planned order and outside it."""
    ings = write_ingredients(tmp_path, 3, dtype=torch.bfloat16 if kind == "bf16"
                             else torch.float32)
    if kind == "zip":
        for i, ing in enumerate(ings):
            torch.save(ing.state_dict(), tmp_path / f"zip{i}.bin")
        ings = open_ingredients([tmp_path / f"zip{i}.bin" for i in range(3)])
    assert ings[0].locate("a.weight") is not None
    reader = SliceReader(ings, [2, 0], range(2), torch.device("cpu"))
    reader.plan(["a.weight", "b.weight"])
    for name in ("a.weight", "b.weight", "a.bias", "a.weight"):  # a.bias: outside the plan
        for row, member in enumerate([2, 0]):
            t = reader.take(name, row)
            assert t.dtype == torch.float32 and t.ndim == 1
            assert torch.equal(t, ings[member].get(name).reshape(-1).float())
    reader.close()


def test_the_reader_reads_pieces(tmp_path, monkeypatch):
    """A tensor over PIECE elements comes in pieces that put together are the tensor."""
    monkeypatch.setattr(mehl_offload, "PIECE", 6)
    ings = write_ingredients(tmp_path, 2, dtype=torch.bfloat16)
    reader = SliceReader(ings, [1, 0], range(2), torch.device("cpu"), ["a.weight"])
    reader.plan(["a.weight"])
    numel = ings[0].get("a.weight").numel()
    parts = mehl_offload.pieces(numel)
    assert len(parts) > 2 and parts[-1][1] == numel
    for row, member in enumerate([1, 0]):
        got = torch.cat([reader.take("a.weight", row, p).clone() for p in range(len(parts))])
        assert torch.equal(got, ings[member].get("a.weight").reshape(-1).float())
    reader.close()


def test_bad_inputs(tmp_path):
    folder = tmp_path / "ings"
    folder.mkdir()
    torch.manual_seed(0)
    net = Net()
    for i in range(3):
        state = {k: v + 0.1 * torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point()
                 else v for k, v in net.state_dict().items()}
        if i == 1:  # a legacy (non-zip) pickle
            torch.save(state, folder / f"ing{i}.pt", _use_new_zipfile_serialization=False)
        else:
            save_file(state, str(folder / f"ing{i}.safetensors"))
    ings = open_ingredients(sorted(folder.iterdir()))
    with pytest.raises(UpcycleError, match=r"ing1\.pt is a legacy .* cannot be memory-mapped"
                                           r".*--directions resident"):
        _fit(ings, "out-of-core")
    with pytest.raises(UpcycleError, match="compact-directions stores the directions"):
        _fit(ings, "out-of-core", compact_directions=True)
    with pytest.raises(UpcycleError, match="directions must be one of"):
        _fit(ings, "disk")
    # auto keeps the directions resident when an ingredient is held whole anyway
    assert _fit(ings, "auto").info["directions"] == "resident"


def test_out_of_core_memory_does_not_grow_with_k(tmp_path):
    """Peak RSS above the start in fresh processes (glibc's mmap threshold fixed, see
    test_soup's N test): out of core, K = 2 and K = 8 of 8 ingredients of a 9 MB model peak
    within one model of each other; resident, K = 8 holds 6 more directions (proof that the
    measurement sees growth)."""
    measure, model_mb = memory_probe(tmp_path, 8)

    def extra(directions, k):
        return measure("mehl", 8, k, directions)

    resident_small, resident_large = extra("resident", 2), extra("resident", 8)
    ooc_small, ooc_large = extra("out-of-core", 2), extra("out-of-core", 8)
    assert resident_large - resident_small > 5 * model_mb
    assert abs(ooc_large - ooc_small) < model_mb
    assert ooc_large < resident_large - 5 * model_mb
