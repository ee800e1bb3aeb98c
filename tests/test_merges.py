"""The fixed-weight merges (linear, task arithmetic, TIES, DARE, SLERP, Model Stock) against
fp64 references written here from their definitions and from mergekit's formulas (mergekit
0.1.x ``merge_methods/``: generalized_task_arithmetic.py, sparsify.py, slerp.py,
model_stock.py, linear.py; mergekit itself is not installed), on tiny random state dicts,
tiny HF models and LoRA adapters; and the bad inputs, each one error line, nothing written."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from lm_models import save_lm, tiny_lm
from safetensors.torch import load_file, save_file

from upcycle.cli.main import main
from upcycle.io.checkpoints import Ingredient
from upcycle.io.ingredients import open_ingredients
from upcycle.jobs.soup import SoupConfig, run_soup
from upcycle.soup import uniform_soup
from upcycle.soup.merge import streamed_to
from upcycle.soup.registry import SoupContext, get_method, method_names

N = 3
SHAPES = {"w": (6, 5), "b": (5,), "e": (7, 4)}


def _states(seed: int = 0, n: int = N, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base["step"] = torch.tensor([7])
    fts = [{k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()} for _ in range(n)]
    return base, fts


@pytest.fixture
def files(tmp_path):
    """(base file, ingredient files, base state, ingredient states) of tiny random states."""
    base, fts = _states()
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, s in enumerate(fts):
        save_file(s, tmp_path / f"ft{i}.safetensors")
        paths.append(tmp_path / f"ft{i}.safetensors")
    return tmp_path / "base.safetensors", paths, base, fts


def soup(paths, method, base=None, **settings):
    return run_soup(SoupConfig([str(p) for p in paths], method=method, base=base,
                               method_settings=settings, device="cpu", progress=False)).soup


# -- references: mergekit's formulas, in fp64 ------------------------------------------------

def ref_magnitude(t, density):
    """mergekit sparsify.magnitude: keep the int(density * numel) largest |t| (argsort)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros_like(t)
    mask.view(-1)[torch.argsort(t.abs().view(-1), descending=True)[:k]] = 1
    return t * mask


def dare_keep(seed, name, i, shape, density):
    """The documented DARE draw: torch.rand from a generator seeded with the first 8 bytes
    (little-endian, >> 1) of sha256("seed\\0index\\0name"), kept where < density."""
    digest = hashlib.sha256(f"{seed}\0{i}\0{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(shape, generator=g, dtype=torch.float64) < density


def ref_gta(base, fts, name, weights, *, sparsify=None, consensus=False, normalize=False,
            lambda_=1.0):
    """mergekit GTATask.execute on one tensor (fp64)."""
    b = base[name].double()
    deltas = [f[name].double() - b for f in fts]
    if sparsify is not None:
        deltas = [sparsify(i, d) for i, d in enumerate(deltas)]
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float64)
    while w.dim() < deltas.dim():
        w = w.unsqueeze(-1)
    wd = deltas * w
    if consensus:
        majority = (wd.sum(0) >= 0).double() * 2 - 1
        mask = (wd.sign() == majority).double()
        mixed = (wd * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return (b + lambda_ * mixed).float()


def ref_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """mergekit slerp (numpy), in fp64."""
    a, b = v0.double().numpy(), v1.double().numpy()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = np.sum(ua * ub)
    if np.abs(dot) > dot_threshold:
        return torch.from_numpy((1 - t) * a + t * b).float()
    theta0 = np.arccos(dot)
    s0 = np.sin(theta0 - theta0 * t) / np.sin(theta0)
    s1 = np.sin(theta0 * t) / np.sin(theta0)
    return torch.from_numpy(s0 * a + s1 * b).float()


def ref_model_stock(w0, ws):
    """mergekit ModelStockMergeTask.execute (filter_wise=False), in fp64."""
    shape = w0.shape
    w0 = w0.double().view(-1)
    ws = [w.double().view(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm_product = offsets[i].norm() * offsets[j].norm()
            cos.append(((offsets[i] * offsets[j]).sum() / norm_product.clamp(min=1e-6))
                       .clamp(-1, 1))
    c = torch.stack(cos).mean()
    k = len(ws)
    t = k * c / (1 + (k - 1) * c)
    return (t * sum(ws) / k + (1 - t) * w0).float().view(shape), float(t)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# -- linear and task arithmetic ---------------------------------------------------------------

def test_linear_with_equal_weights_is_the_uniform_soup_bit_for_bit(files):
    _, paths, _, _ = files
    uniform = uniform_soup([Ingredient(p) for p in paths])
    for weights in (None, [2.0, 2.0, 2.0]):
        linear = soup(paths, "linear", weights=weights)
        assert all(torch.equal(linear.state[k], uniform.state[k]) for k in uniform.state)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_weights(files, normalize):
    _, paths, _, fts = files
    w = [0.5, 2.0, -0.25]
    out = soup(paths, "linear", weights=w, normalize=normalize)
    for name in SHAPES:  # mergekit LinearMergeTask
        res = sum(wi * f[name].double() for wi, f in zip(w, fts))
        close(out.state[name], (res / sum(w) if normalize else res).float())
    assert torch.equal(out.state["step"], fts[0]["step"])
    assert out.coefficients[:, 0].tolist() == pytest.approx(
        [x / sum(w) for x in w] if normalize else w)


def test_task_arithmetic_of_one_ingredient_with_lambda_1_is_that_ingredient(files):
    base, paths, _, fts = files
    out = soup(paths[:1], "task-arithmetic", base=base)
    assert all(torch.equal(out.state[k], fts[0][k]) for k in fts[0])


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(files, normalize):
    base_file, paths, base, fts = files
    w, lam = [1.0, 0.5, 2.0], 0.7
    out = soup(paths, "task-arithmetic", base=base_file, weights=w, lambda_=lam,
               normalize=normalize)
    for name in SHAPES:
        close(out.state[name], ref_gta(base, fts, name, w, normalize=normalize, lambda_=lam))
    c = out.coefficients[:, 0]  # (base, ingredients): the same soup as a linear combination
    assert float(c.sum()) == pytest.approx(1.0)
    combo = sum(ci * s["w"].double() for ci, s in zip(c, [base, *fts]))
    close(out.state["w"], combo.float())


# -- TIES and DARE ------------------------------------------------------------------------------

@pytest.mark.parametrize("density,normalize", [(0.5, True), (0.2, True), (1.0, True),
                                               (0.5, False)])
def test_ties_is_mergekits(files, density, normalize):
    base_file, paths, base, fts = files
    w, lam = [1.0, 0.5, 2.0], 0.9
    out = soup(paths, "ties", base=base_file, weights=w, density=density, lambda_=lam,
               normalize=normalize)
    for name in SHAPES:
        want = ref_gta(base, fts, name, w, sparsify=lambda i, d: ref_magnitude(d, density),
                       consensus=True, normalize=normalize, lambda_=lam)
        close(out.state[name], want)


def test_ties_trims_then_elects_by_mass(tmp_path):
    """One entry: tau = (+3, -1, -1): the mass elects +, so only +3 counts (disjoint mean 3);
    by count - would have won."""
    base = {"x": torch.zeros(2)}
    save_file(base, tmp_path / "base.safetensors")
    for i, v in enumerate([3.0, -1.0, -1.0]):
        save_file({"x": torch.tensor([v, 0.0])}, tmp_path / f"t{i}.safetensors")
    out = soup(sorted(tmp_path.glob("t*.safetensors")), "ties",
               base=tmp_path / "base.safetensors")
    assert out.state["x"].tolist() == [3.0, 0.0]


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties"])
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_dare_is_its_definition_with_the_recorded_seed(files, method, rescale):
    base_file, paths, base, fts = files
    w, density, seed = [1.0, 0.5, 2.0], 0.4, 11

    def drop(name):
        def sparsify(i, d):
            kept = d * dare_keep(seed, name, i, d.shape, density)
            if rescale == "inverse":
                return kept / density
            if rescale == "l1":  # mergekit rescaled_masked_tensor, RescaleNorm.l1
                before, after = d.abs().sum(), kept.abs().sum()
                return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
            return kept
        return sparsify

    out = soup(paths, method, base=base_file, weights=w, density=density, seed=seed,
               rescale=rescale)
    assert out.info["seed"] == seed and out.info["drop_rate"] == pytest.approx(0.6)
    for name in SHAPES:
        want = ref_gta(base, fts, name, w, sparsify=drop(name),
                       consensus=method == "dare-ties")
        close(out.state[name], want)


def test_dare_is_seeded(files):
    base_file, paths, _, _ = files
    a = soup(paths, "dare-linear", base=base_file, density=0.5, seed=1)
    b = soup(paths, "dare-linear", base=base_file, density=0.5, seed=1)
    c = soup(paths, "dare-linear", base=base_file, density=0.5, seed=2)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not torch.equal(a.state["w"], c.state["w"])
    full = soup(paths, "dare-linear", base=base_file, density=1.0)
    ta = soup(paths, "task-arithmetic", base=base_file)
    assert all(torch.equal(full.state[k], ta.state[k]) for k in ta.state)


# -- SLERP and Model Stock ---------------------------------------------------------------------

def test_slerp_ends_and_mergekits_formula(files, tmp_path):
    _, paths, _, fts = files
    ends = [soup(paths[:2], "slerp", t=t) for t in (0.0, 1.0)]
    for name in fts[0]:
        assert torch.equal(ends[0].state[name], fts[0][name])
        assert torch.equal(ends[1].state[name], fts[1][name])
    out = soup(paths[:2], "slerp", t=0.3)
    for name in SHAPES:
        close(out.state[name], ref_slerp(0.3, fts[0][name], fts[1][name]))
    # nearly colinear tensors: linear interpolation
    a = {"x": torch.arange(1.0, 7.0)}
    save_file(a, tmp_path / "a.safetensors")
    save_file({"x": 2 * a["x"]}, tmp_path / "b.safetensors")
    out = soup([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], "slerp", t=0.25)
    assert torch.equal(out.state["x"], 1.25 * a["x"])


def test_model_stock_is_mergekits(tmp_path):
    base, fts = _states(seed=3)
    base["tiny"], base["still"] = torch.ones(4), torch.ones(3)
    for i, f in enumerate(fts):  # deltas whose norm products fall below mergekit's 1e-6 floor
        f["tiny"] = base["tiny"] + 1e-4 * torch.tensor([1.0, -2.0, 0.5, i])
        f["still"] = base["still"].clone()  # untouched by fine-tuning
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, f in enumerate(fts):
        save_file(f, tmp_path / f"ft{i}.safetensors")
        paths.append(tmp_path / f"ft{i}.safetensors")
    out = soup(paths, "model-stock", base=tmp_path / "base.safetensors")
    assert sorted(out.blocks) == sorted([*SHAPES, "tiny", "still"])
    for name in out.blocks:
        want, t = ref_model_stock(base[name], [f[name] for f in fts])
        close(out.state[name], want)
        column = out.coefficients[:, out.blocks.index(name)]  # the base's 1 - t, then t / k
        assert column.tolist() == pytest.approx([1 - t, *[t / N] * N])
    assert torch.equal(out.state["still"], base["still"])


# -- HF models and LoRA adapters -------------------------------------------------------------

def _family(tmp_path, n, fine_tune):
    """A tiny Llama base folder and ``n`` folders ``fine_tune(copy of the base, folder)``
    writes (each under its own seed)."""
    base_model = tiny_lm("llama", tie=False)
    base = save_lm(base_model, tmp_path / "base")
    folders = []
    for i in range(n):
        torch.manual_seed(100 + i)
        fine_tune(copy.deepcopy(base_model), tmp_path / f"ft{i}")
        folders.append(tmp_path / f"ft{i}")
    return base, folders


def _perturbed(model, folder):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_lm(model, folder)


def _lora(model, folder):
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["q_proj", "v_proj", "up_proj"])
                   ).save_pretrained(folder)


@pytest.mark.parametrize("method,flags", [
    ("task-arithmetic", ["--lambda", "0.8", "--weights", "1", "0.5", "1"]),
    ("ties", ["--density", "0.3"]),
    ("dare-ties", ["--density", "0.5", "--seed", "3", "--no-normalize"]),
    ("model-stock", []),
])
def test_cli_merges_hf_models_into_a_loadable_model(tmp_path, method, flags, capsys):
    from transformers import LlamaForCausalLM

    base, folders = _family(tmp_path, 3, _perturbed)
    out = tmp_path / "soup"
    assert main(["soup", "--method", method, "--base", str(base), *map(str, folders), *flags,
                 "--out", str(out), "--quiet"]) == 0
    model = LlamaForCausalLM.from_pretrained(out)
    api = soup(folders, method, base=base, **_settings(flags))
    for name, value in model.state_dict().items():
        assert torch.equal(value, api.state[name]), name
    assert "soup written to" in capsys.readouterr().out


def _settings(flags):
    names = {"--lambda": "lambda_", "--weights": "weights", "--density": "density",
             "--seed": "seed"}
    out, key = {}, None
    for f in flags:
        if f == "--no-normalize":
            out["normalize"] = False
        elif f.startswith("--"):
            key = names[f]
        elif key == "weights":
            out.setdefault("weights", []).append(float(f))
        else:
            out[key] = int(f) if key == "seed" else float(f)
    return out


@pytest.mark.parametrize("method,settings", [
    ("task-arithmetic", {"lambda_": 0.5}), ("ties", {"density": 0.4}),
    ("dare-linear", {"density": 0.5}), ("slerp", {"t": 0.4}), ("model-stock", {}),
    ("linear", {"weights": [0.3, 0.7]}),
])
def test_lora_ingredients_merge_as_their_merged_models(tmp_path, method, settings):
    """An adapter ingredient is base + its delta: merging adapters equals merging the merged
    full checkpoints, tensor for tensor."""
    base, folders = _family(tmp_path, 2, _lora)
    merged = []
    for i, ing in enumerate(open_ingredients(folders, base=base)):
        save_file(ing.state_dict(), tmp_path / f"merged{i}.safetensors")
        merged.append(tmp_path / f"merged{i}.safetensors")
    from_adapters = soup(folders, method, base=base, **settings)
    from_full = soup(merged, method, base=base, **settings)
    for name, value in from_full.state.items():
        assert torch.equal(from_adapters.state[name], value), name
    if method in ("task-arithmetic", "ties"):  # untargeted tensors stay the base's
        base_state = load_file(base / "model.safetensors")
        name = "model.layers.0.self_attn.k_proj.weight"
        assert torch.equal(from_adapters.state[name], base_state[name])


# -- bad inputs: one error line, nothing written --------------------------------------------

@pytest.mark.parametrize("case,args,expected", [
    ("no base", ["--method", "ties"], "method 'ties' needs --base"),
    ("no base", ["--method", "model-stock"], "method 'model-stock' needs --base"),
    ("slerp 3", ["--method", "slerp"], "method 'slerp' needs exactly 2 ingredients, got 3"),
    ("density 0", ["--method", "ties", "--base", "BASE", "--density", "0"],
     "--density 0.0: expected a fraction in (0, 1]"),
    ("density 1.5", ["--method", "dare-linear", "--base", "BASE", "--density", "1.5"],
     "--density 1.5: expected a fraction in (0, 1]"),
    ("weights", ["--method", "linear", "--weights", "1", "2"],
     "--weights: 2 value(s) for 3 ingredients"),
    ("weights sum 0", ["--method", "linear", "--weights", "1", "-1", "0"],
     "they sum to 0, and normalize divides by their sum"),
    ("t", ["--method", "slerp", "--t", "1.5"], "--t 1.5: expected a value in [0, 1]"),
])
def test_bad_inputs_are_one_error_line_and_nothing_is_written(files, capsys, case, args,
                                                              expected):
    base, paths, _, _ = files
    args = [str(base) if a == "BASE" else a for a in args]
    if case == "t":
        paths = paths[:2]
    out = base.parent / "out"
    assert main(["soup", *map(str, paths), *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("upcycle soup: error: ") and expected in err[0]
    assert not out.exists()


def test_a_base_that_is_not_the_ingredients_base_is_refused(files, tmp_path, capsys):
    _, paths, base, _ = files
    other = {**base, "w": torch.zeros(5, 6)}
    save_file(other, tmp_path / "other.safetensors")
    assert main(["soup", "--method", "task-arithmetic", "--base",
                 str(tmp_path / "other.safetensors"), *map(str, paths), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'w' has shape (5, 6)" in err and "not fine-tunes of this base" in err


@pytest.mark.parametrize("method", method_names(needs_data=False))
def test_a_streamed_merge_hands_each_tensor_over_and_keeps_none(files, method):
    """Within ``streamed_to`` (how a fitted soup's start is written into its anchor) every
    fixed-weight merge gives each tensor to the sink once, equal to its in-memory result,
    and keeps none of them; its coefficients are unchanged."""
    base_path, paths, _, _ = files
    entry = get_method(method)
    ingredients = [Ingredient(p) for p in paths[:2 if method == "slerp" else N]]
    context = SoupContext(base=Ingredient(base_path))
    config = entry.make_config(len(ingredients))
    eager = entry.run(ingredients, context, config)
    got: dict[str, torch.Tensor] = {}

    def sink(name, tensor):
        assert name not in got
        got[name] = tensor

    with streamed_to(sink):
        streamed = entry.run(ingredients, context, config)
    assert streamed.state == {}
    assert list(got) == list(eager.state)
    for name, tensor in eager.state.items():
        assert torch.equal(got[name], tensor), name
    if eager.coefficients is not None:
        assert torch.equal(streamed.coefficients, eager.coefficients)
