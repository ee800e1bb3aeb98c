"""SNELL's blocked path: delta_W built a block of rows at a time must give exactly the dense
reference's threshold and mask, its outputs and gradients, and bounded transient memory."""

import math
import os
import shutil

import pytest
import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.runtime.memory import LiveTensorBytes
from upcycle.tune.snell import (
    SnellConfig,
    SnellLayer,
    kthvalue_blocked,
    snell_kernel,
    snell_thresholds,
    sparsify,
)


def _bits(t):
    return t.reshape(1).view({4: torch.int32, 8: torch.int64}[t.element_size()])


def _chunks(values, sizes):
    def gen():
        start = 0
        for n in sizes:
            yield values[start:start + n]
            start += n
        assert start == values.numel()
    return gen


# -- the exact threshold ------------------------------------------------------------------

@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "sorted"])
def test_kthvalue_blocked_is_kthvalue_bit_for_bit(dtype, kind, window):
    """Both the pure radix passes and the one-call candidate window (which falls back to
    the passes when the first chunk misjudges the quantile: 'sorted', or ties: 'zeros')."""
    g = torch.Generator().manual_seed(0)
    n = 5003
    if kind == "random":
        values = torch.randn(n, generator=g, dtype=dtype).abs() * 10 ** torch.randint(
            -20, 20, (n,), generator=g).to(dtype)
    elif kind == "ties":  # a few distinct values, many ties, neighbours one ulp apart
        base = torch.tensor([0.0, 1e-30, 0.5, 1.0, 3.0], dtype=dtype)
        base = torch.cat([base, torch.nextafter(base[2:3], torch.tensor(1.0, dtype=dtype))])
        values = base[torch.randint(0, len(base), (n,), generator=g)]
    elif kind == "zeros":
        values = torch.zeros(n, dtype=dtype)
        values[::7] = 2.0
    else:
        values = torch.rand(n, generator=g, dtype=dtype).sort().values
    sizes = [999, 1, 2, 3000, 1001]
    for k in (1, 2, n // 3, n // 2, n - 1, n):
        want = values.kthvalue(k).values
        got = kthvalue_blocked(_chunks(values, sizes), k, n=n if window else None)
        assert got.dtype == dtype
        assert torch.equal(_bits(got), _bits(want)), (k, got, want)


def test_kthvalue_blocked_window_saves_a_pass():
    values = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    for data, passes in ((values, 1), (values.sort().values, 2)):
        calls = []

        def chunks(data=data, calls=calls):
            calls.append(1)
            yield from data.split(7000)

        got = kthvalue_blocked(chunks, 50_000, n=data.numel())
        assert torch.equal(got, data.kthvalue(50_000).values)
        assert len(calls) == passes


def test_kthvalue_blocked_bad_k():
    with pytest.raises(UpcycleError, match="k=11 but only 10 values"):
        kthvalue_blocked(lambda: iter([torch.rand(10)]), 11)
    with pytest.raises(UpcycleError, match="yielded no values"):
        kthvalue_blocked(lambda: iter([]), 1)


# -- the blocked layer against the dense reference -----------------------------------------

def _layer(d_in, d_out, *, mode="reference", s=0.5, slices=1, block_rows=7, dtype=torch.float32,
           transposed=False, scale_slices=False, seed=0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    base = Conv1D(d_out, d_in) if transposed else nn.Linear(d_in, d_out)
    base = base.to(dtype)
    nn.init.normal_(base.bias)
    cfg = SnellConfig(r=8, sparsity=s, sparsify_mode=mode, learnable_coeffs=True, dropout=0.0,
                      drop_path=0.0)
    layer = SnellLayer(base, cfg, num_slices=slices)
    with torch.no_grad():
        layer.snell_A["default"].normal_(0, 1.0)
        layer.snell_B["default"].normal_(0, 1.0)
        if scale_slices:  # q's kernel is ~100x k's and v's: one threshold would keep all of q
            layer.snell_B["default"][:, : d_out // 3] *= 100
    layer.block_rows = block_rows
    return layer


def _dense_delta(layer):
    return sparsify(snell_kernel(layer.snell_A["default"], layer.snell_B["default"], layer.coeffs()),
                    layer.settings().sparsity, layer.settings().mode, layer.num_slices)


CASES = [
    # d_in, d_out, mode, sparsity, slices, block_rows, scale_slices
    (29, 150, "reference", 0.5, 1, 7, False),       # blocks straddle the 64-row tiles
    (29, 150, "paper", 0.7, 1, 64, False),
    (17, 3 * 37, "reference", 0.5, 3, 5, True),     # fused q/k/v, 100x apart
    (17, 3 * 37, "paper", 0.3, 3, 200, True),
    (23, 41, "reference", 0.0, 1, 6, False),        # sparsity 0: dense kernelized LoRA
]


@pytest.mark.parametrize("d_in,d_out,mode,s,slices,block_rows,scaled", CASES)
def test_blocked_mask_is_the_dense_kthvalue_mask(d_in, d_out, mode, s, slices, block_rows,
                                                 scaled):
    layer = _layer(d_in, d_out, mode=mode, s=s, slices=slices, block_rows=block_rows,
                   scale_slices=scaled)
    with torch.no_grad():
        dense = _dense_delta(layer)
        blocked = torch.cat([delta for _, _, delta in layer._delta_blocks()])
        tau = snell_thresholds(layer.snell_A["default"], layer.snell_B["default"], layer.coeffs(), s, slices,
                               block_rows)
    assert torch.equal(blocked, dense)  # same values, hence exactly the same mask
    n = d_out // slices * d_in
    zeroed = math.floor(s * n + 1e-9)
    if s > 0:
        K = snell_kernel(layer.snell_A["default"], layer.snell_B["default"], layer.coeffs()).detach()
        want = K.abs().reshape(slices, -1).kthvalue(zeroed, dim=1).values
        assert torch.equal(tau.view(torch.int32), want.view(torch.int32))
    kept = (blocked != 0).reshape(slices, -1).sum(1)
    assert kept.tolist() == [n - zeroed] * slices  # equal sparsity in every slice


def _step(layer, x, recompute=None):
    if recompute is not None:
        layer.settings().recompute = recompute
    for p in (layer.snell_A["default"], layer.snell_B["default"], layer.coeffs(), layer.base_layer.weight,
              layer.base_layer.bias):
        p.grad = None
    layer.base_layer.weight.requires_grad_(True)
    x = x.clone().requires_grad_(True)
    layer.train()
    y = layer(x)
    g = torch.Generator().manual_seed(3)
    y.backward(torch.randn(y.shape, generator=g, dtype=y.dtype))
    return [y.detach(), x.grad, layer.snell_A["default"].grad, layer.snell_B["default"].grad, layer.coeffs().grad,
            layer.base_layer.weight.grad, layer.base_layer.bias.grad]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("d_in,d_out,mode,s,slices,block_rows,scaled", CASES)
def test_blocked_step_equals_dense_step(d_in, d_out, mode, s, slices, block_rows, scaled,
                                        transposed):
    """Outputs and gradients of x, A, B, the coefficients, W0 and b: blocked ('backward')
    against the whole-matrix path ('none'), fp32."""
    layer = _layer(d_in, d_out, mode=mode, s=s, slices=slices, block_rows=block_rows,
                   scale_slices=scaled, transposed=transposed)
    x = torch.randn(2, 5, d_in)
    blocked = _step(layer, x, "backward")
    dense = _step(layer, x, "none")
    names = ["y", "x", "A", "B", "coeffs", "W0", "b"]
    for name, got, want in zip(names, blocked, dense):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def _independent_reference(layer, x):
    """delta_W from the kernel's definition (explicit differences, float64 autograd)."""
    A, B, c = (t.detach().clone().requires_grad_(True) for t in
               (layer.snell_A["default"], layer.snell_B["default"], layer.coeffs()))
    dist = ((B[:, :, None, :] - A[:, None, :, :]) ** 2).sum(-1).sqrt()  # (P, d_out, d_in)
    K = (c[:, None, None] * dist).sum(0)
    delta = sparsify(K, layer.settings().sparsity, layer.settings().mode, layer.num_slices)
    W = layer._weight_oi().detach()
    x = x.clone().requires_grad_(True)
    y = x @ (W + delta).t() + layer.base_layer.bias.detach()
    g = torch.Generator().manual_seed(3)
    y.backward(torch.randn(y.shape, generator=g, dtype=y.dtype))
    return [y.detach(), x.grad, A.grad, B.grad, c.grad]


@pytest.mark.parametrize("d_in,d_out,mode,s,slices,block_rows,scaled", CASES)
def test_blocked_step_equals_kernel_definition_fp64(d_in, d_out, mode, s, slices, block_rows,
                                                    scaled):
    layer = _layer(d_in, d_out, mode=mode, s=s, slices=slices, block_rows=block_rows,
                   scale_slices=scaled, dtype=torch.float64)
    x = torch.randn(3, d_in, dtype=torch.float64)
    got = _step(layer, x, "backward")[:5]
    want = _independent_reference(layer, x)
    for name, a, b in zip(["y", "x", "A", "B", "coeffs"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_merge_unchanged_and_eval_matches_merged():
    layer = _layer(29, 150, block_rows=7)
    layer.eval()
    x = torch.randn(4, 29)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        out = layer(x)
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight, w0 + _dense_delta(layer), rtol=0,
                                   atol=0)
        torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_block_rows_follow_block_mb():
    layer = SnellLayer(nn.Linear(1024, 4096), SnellConfig(r=8, block_mb=2))
    assert layer.block_rows == 2 * 2**20 // (1024 * 4)
    assert SnellLayer(nn.Linear(1024, 4096), SnellConfig(r=8)).block_rows == 1024  # 4 MiB
    layer = SnellLayer(nn.Linear(1024, 4096), SnellConfig(r=8, block_mb=1e-6))
    assert layer.block_rows == 64  # at least one tile
    with pytest.raises(UpcycleError, match="block_mb must be a positive number"):
        SnellConfig(block_mb=0)


def test_default_block_size_follows_the_device():
    """block_mb=None: 4 MiB of rows on a CPU, 16 MiB on CUDA (where a step is bound by the
    number of small kernels), whole tiles of each device."""
    from upcycle.tune.snell import DEFAULT_BLOCK_MB
    from upcycle.tune.snell.kernel import _tile_rows
    from upcycle.tune.snell.layer import _block_rows

    assert SnellConfig().block_mb is None
    for device, mb in (("cpu", 4.0), ("cuda", 16.0), ("mps", 4.0)):
        rows = _block_rows(None, 1024, device)
        assert rows == _block_rows(mb, 1024, device)
        assert rows % _tile_rows(torch.device(device)) == 0
    assert DEFAULT_BLOCK_MB == {"cpu": 4.0, "cuda": 16.0}
    assert _block_rows(None, 1024, "cuda") == 4 * _block_rows(None, 1024, "cpu")


def test_transient_memory_is_bounded_by_the_block():
    """Live tensor bytes during one step: the blocked path stays within a few blocks, while
    the whole-matrix path holds several copies of delta_W."""
    d_in, d_out = 512, 2048
    weight_bytes = d_in * d_out * 4

    def peak(recompute, block_rows):
        torch.manual_seed(0)
        layer = SnellLayer(nn.Linear(d_in, d_out), SnellConfig(
            r=8, sparsity=0.5, dropout=0.0, drop_path=0.0, recompute=recompute))
        layer.block_rows = block_rows
        layer.base_layer.requires_grad_(False)  # frozen, as in a SnellModel
        layer.train()
        x = torch.randn(8, d_in, requires_grad=True)
        with LiveTensorBytes() as m:
            layer(x).sum().backward()
        return m.peak

    blocked = peak("backward", 128)  # blocks of 256 KiB, 1/16 of the weight
    dense = peak("none", 128)
    assert dense > 4 * weight_bytes
    assert blocked < 0.75 * weight_bytes, (blocked / weight_bytes, dense / weight_bytes)


def test_kernel_blocks_identical_in_every_pass():
    """The threshold and forward passes (kernel built in place in reused buffers) and the
    backward (distances kept, kernel in its own buffer) build bit-identical blocks, the
    same as the dense kernel's rows: the backward's mask is the forward's."""
    from upcycle.tune.snell.kernel import _kernel_rows, _padded_factors, _Scratch

    layer = _layer(29, 150, block_rows=64)
    A, B = layer.snell_A["default"].detach(), layer.snell_B["default"].detach()
    c = layer.coeffs().detach()
    pads = _padded_factors(A, B)
    dense = snell_kernel(A, B, c)
    fwd, bwd = _Scratch(), _Scratch()
    for o0, o1 in [(0, 64), (64, 128), (128, 150), (3, 70), (100, 150)]:
        in_place = _kernel_rows(pads, c, o0, o1, scratch=fwd).clone()
        dists: list = []
        kept = _kernel_rows(pads, c, o0, o1, dists, scratch=bwd)
        assert len(dists) == A.shape[0]
        assert torch.equal(in_place.view(torch.int32), dense[o0:o1].view(torch.int32))
        assert torch.equal(kept.view(torch.int32), dense[o0:o1].view(torch.int32))


# -- SnellConfig.compile: the kernel as one torch.compiled loop --------------------------------

needs_compiler = pytest.mark.skipif(
    not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")),
    reason="torch.compile on a CPU needs a C++ compiler")


def _compiled_layer(*args, **kwargs):
    layer = _layer(*args, **kwargs)
    layer.settings().compile = True
    return layer


@needs_compiler
def test_compiled_kernel_blocks_identical_in_every_pass():
    """With compile, every pass and the dense kernel build bit-identical rows (the tiles are
    on the same fixed grid), equal to the eager kernel's to rounding."""
    from upcycle.tune.snell.kernel import _kernel_rows, _padded_factors, _Scratch

    layer = _layer(29, 150, block_rows=64)
    A, B = layer.snell_A["default"].detach(), layer.snell_B["default"].detach()
    c = layer.coeffs().detach()
    pads = _padded_factors(A, B, compiled=True)
    dense = snell_kernel(A, B, c, compiled=True)
    torch.testing.assert_close(dense, snell_kernel(A, B, c), rtol=1e-6, atol=1e-6)
    eager_dists: list = []
    _kernel_rows(_padded_factors(A, B), c, 0, 150, eager_dists)
    fwd, bwd = _Scratch(), _Scratch()
    for o0, o1 in [(0, 64), (64, 128), (128, 150), (3, 70), (100, 150)]:
        in_place = _kernel_rows(pads, c, o0, o1, scratch=fwd).clone()
        dists: list = []
        kept = _kernel_rows(pads, c, o0, o1, dists, scratch=bwd)
        assert torch.equal(in_place.view(torch.int32), dense[o0:o1].view(torch.int32))
        assert torch.equal(kept.view(torch.int32), dense[o0:o1].view(torch.int32))
        for got, want in zip(dists, eager_dists):
            torch.testing.assert_close(got, want[o0:o1], rtol=1e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("d_in,d_out,mode,s,slices,block_rows,scaled",
                         [CASES[0], CASES[2], CASES[4]])
def test_compiled_blocked_mask_is_the_dense_kthvalue_mask(d_in, d_out, mode, s, slices,
                                                          block_rows, scaled):
    layer = _compiled_layer(d_in, d_out, mode=mode, s=s, slices=slices, block_rows=block_rows,
                            scale_slices=scaled)
    with torch.no_grad():
        K = snell_kernel(layer.snell_A["default"], layer.snell_B["default"], layer.coeffs(), compiled=True)
        dense = sparsify(K, s, mode, slices)
        blocked = torch.cat([delta for _, _, delta in layer._delta_blocks()])
    assert torch.equal(blocked, dense)
    assert torch.equal(layer.delta_weight().detach(), dense)


@needs_compiler
@pytest.mark.parametrize("transposed", [False, True])
def test_compiled_step_equals_eager_step(transposed):
    """Outputs and every gradient, fp32: compile changes the kernel's last bits only."""
    kwargs = dict(mode="reference", s=0.5, slices=3, block_rows=5, scale_slices=True,
                  transposed=transposed)
    x = torch.randn(2, 5, 17)
    eager = _step(_layer(17, 3 * 37, **kwargs), x, "backward")
    compiled = _step(_compiled_layer(17, 3 * 37, **kwargs), x, "backward")
    for name, got, want in zip(["y", "x", "A", "B", "coeffs", "W0", "b"], compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_compiler
def test_compiled_step_equals_kernel_definition_fp64():
    layer = _compiled_layer(29, 150, mode="paper", s=0.7, block_rows=64, dtype=torch.float64)
    x = torch.randn(3, 29, dtype=torch.float64)
    got = _step(layer, x, "backward")[:5]
    want = _independent_reference(layer, x)
    for name, a, b in zip(["y", "x", "A", "B", "coeffs"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_compiler
def test_compiled_merge_is_the_dense_delta():
    layer = _compiled_layer(29, 150, block_rows=7)
    layer.eval()
    x = torch.randn(4, 29)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        out = layer(x)
        layer.merge()
        assert torch.equal(layer.base_layer.weight, w0 + layer.delta_weight())
        torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)


def test_compile_setting_is_checked_saved_and_its_failure_named(monkeypatch):
    from upcycle.tune.snell import compiled as compiled_module

    with pytest.raises(UpcycleError, match="compile must be true or false"):
        SnellConfig(compile="yes")
    assert SnellConfig.from_dict(SnellConfig(compile=True).to_dict()).compile is True
    assert SnellConfig.from_dict({"r": 8}).compile is False  # adapters saved before the field

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(compiled_module, "_COMPILED_FUSED", broken)
    layer = _compiled_layer(29, 150)
    with pytest.raises(UpcycleError, match=r"compile=True: torch.compile failed on this "
                                           r"machine \(RuntimeError: InvalidCxxCompiler.*"
                                           r"Set compile=False"):
        layer(torch.randn(2, 29))


# -- ThresholdHint: a guessed window, never a guessed threshold -----------------------------

@pytest.mark.parametrize("slices", [1, 3])
def test_threshold_hint_gives_the_exact_threshold_while_training(slices):
    """Over AdamW steps the layer looks for each tau in a window around the extrapolated
    one; every threshold it uses is the exact kthvalue (bit for bit the un-hinted radix
    select's), and the window is actually used (hits), so this path is what is tested."""
    from upcycle.tune.snell import ThresholdHint

    layer = _layer(48, 3 * 64, slices=slices, block_rows=16, seed=1)
    opt = torch.optim.AdamW([layer.snell_A["default"], layer.snell_B["default"]], lr=1e-3)
    x = torch.randn(4, 48)
    A, B, c = layer.snell_A["default"], layer.snell_B["default"], layer.coeffs()
    for _ in range(25):
        plain = snell_thresholds(A, B, c, layer.settings().sparsity, slices, layer.block_rows)
        layer(x).pow(2).mean().backward()  # the forward records the tau it used
        assert layer.threshold_hint["default"].last == plain.tolist()
        opt.step()
        opt.zero_grad()
    assert layer.threshold_hint["default"].hits > 5
    # a guess far off (a reloaded or re-initialised adapter): a miss, still exact
    hint = ThresholdHint()
    hint.last = hint.before = [float(layer.threshold_hint["default"].last[0]) * 10] * slices
    hint.errors, hint.width = [0.0], ThresholdHint.MIN_WINDOW
    hinted = snell_thresholds(A, B, c, layer.settings().sparsity, slices, layer.block_rows, hint=hint)
    assert hint.misses == 1
    assert torch.equal(hinted, snell_thresholds(A, B, c, layer.settings().sparsity, slices,
                                                layer.block_rows))


def test_threshold_hint_is_not_state():
    """Not in the state dict (an adapter saves A and B only), and a copy of the layer
    carries its own."""
    import copy

    layer = _layer(16, 64, block_rows=8)
    layer.train()
    layer(torch.randn(2, 16)).sum().backward()
    assert layer.threshold_hint["default"].last is not None
    assert not any("hint" in key for key in layer.state_dict())
    twin = copy.deepcopy(layer)
    assert twin.threshold_hint["default"] is not layer.threshold_hint["default"]


@needs_compiler
def test_compiled_layer_stays_compiled_after_a_dispatch_mode():
    """dynamo skips a compiled function called under a TorchDispatchMode and keeps skipping
    it afterwards; the layer runs its passes as plain operations under a mode instead, so a
    step measured with LiveTensorBytes (or a FLOP counter) leaves the compiled path intact."""
    from torch.profiler import profile

    layer = _compiled_layer(32, 96, block_rows=64)
    x = torch.randn(3, 32)

    def compiled_calls():
        with profile() as prof:
            y = layer(x)
            y.sum().backward()
        return y.detach(), sum("Compiled" in e.key for e in prof.key_averages())

    before, calls = compiled_calls()
    assert calls > 0
    with LiveTensorBytes():
        under = layer(x).detach()
    torch.testing.assert_close(under, before, rtol=1e-5, atol=1e-6)
    after, calls = compiled_calls()
    assert calls > 0
    assert torch.equal(after, before)
