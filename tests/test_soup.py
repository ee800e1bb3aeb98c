"""Soup methods on plain nn.Modules: exactness, invariants, bad input, memory, data parallel."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import torchrun
from safetensors.torch import save_file
from torch import nn

from upcycle import UpcycleError
from upcycle.io.ingredients import open_ingredients
from upcycle.soup import (
    LearnedConfig,
    MehlConfig,
    greedy_soup,
    learned_soup,
    mehl_soup,
    uniform_soup,
)


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.a = nn.Linear(8, width)
        self.b = nn.Linear(width, 3)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * self.scale


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"])


def make_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [{"x": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, n, 16)]


def mean_loss(model, batches):
    with torch.no_grad():
        return float(sum(loss_fn(model, b) for b in batches) / len(batches))


def write_ingredients(folder, n, noise=0.3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = Net().state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sd = {k: (v + noise * torch.randn_like(v.float())).to(dtype) if v.is_floating_point()
              else v + i for k, v in base.items()}
        save_file(sd, str(folder / f"ing{i:02d}.safetensors"))
    return open_ingredients([folder])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_soup_is_the_exact_mean(tmp_path, dtype):
    ings = write_ingredients(tmp_path, 5, dtype=dtype)
    soup = uniform_soup(ings)
    for name in ings[0].keys():
        stack = torch.stack([i.get(name) for i in ings])
        if stack.is_floating_point():
            expected = stack.double().mean(0).to(dtype)
            assert soup.state[name].dtype == dtype
            assert torch.equal(soup.state[name], expected), name
        else:  # integer buffers come from the first ingredient
            assert torch.equal(soup.state[name], ings[0].get(name))
    assert torch.allclose(soup.coefficients.sum(0), torch.ones(1, dtype=torch.float64))


def test_greedy_accepts_only_improvements(tmp_path):
    # Scalar "models": the score is -|w - 1|. Ingredients 0.9, 1.3 and 5.0:
    # best = 0.9 (score -0.1); + 1.3 -> mean 1.1 (score -0.1, not strictly better: rejected);
    # + 5.0 -> mean 2.95 (worse: rejected). Then 1.2 -> mean 1.05 (better: accepted).
    for i, w in enumerate([1.3, 0.9, 5.0, 1.2]):
        save_file({"w": torch.tensor([w])}, str(tmp_path / f"m{i}.safetensors"))
    ings = open_ingredients([tmp_path])

    def score(state):
        return -abs(float(state["w"]) - 1.0)

    soup = greedy_soup(ings, score)
    assert soup.info["order"][0] == 1  # 0.9 scores best
    assert soup.info["accepted"] == [1, 3]
    assert float(soup.state["w"]) == pytest.approx(1.05)
    assert [s["accepted"] for s in soup.info["steps"]] == [True, True, False, False]
    assert soup.coefficients[:, 0].tolist() == [0.0, 0.5, 0.0, 0.5]


@pytest.mark.parametrize("blockwise", [True, False])
def test_mehl_coefficients_sum_to_one_and_reproduce_the_soup(tmp_path, blockwise):
    ings = write_ingredients(tmp_path, 7)
    soup = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn,
                     config=MehlConfig(model_batch=3, epochs=3, lr=0.05, blockwise=blockwise,
                                       models_epochs=2))
    C = soup.coefficients
    assert C.shape == (7, len(soup.blocks))
    assert torch.allclose(C.sum(0), torch.ones(C.shape[1], dtype=torch.float64), atol=1e-9)
    assert (C < 0).any() or (C > 1).any() or True  # extrapolation is allowed, not required
    params = [n for n, _ in Net().named_parameters()]
    assert sorted(soup.blocks if blockwise else params) == sorted(params)
    for name in params:
        col = soup.blocks.index(name) if blockwise else 0
        recon = sum(C[i, col] * ings[i].get(name).double() for i in range(7))
        assert torch.allclose(recon, soup.state[name].double(), atol=1e-5), name
    # Floating buffers are averaged, integer buffers come from the first ingredient.
    assert torch.allclose(soup.state["scale"], torch.stack([i.get("scale") for i in ings]).mean(0))
    assert torch.equal(soup.state["count"], ings[0].get("count"))
    assert len(soup.history) == 2 * 3  # 2 passes x ceil(7 / 3) rounds


def test_mehl_reduces_held_out_loss_below_uniform(tmp_path):
    ings = write_ingredients(tmp_path, 6, noise=0.5)
    data = make_data()
    model = Net()
    model.load_state_dict(uniform_soup(ings).state)
    uniform_loss = mean_loss(model, data)
    soup = mehl_soup(ings, Net(), data, loss_fn=loss_fn,
                     config=MehlConfig(model_batch=2, epochs=5, lr=0.05))
    model.load_state_dict(soup.state)
    assert mean_loss(model, data) < uniform_loss - 0.01
    losses = [h["held_out_loss_train"] for h in soup.history]
    assert losses[-1] < losses[0]


def test_mehl_skips_blocks_without_direction(tmp_path):
    ings = write_ingredients(tmp_path, 4)
    # Make one tensor identical in every ingredient: its direction is zero.
    same = ings[0].get("b.bias").clone()
    for ing in ings:
        sd = ing.state_dict()
        sd["b.bias"] = same
        save_file(sd, str(ing.path))
    ings = open_ingredients([tmp_path])
    soup = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn,
                     config=MehlConfig(model_batch=2, epochs=2, lr=0.05))
    assert all(torch.isfinite(v.float()).all() for v in soup.state.values())
    assert torch.equal(soup.state["b.bias"], same)
    assert any(h["skipped_blocks"] > 0 for h in soup.history)
    assert torch.isfinite(soup.coefficients).all()


def test_mehl_is_deterministic_for_a_seed(tmp_path):
    ings = write_ingredients(tmp_path, 5)
    cfg = MehlConfig(model_batch=2, epochs=2, lr=0.05, seed=3)
    a = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn, config=cfg)
    b = mehl_soup(ings, Net(), make_data(), loss_fn=loss_fn, config=cfg)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_learned_soup_starts_uniform_and_improves(tmp_path):
    ings = write_ingredients(tmp_path, 4, noise=0.5)
    data = make_data()
    model = Net()
    model.load_state_dict(uniform_soup(ings).state)
    uniform_loss = mean_loss(model, data)
    soup = learned_soup(ings, Net(), data, loss_fn=loss_fn, config=LearnedConfig(epochs=5))
    model.load_state_dict(soup.state)
    assert mean_loss(model, data) < uniform_loss
    assert torch.allclose(soup.coefficients.sum(0),
                          torch.ones(soup.coefficients.shape[1], dtype=torch.float64))
    assert (soup.coefficients >= 0).all()  # softmax: convex combinations only


def test_bad_inputs_for_learned_methods(tmp_path):
    ings = write_ingredients(tmp_path, 3)
    data = make_data()
    with pytest.raises(UpcycleError, match="at least 2 ingredients"):
        mehl_soup(ings[:1], Net(), data, loss_fn=loss_fn, config=MehlConfig(model_batch=1))
    with pytest.raises(UpcycleError, match="at least 2 ingredients"):
        learned_soup(ings[:1], Net(), data, loss_fn=loss_fn)
    for k in (0, 4):
        with pytest.raises(UpcycleError, match=f"model_batch .* got {k}"):
            mehl_soup(ings, Net(), data, loss_fn=loss_fn, config=MehlConfig(model_batch=k))
    with pytest.raises(UpcycleError, match="held-out set is empty"):
        mehl_soup(ings, Net(), [], loss_fn=loss_fn, config=MehlConfig(model_batch=2))
    with pytest.raises(UpcycleError, match="held-out set is empty"):
        learned_soup(ings, Net(), [], loss_fn=loss_fn)
    with pytest.raises(UpcycleError, match="parameter 'a.weight' has shape|'a.weight' has shape"):
        mehl_soup(ings, Net(width=12), data, loss_fn=loss_fn, config=MehlConfig(model_batch=2))


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    import torch.nn.functional as F
    from upcycle.io import open_ingredients
    from upcycle.runtime.memory import current_rss_mb, peak_rss_mb
    from upcycle.soup import mehl_soup, learned_soup, MehlConfig, LearnedConfig
    torch.set_num_threads(1)
    method, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    k, directions = (int(sys.argv[4]), sys.argv[5]) if len(sys.argv) > 5 else (2, "auto")
    model = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(),
                          nn.Linear(1024, 4))
    x = torch.randn(32, 64); y = torch.randint(0, 4, (32,))
    data = [{"x": x, "labels": y}]
    loss = lambda m, b: F.cross_entropy(m(b["x"]), b["labels"])
    ings = open_ingredients([folder])[:n]
    base = current_rss_mb()
    if method == "mehl":
        mehl_soup(ings, model, data, loss_fn=loss,
                  config=MehlConfig(model_batch=k, epochs=1, directions=directions))
    else:
        learned_soup(ings, model, data, loss_fn=loss, config=LearnedConfig(epochs=1))
    print(json.dumps({"extra_mb": peak_rss_mb() - base}))
""")


def memory_probe(tmp_path, n):
    """``n`` ingredients of MEMORY_SCRIPT's 9 MB model, and (a function running the script
    in a fresh process with glibc's mmap threshold fixed: its ``extra_mb``, the model's MiB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(),
                          nn.Linear(1024, 4))
    folder = tmp_path / "ings"
    folder.mkdir()
    for i in range(n):
        save_file({k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()},
                  str(folder / f"ing{i:02d}.safetensors"))
    model_mb = sum(v.numel() * 4 for v in model.state_dict().values()) / 2**20
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}

    def measure(method, n, *more):
        out = subprocess.run([sys.executable, str(script), method, str(folder), str(n),
                              *map(str, more)], capture_output=True, text=True, check=True,
                             env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]

    return measure, model_mb


def test_mehl_peak_memory_does_not_grow_with_the_number_of_ingredients(tmp_path):
    """Peak RSS above the start, in fresh processes: MEHL (K = 2) at N = 6 vs N = 12 ingredients
    of a 9 MB model stays flat; the learned-soup baseline grows by ~6 models over the same
    range (proof that the measurement can see growth).

    The processes run with glibc's mmap threshold fixed at 64 KiB. With the default, the first
    free of a large block raises the threshold (up to 32 MiB), later model-sized tensors come
    from the heap, and whether freed heap space is reused depends on allocation order: the
    learned soup's per-step transients (the weighted-sum graph run through functional_call,
    ~6 model sizes, the same at any N) then add anywhere from 0 to ~200 MB of fragmentation
    to the peak, which hid the 6-model growth on one machine (~238 MB at both N) and inflated
    it on another. With a fixed threshold every tensor is its own mapping, returned when
    freed, so RSS follows the live tensors: learned grows by 6.0 models, MEHL by < 0.1.
    """
    extra, model_mb = memory_probe(tmp_path, 12)

    mehl_small, mehl_large = extra("mehl", 6), extra("mehl", 12)
    learned_small, learned_large = extra("learned", 6), extra("learned", 12)
    assert learned_large - learned_small > 5 * model_mb  # the baseline holds all N models
    # MEHL holding even one of the 6 extra ingredients would add a model.
    assert mehl_large - mehl_small < model_mb


GREEDY_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from upcycle.io import open_ingredients
    from upcycle.runtime.memory import current_rss_mb, peak_rss_mb
    from upcycle.soup import greedy_soup
    torch.set_num_threads(1)
    ings = open_ingredients([sys.argv[1]])
    base = current_rss_mb()
    scores = iter(range(100))  # every candidate improves: every ingredient is accepted
    greedy_soup(ings, lambda state: float(next(scores)), ingredient_scores=[0.0] * len(ings))
    print(json.dumps({"extra_mb": peak_rss_mb() - base}))
""")


def test_greedy_holds_two_states(tmp_path):
    """Greedy's peak grows with the model size like two model states (the soup so far and
    one candidate), not three: measured in fresh processes at two model sizes, so that
    fixed costs cancel (same glibc mmap threshold as the MEHL memory test)."""
    script = tmp_path / "greedy.py"
    script.write_text(GREEDY_MEMORY_SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    peaks, sizes = [], []
    for rows in (64, 256):
        folder = tmp_path / str(rows)
        folder.mkdir()
        for i in range(4):
            save_file({f"layer{j}": torch.randn(rows, 1024) for j in range(16)},
                      str(folder / f"ing{i}.safetensors"))
        sizes.append(16 * rows * 1024 * 4 / 2**20)
        out = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True,
                             text=True, check=True, env=env)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"])
    states = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    assert states < 2.5, states  # three fp32 states (the old greedy) measure 3.0


DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    import torch.nn.functional as F
    from upcycle.runtime import distributed
    from upcycle.io import open_ingredients
    from upcycle.soup import learned_soup, mehl_soup, LearnedConfig, MehlConfig
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    folder, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    g = torch.Generator().manual_seed(0)
    if mode == "lm":  # causal-LM labels with padding; the loss is the token mean
        ids = torch.randint(0, 11, (13, 6), generator=g)
        labels = ids.clone()
        for row in range(13):
            labels[row, 1 + row % 5:] = -100
        data = [{"input_ids": ids[i:i + 4], "labels": labels[i:i + 4]} for i in range(0, 13, 4)]
        model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
        def loss(m, b):
            logits = m(b["input_ids"])[:, :-1]
            return F.cross_entropy(logits.reshape(-1, 11), b["labels"][:, 1:].reshape(-1))
    else:  # the last batch has 1 row: fewer rows than ranks
        x = torch.randn(49, 8, generator=g); y = (x[:, 0] > 0).long()
        data = [{"x": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 49, 16)]
        class Heads(nn.Module):  # reshapes like HF attention: fails on 0 rows
            def forward(self, h):
                return h.view(h.shape[0], -1, 4).flatten(1)
        model = nn.Sequential(nn.Linear(8, 16), Heads(), nn.ReLU(), nn.Linear(16, 2))
        loss = lambda m, b: F.cross_entropy(m(b["x"]), b["labels"])
    ings = open_ingredients([folder])
    soup = mehl_soup(ings, model, data, loss_fn=loss,
                     config=MehlConfig(model_batch=2, epochs=2, lr=0.05,
                                       grad_clip=0.5 if mode == "clip" else None))
    learned = learned_soup(ings, model, data, loss_fn=loss, config=LearnedConfig(epochs=2))
    if distributed.rank() == 0:
        torch.save({"mehl": soup.state, "learned": learned.state}, out)
""")


@pytest.mark.parametrize("mode", ["noclip", "clip", "lm"])
def test_mehl_two_gloo_processes_match_one_process(tmp_path, mode):
    """Data parallel = one process, for MEHL (with and without the per-parameter all-reduce
    of --grad-clip) and the learned soup, with a last batch of fewer rows than ranks, and for
    causal-LM labels with padding (the share of a rank is its share of target tokens)."""
    torch.manual_seed(0)
    if mode == "lm":
        model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    else:  # the script's model, whose reshape (like HF attention's) fails on 0 rows
        model = nn.Sequential(nn.Linear(8, 16), nn.Identity(), nn.ReLU(), nn.Linear(16, 2))
    folder = tmp_path / "ings"
    folder.mkdir()
    for i in range(4):
        save_file({k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()},
                  str(folder / f"ing{i}.safetensors"))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "one.pt"), mode],
                   check=True, env=env)
    torchrun([script, folder, tmp_path / "two.pt", mode])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for method in ("mehl", "learned"):
        for k in one[method]:
            assert torch.allclose(one[method][k], two[method][k], atol=1e-5), (method, k)
