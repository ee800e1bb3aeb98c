"""MEHL with the K directions sharded across torchrun ranks (--shard-directions)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_decoded, shown
from conftest import torchrun as run_torchrun
from safetensors.torch import save_file
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.soup import MehlConfig, mehl_soup

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    import torch.nn.functional as F
    from upcycle.runtime import distributed
    from upcycle.io import open_ingredients
    from upcycle.errors import UpcycleError
    from upcycle.soup import MehlConfig, mehl_soup
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    folder, out, shard, clip = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    directions = sys.argv[5]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64); y = (x[:, 0] > 0).long()
    data = [{"x": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 40, 16)]
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["labels"])
    ings = open_ingredients([folder])
    rounds = []
    # N = 5, K = 4: the second round has one member, so with 2 ranks one holds no direction.
    soup = mehl_soup(ings, model, data, loss_fn=loss, callback=rounds.append,
                     config=MehlConfig(model_batch=4, epochs=2, lr=0.05, shard_directions=shard,
                                       grad_clip=0.5 if clip else None, directions=directions))
    error = None
    if shard:
        try:
            mehl_soup(ings, model, data, loss_fn=loss,
                      config=MehlConfig(model_batch=1, shard_directions=True))
        except UpcycleError as exc:
            error = str(exc)
    rank = distributed.rank()
    torch.save({"state": soup.state, "coefficients": soup.coefficients}, f"{out}.{rank}.pt")
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"rows": [r["direction_rows"] for r in rounds],
                   "resident": [r["resident_directions"] for r in rounds], "error": error}, f)
""")


def _ingredients(tmp_path, n=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    folder = tmp_path / "ings"
    folder.mkdir()
    for i in range(n):
        save_file({k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()},
                  str(folder / f"ing{i}.safetensors"))
    return folder


@pytest.mark.parametrize(("clip", "directions"), [(False, "resident"), (True, "resident"),
                                                   (False, "out-of-core")])
def test_sharded_directions_match_unsharded(tmp_path, clip, directions):
    """Two gloo ranks with K/W directions each give the unsharded soup (fp64, 1e-6), own
    K/W directions per round (0 or 1 in a one-member round; stored when resident, read from
    the files as needed out of core), and refuse K < W."""
    folder = _ingredients(tmp_path)
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flag = "1" if clip else "0"
    subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "one"), "0", flag,
                    directions], check=True, env=env)
    run_torchrun([script, folder, tmp_path / "two", "1", flag, directions])
    one = torch.load(tmp_path / "one.0.pt")
    for rank in (0, 1):
        two = torch.load(tmp_path / f"two.{rank}.pt")
        assert torch.allclose(one["coefficients"], two["coefficients"], atol=1e-6, rtol=0)
        for k, v in one["state"].items():
            assert v.dtype == torch.float64
            assert torch.allclose(v, two["state"][k], atol=1e-6, rtol=0), k
        # the soup really moved away from the first anchor, so the comparison means something
        assert (one["coefficients"] - one["coefficients"][0]).abs().max() > 1e-3
    info = [json.loads((tmp_path / f"two.{rank}.json").read_text()) for rank in (0, 1)]
    assert [i["rows"] for i in info] == [[2, 0], [2, 1]]
    single = json.loads((tmp_path / "one.0.json").read_text())
    assert single["rows"] == [4, 1]
    stored = directions == "resident"
    assert [i["resident"] for i in info] == ([[2, 0], [2, 1]] if stored else [[0, 0], [0, 0]])
    assert single["resident"] == ([4, 1] if stored else [0, 0])
    for i in info:
        assert "K) >= the number of processes (W = 2)" in i["error"]


def test_shard_directions_outside_torchrun_is_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(UpcycleError, match="torchrun"):
        mehl_soup([None, None], model, [{"x": torch.zeros(1, 2)}],
                  config=MehlConfig(model_batch=2, shard_directions=True))


def _cli(args, env=None, torchrun=False):
    if torchrun:
        return run_torchrun(["-m", "upcycle.cli.main", "soup", *args], env, check=False)
    return run_decoded([sys.executable, "-m", "upcycle.cli.main", "soup", *args],
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("case", ["single-process", "not-mehl"])
def test_cli_shard_directions_bad_input(tmp_path, case):
    folder = _ingredients(tmp_path, n=2)
    out = tmp_path / "soup"
    method = "mehl+" if case == "single-process" else "uniform"
    proc = _cli([str(folder), "--method", method, "-K", "2", "--shard-directions",
                 "--out", str(out)])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in shown(proc.stderr) if line]
    assert len(lines) == 1 and lines[0].startswith("upcycle soup: error: --shard-directions")
    assert ("torchrun" if case == "single-process" else "not uniform") in lines[0]
    assert not out.exists() and not (tmp_path / ".soup.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ings"]


def test_cli_shard_directions_k_below_world(tmp_path):
    folder = _ingredients(tmp_path, n=2)
    out = tmp_path / "soup"
    proc = _cli([str(folder), "--method", "mehl+", "-K", "1", "--shard-directions",
                 "--out", str(out)], torchrun=True)
    assert proc.returncode != 0
    assert "upcycle soup: error: --shard-directions needs --model-batch (K) >= the number of " \
           "processes (W = 2)" in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ings"]
