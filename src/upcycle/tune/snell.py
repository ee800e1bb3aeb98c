"""SNELL: sparse tuning with kernelized LoRA (Shen et al., NeurIPS 2024; spec: specs/snell.md).

Each adapted linear map ``W0`` (``d_out x d_in``) gets two low-rank factors split into
``P`` pieces, ``A`` (``P x d_in x r/P``) and ``B`` (``P x d_out x r/P``). The update is a
kernel of them,

    K[i, j] = sum_p c_p * ||A_p[i] - B_p[j]||_2,      delta_W = K^T   (d_out x d_in),

which is generally full rank, sparsified afresh every forward pass by competition: the
``sparsity`` fraction of entries with the smallest ``|K|`` (per matrix; per part of a fused
projection: its q, k and v rows, or gate and up, where the architecture map's layout puts
them) is zeroed and the survivors are scaled by their own detached magnitude
(``reference`` mode, the released code) or soft-thresholded (``paper`` mode, Eq. 5).

By default ``delta_W`` is never whole: the kernel is separable by output rows, so the layer
builds it a block of rows at a time (``SnellConfig.block_mb``), for the exact threshold (the
same value as ``kthvalue``, one per part: found in a narrow window around the value that
the last steps' thresholds predict, else by a radix select over the float bits), for the
product with the input, and again in backward, which rebuilds each block from A and B.
Nothing of size ``d_out x d_in`` is stored for backward or kept between steps, and no
more than a block of it exists at any time.

The interface follows HuggingFace peft::

    model = get_snell_model(hf_model, SnellConfig(r=8, sparsity=0.5))
    model.print_trainable_parameters()
    ... train ...
    model.save_pretrained("adapter")                       # adapter_config.json + safetensors
    model = SnellModel.from_pretrained(fresh_hf_model, "adapter")
    merged = model.merge_and_unload()                      # a plain HF model again
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UpcycleError
from .adapter import (
    TunerConfig,
    check_tensor_shapes,
    find_modules,
    load_adapter,
    save_adapter,
    trainable_report,
)

METHOD = "snell"
DEFAULT_LR = 3e-3
"""The peak learning rate ``upcycle tune --method snell`` uses unless told otherwise.

The reference recipe's is 1e-3 (AdamW, ViT-B/16 on VTAB-1k). SNELL starts from a nearly
zero update: with both factors kaiming-initialised and c = (+0.1, -0.1), the kernel's
entries are tiny and the reference sparsification squares them (K * |K|), so on the real
MiniLM delta_W starts with mean |entry| 3e-6 against 0.07 for W0, and the gradient of each
surviving entry is scaled by its own magnitude: at 1e-3 SNELL is slow to start.
``benchmarks/tune_accuracy.py`` (MiniLM on BBC News, 32 tokens, 3 seeds, trained until
held-out accuracy stops improving) picked 3e-3 from the grid {3e-4, 1e-3, 3e-3}: held-out
accuracy 0.948 / 0.956 / 0.962, test 0.957 at 3e-3 (peft LoRA's own best: 0.931 on q,v,
0.950 on all linear layers). Tune it on your task; this is a start, not a law."""
SPARSIFY_MODES = ("reference", "paper")
RECOMPUTE_MODES = ("backward", "checkpoint", "none")

# Default targets and fused layouts come from the architecture map
# (upcycle.models.architectures: snell_target_modules, model_fused_layouts). Families SNELL adapts
# that the map does not describe (no other method supports them) keep their SNELL-only
# defaults here: ELECTRA has BERT's layer layout, DeiT ViT's.
UNMAPPED_TARGET_MODULES: dict[str, list[str]] = {
    "electra": ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"],
    "deit": ["attention.attention.query", "attention.attention.key",
             "attention.attention.value", "attention.output.dense", "intermediate.dense",
             "output.dense"],
}

# Fused [q; k; v] projections of models outside the map (timm's ``qkv``), split into equal
# thirds when ``SnellConfig.fused_qkv`` is None. Mapped families take their layout (GQA
# sizes, interleaving, gate/up) from the map.
UNMAPPED_FUSED_QKV = ["c_attn", "qkv"]

# Classification heads trained (and saved) with the adapter when modules_to_save is None.
HEAD_NAMES = ("classifier", "score", "head", "lm_head")


@dataclass
class SnellConfig(TunerConfig):
    """Configuration of a SNELL adapter (field names follow peft where peft has one)."""

    r: int = 8
    """Rank of the two factors A (d_in x r) and B (d_out x r); trainable count r*(d_in+d_out)
    per matrix, as LoRA-r. Must be divisible by ``num_pieces``."""
    num_pieces: int = 2
    """Pieces P of the piecewise-linear kernel; each piece uses r/P columns of A and B."""
    piece_coeffs: tuple[float, ...] = (0.1, -0.1)
    """Coefficient c_p of each piece (one per piece); opposite signs let entries of delta_W
    take both signs."""
    learnable_coeffs: bool = False
    """Train the piece coefficients too (the paper); the released code keeps them fixed."""
    sparsity: float = 0.5
    """Fraction of the entries of each delta_W zeroed every step, in [0, 1); 0 gives dense
    kernelized LoRA (delta_W = K)."""
    sparsify_mode: str = "reference"
    """'reference': K * |K| on the top entries (the released code, reproduces the paper's
    tables); 'paper': K * max(|K| - tau, 0) (Eq. 5's soft threshold)."""
    target_modules: list[str] | str | None = None
    """Modules to adapt: a list of names (matching the full dotted name or its ending) or one
    regex matching whole names. None: the default set for the model family."""
    modules_to_save: list[str] | None = None
    """Other modules trained in full and saved with the adapter (the task head). None: the
    classification head if the model has one ('classifier', 'score', 'head'); a language
    model's head (its output embedding, tied to the input embedding on GPT-2) stays frozen;
    [] for none."""
    fused_qkv: list[str] | str | None = None
    """Fused projections are sparsified per part (a separate threshold for the q, k and v
    rows, and for gate and up, wherever the layout puts them). The parts of a mapped
    family's fused projections (GPT-2's c_attn, Phi-3's qkv_proj with its GQA sizes and
    gate_up_proj, GPT-NeoX's interleaved query_key_value) come from the architecture map.
    This field names further adapted modules, outside the map, that are [q; k; v] stacked in
    equal thirds (same matching rule as target_modules); None: ``UNMAPPED_FUSED_QKV``."""
    dropout: float = 0.1
    """Dropout on the adapter's input (reference recipe: 0.1)."""
    drop_path: float = 0.1
    """DropPath (per-sample stochastic depth) on the adapter's output (reference: 0.1)."""
    recompute: str | bool = "backward"
    """How delta_W is computed and kept out of memory. 'backward' (default): block by block
    (``block_mb``), in forward and in a backward that rebuilds each block from A and B; saves
    x, A, B and one threshold per part, and never holds more than a block of delta_W, its
    kernel, mask and gradient at once (also in eval). The two unblocked paths, which build the
    whole delta_W at once (a transient of several times the weight) and are kept to compare
    against: 'checkpoint': the layer inside a non-reentrant torch.utils.checkpoint (recomputes
    delta_W and the layer's matmul in backward); 'none' (or False): plain autograd, which
    stores delta_W and the mask for backward. True = 'backward'."""
    block_mb: float | None = None
    """Size in MiB of the block of delta_W's rows (rows x d_in values, 4 bytes each, rounded
    down to whole 64-row tiles, at least one) that the 'backward' path builds at once; a
    layer's transient memory is about six such blocks (the kernel's per-piece distances, the
    block, its mask term, its gradient). None (default): ``DEFAULT_BLOCK_MB`` of the layer's
    device, 4 MiB on a CPU and 16 MiB on CUDA, where a step is bound by the number of small
    kernels rather than by memory traffic (measured on an H100, Linear(4096 -> 11008): 56 ms
    per step at 4 MiB, 33 ms at 16 MiB, for 0.06x and 0.31x the weight above peft LoRA)."""
    compile: bool = False
    """Run each pass's elementwise work on a block (the kernel, |K| for the threshold, the
    mask and ``W0 + delta`` in forward; in backward also the gradient's mask and its
    division by the distances) as one ``torch.compile``d loop over the block's entries,
    instead of about twenty torch operations each reading and writing the whole block. A
    row's values do not depend on the block or the pass that computes it, so the masks stay
    exact and identical between passes; they differ from the eager kernel's in the last
    bits (~1e-7 relative), so keep the setting for a trained adapter (it is saved with it).
    Needs a working ``torch.compile`` (a C++ compiler on a CPU, triton on CUDA) and costs a
    one-time compile per pass, layer width and process (seconds each on a CPU); off by
    default for that reason, worth it on wide layers: on the benchmark CPU it takes a step of
    the Linear(4096 -> 11008) from 2.97x to 2.44x peft LoRA's at 256 tokens, 1.82x to 1.69x
    at 1024 (x needing a gradient; ``benchmarks/snell_spike.py --input-grad``)."""

    def __post_init__(self) -> None:
        self.piece_coeffs = tuple(float(c) for c in self.piece_coeffs)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise UpcycleError(f"SNELL r must be a positive integer, got {self.r!r}")
        if not isinstance(self.num_pieces, int) or self.num_pieces < 1:
            raise UpcycleError(f"SNELL num_pieces must be a positive integer, got "
                               f"{self.num_pieces!r}")
        if self.r % self.num_pieces:
            raise UpcycleError(f"SNELL r={self.r} is not divisible by num_pieces="
                               f"{self.num_pieces} (each piece takes r/num_pieces columns)")
        if len(self.piece_coeffs) != self.num_pieces:
            raise UpcycleError(f"SNELL piece_coeffs has {len(self.piece_coeffs)} values, "
                               f"num_pieces={self.num_pieces} needs one per piece")
        if not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise UpcycleError(f"SNELL sparsity must be in [0, 1) (the fraction of entries "
                               f"zeroed), got {self.sparsity!r}")
        if self.sparsify_mode not in SPARSIFY_MODES:
            raise UpcycleError(f"SNELL sparsify_mode must be one of {SPARSIFY_MODES}, got "
                               f"{self.sparsify_mode!r}")
        for name in ("dropout", "drop_path"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise UpcycleError(f"SNELL {name} must be in [0, 1), got {value!r}")
        if self.recompute is True:
            self.recompute = "backward"
        elif self.recompute is False:
            self.recompute = "none"
        if self.recompute not in RECOMPUTE_MODES:
            raise UpcycleError(f"SNELL recompute must be one of {RECOMPUTE_MODES}, got "
                               f"{self.recompute!r}")
        if self.block_mb is not None and not (
                isinstance(self.block_mb, (int, float)) and self.block_mb > 0):
            raise UpcycleError(f"SNELL block_mb must be a positive number of MiB, got "
                               f"{self.block_mb!r}")
        if not isinstance(self.compile, bool):
            raise UpcycleError(f"SNELL compile must be true or false, got {self.compile!r}")
        if isinstance(self.target_modules, str):
            _check_regex(self.target_modules, "target_modules")
        if isinstance(self.fused_qkv, str):
            _check_regex(self.fused_qkv, "fused_qkv")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["piece_coeffs"] = list(self.piece_coeffs)
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "adapter config") -> SnellConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UpcycleError(f"{source}: unknown SNELL config field(s) {unknown}")
        return cls(**d)


def _check_regex(pattern: str, argument: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UpcycleError(f"SNELL {argument}: {pattern!r} is not a valid regex: {exc}") from exc


# -- the kernel and the competition mask --------------------------------------------------

# The kernel's distances are computed in tiles of this many rows of delta_W (output
# features), aligned to row 0, whichever rows a caller asks for: every entry then comes from
# the same matrix product whether the whole matrix or a block of rows is built, so the
# blocked path and the dense reference agree bit for bit (and so do their masks). Larger
# tiles off the CPU, where each product is a kernel launch.
KERNEL_TILE_ROWS = 64
KERNEL_TILE_ROWS_ACCELERATOR = 512


def _tile_rows(device: torch.device) -> int:
    return KERNEL_TILE_ROWS if device.type == "cpu" else KERNEL_TILE_ROWS_ACCELERATOR


class _Pads(list):
    """The per-piece ``(B_pad, A_pad^T)`` of :func:`_padded_factors`, and whether the kernel
    is computed by the compiled tile function (``compiled``)."""

    compiled = False


def _padded_factors(A: torch.Tensor, B: torch.Tensor, compiled: bool = False):
    """Per piece, the factors of ``||b - a||^2 = |b|^2 - 2 b.a + |a|^2`` as one product
    (torch.cdist's matrix-product form): ``B_pad`` (d_out x r/P+2), ``A_pad^T`` (r/P+2 x d_in).
    ``compiled``: :func:`_kernel_rows` evaluates them with the compiled tile function."""
    pads = _Pads()
    pads.compiled = bool(compiled)
    for p in range(A.shape[0]):
        a, b = A[p], B[p]
        a_norm = a.pow(2).sum(-1, keepdim=True)
        b_norm = b.pow(2).sum(-1, keepdim=True)
        b_pad = torch.cat([b.mul(-2), b_norm, torch.ones_like(b_norm)], dim=-1)
        a_pad = torch.cat([a, torch.ones_like(a_norm), a_norm], dim=-1)
        pads.append((b_pad, a_pad.t().contiguous()))
    return pads


class _Scratch:
    """Buffers reused from block to block within one pass (forward, backward, threshold):
    a fresh 4 MiB tensor per elementwise op costs more than the op itself on a CPU (page
    faults and zeroing). ``get(name, rows, cols, like)`` returns a (rows x cols) view of the
    named flat buffer, grown when needed."""

    def __init__(self):
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        n = rows * cols
        buf = self.store.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = like.new_empty(n, dtype=dtype)
            self.store[name] = buf
        return buf[:n].view(rows, cols)


def _distances(pad, o0: int, o1: int, scratch: _Scratch | None = None, name: str = "d"
               ) -> torch.Tensor:
    """``||B_p[o] - A_p[i]||`` for the rows o0 <= o < o1 (o1 - o0 rows x d_in), computed tile
    by tile on the fixed row grid (see KERNEL_TILE_ROWS), into ``scratch``'s buffer ``name``
    when given."""
    b_pad, a_pad_t = pad
    d_out, T = b_pad.shape[0], _tile_rows(b_pad.device)
    t0, t1 = o0 - o0 % T, min(d_out, -(-o1 // T) * T)
    if scratch is None:
        out = b_pad.new_empty((t1 - t0, a_pad_t.shape[1]))
    else:
        out = scratch.get(name, t1 - t0, a_pad_t.shape[1], b_pad)
    for j in range(t0, t1, T):
        torch.mm(b_pad[j:j + T], a_pad_t, out=out[j - t0:j - t0 + T])
    out = out[o0 - t0:o1 - t0] if (o0, o1) != (t0, t1) else out
    return out.clamp_min_(1e-30).sqrt_()


def _kernel_tile(b_pads: list[torch.Tensor], a_pads_t: list[torch.Tensor],
                 coeffs: torch.Tensor):
    """Rows of K^T and their per-piece distances, written as one expression over the entries
    for ``torch.compile``: ``d_p = sqrt(max(B_pad_p . A_pad_p, 1e-30))`` (the matrix product
    as a sum over its r/P + 2 columns) and ``K = sum_p c_p d_p``."""
    K, dists = None, []
    for p, (b, a) in enumerate(zip(b_pads, a_pads_t)):
        d = (b.unsqueeze(2) * a.unsqueeze(0)).sum(1).clamp_min(1e-30).sqrt()
        dists.append(d)
        K = d * coeffs[p] if K is None else K + d * coeffs[p]
    return K, dists


def _fused_block(b_pads, a_pads_t, coeffs, tau, weight, grad, mode: str, want: str,
                 need_w: bool, need_h: bool, need_c: bool, out_dtype: torch.dtype | None):
    """Every elementwise step of one pass over a block of rows, as one expression for
    ``torch.compile`` (one loop over the entries, nothing of the block written but the
    outputs), from :func:`_kernel_tile`'s K and distances:

    - ``'kernel'``: K; ``'distances'``: (K, the per-piece distances);
    - ``'magnitude'``: |K| (the threshold's passes);
    - ``'delta'``: ``[weight +] K * factor`` in ``out_dtype`` (forward, merge), where factor
      is the competition term of ``mode`` given the rows' threshold ``tau`` (None: no
      sparsification, delta = K);
    - ``'backward'``: ``(w, H, gc)`` given ``grad``, the gradient of delta's rows: w =
      ``delta [+ weight]`` in out_dtype for the input's gradient (``need_w``), per piece
      ``H_p = grad * factor / d_p`` (``need_h``) and ``gc_p = sum(grad * factor * d_p)``
      (``need_c``), from which :func:`_kernel_grads_from_h` and the caller form the factors'
      and coefficients' gradients."""
    K, dists = _kernel_tile(b_pads, a_pads_t, coeffs)
    if want == "kernel":
        return K
    if want == "distances":
        return K, dists
    if want == "magnitude":
        return K.abs()
    factor = None
    if tau is not None:
        m = K.abs()
        factor = m * (m > tau) if mode == "reference" else (m - tau.clamp_min(0)).clamp_min(0)
    delta = K if factor is None else K * factor
    if want == "delta":
        return (delta if weight is None else weight.to(K.dtype) + delta).to(out_dtype)
    w = H = gc = None
    if need_w:
        w = delta.to(out_dtype)
        if weight is not None:
            w = w + weight.to(out_dtype)
    if need_h or need_c:
        gf = grad if factor is None else grad * factor  # the magnitude term is detached
        if need_h:
            H = [gf / d for d in dists]
        if need_c:
            gc = [(gf * d).sum() for d in dists]
    return w, H, gc


_COMPILED_FUSED = None
RECOMPILE_LIMIT = 64
"""torch._dynamo's recompile limit is raised to at least this when SNELL first compiles:
each pass kind, layer width, dtype and threshold layout is a graph of its own (the rows are
dynamic), and dynamo's default of 8 would silently run the rest eagerly."""


def _compiled_fused():
    global _COMPILED_FUSED
    if _COMPILED_FUSED is None:
        import torch._dynamo

        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        # The number of rows is dynamic (one graph serves every block of a layer), the width
        # static (the inner loop is vectorised for it); a row's values do not depend on the
        # block it is computed in, so every pass builds bit-identical rows.
        _COMPILED_FUSED = torch.compile(_fused_block, dynamic=None)
    return _COMPILED_FUSED


def _dispatch_mode_active() -> bool:
    from torch.utils import _python_dispatch

    on_stack = getattr(_python_dispatch, "any_torch_dispatch_mode_on_stack", None)
    return on_stack() if on_stack is not None else torch._C._len_torch_dispatch_stack() > 0


def _fused_rows(pads, coeffs: torch.Tensor, o0: int, o1: int, want: str, *,
                tau: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                grad: torch.Tensor | None = None, mode: str = "reference",
                need_w: bool = False, need_h: bool = False, need_c: bool = False,
                out_dtype: torch.dtype | None = None):
    """:func:`_fused_block` (compiled) on rows o0:o1 of delta_W; ``weight``, ``grad`` and a
    per-row ``tau`` are those rows' slices."""
    import torch._dynamo

    b_pads = [b[o0:o1] for b, _ in pads]
    rowwise = [*b_pads, weight, grad, tau if tau is not None and tau.dim() else None]
    for t in rowwise:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    # Under a TorchDispatchMode (a FLOP counter, upcycle.runtime.memory.LiveTensorBytes...) dynamo
    # does not compile, and it would mark the function to be skipped for good: run it as
    # plain torch operations there (the same values to rounding, every pass alike).
    fn = _fused_block if _dispatch_mode_active() else _compiled_fused()
    try:
        return fn(b_pads, [a for _, a in pads], coeffs, tau, weight, grad, mode, want,
                  need_w, need_h, need_c, out_dtype)
    except UpcycleError:
        raise
    except Exception as err:  # inductor's errors (no compiler, no triton) have many types
        raise UpcycleError(
            f"SNELL compile=True: torch.compile failed on this machine ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); it needs a C++ "
            f"compiler on a CPU and triton on CUDA. Set compile=False (the eager kernel; "
            f"an adapter trained with compile=True then differs in the last bits)") from err


@torch.no_grad()
def _kernel_rows(pads, coeffs: torch.Tensor, o0: int, o1: int, dists: list | None = None,
                 scratch: _Scratch | None = None) -> torch.Tensor:
    """Rows o0:o1 of ``delta_W = K^T`` (sum_p c_p * dist_p). With ``dists`` (a list), the
    per-piece distances are appended to it (for the backward); otherwise they are reused.
    With ``scratch``, everything is written into its buffers ('d0', 'd1', ..., 'K', 'm'),
    valid until the next call with the same scratch. ``pads.compiled``: by the compiled
    :func:`_fused_block`."""
    if getattr(pads, "compiled", False):
        if dists is None:
            return _fused_rows(pads, coeffs, o0, o1, "kernel")
        K, ds = _fused_rows(pads, coeffs, o0, o1, "distances")
        dists.extend(ds)
        return K
    K = None
    for p, pad in enumerate(pads):
        d = _distances(pad, o0, o1, scratch, f"d{p}")
        if dists is not None:
            dists.append(d)
            if scratch is None:
                term = d * coeffs[p]
            else:
                term = torch.mul(d, coeffs[p], out=scratch.get(
                    "K" if K is None else "m", o1 - o0, d.shape[1], d))
        else:
            term = d.mul_(coeffs[p])
        if K is None:
            K = term
        else:
            K.add_(term)  # the same two roundings as K + d * c, in every path
        del term
    return K


@torch.no_grad()
def _kernel_grads_rows(A, B, coeffs, dists, grad_K, o0: int, o1: int, grad_A, grad_B,
                       grad_c, a_ones_t=None) -> None:
    """Accumulate the gradients of ``sum(grad_K * K[o0:o1])`` into grad_A (P x d_in x q),
    grad_B (P x d_out x q) and grad_c (P,) (each may be None); consumes ``dists`` (divided
    in place). d||b - a||/db = (b - a)/||b - a|| (torch.cdist's matrix-product backward)."""
    H = []
    for p in range(A.shape[0]):
        d = dists[p]
        dists[p] = None
        if grad_c is not None:
            grad_c[p] += torch.dot(grad_K.reshape(-1), d.reshape(-1))
        if grad_A is not None or grad_B is not None:
            H.append(torch.div(grad_K, d, out=d))  # grad / dist, in place; c_p comes later
        del d
    if H:
        _kernel_grads_from_h(A, B, coeffs, H, o0, o1, grad_A, grad_B, a_ones_t)


@torch.no_grad()
def _kernel_grads_from_h(A, B, coeffs, H, o0: int, o1: int, grad_A, grad_B,
                         a_ones_t=None) -> None:
    """The factors' gradients from ``H_p = grad_K / dist_p`` (rows o0:o1, one per piece;
    consumed): ``c_p (b * sum_i H - H @ a)`` into grad_B's rows and ``c_p (a * sum_o H -
    H^T @ b)`` into grad_A, each sum as one more column of a product. ``a_ones_t``: per piece
    ``[A_p, 1]^T`` (q+1 x d_in), from :func:`_a_ones_t`."""
    if a_ones_t is None:
        a_ones_t = _a_ones_t(A)
    for p in range(A.shape[0]):
        h = H[p]
        H[p] = None
        a, b = A[p], B[p, o0:o1]
        if grad_B is not None:
            HA = torch.mm(h, a_ones_t[p].t())  # (rows x q+1); faster than H @ [a, 1]
            grad_B[p, o0:o1] += (b * HA[:, -1:] - HA[:, :-1]) * coeffs[p]
        if grad_A is not None:  # ([b, 1]^T @ H)^T: H read row by row
            b_ones_t = torch.cat([b, b.new_ones((b.shape[0], 1))], dim=1).t()
            HB = torch.mm(b_ones_t, h).t()  # (d_in x q+1)
            grad_A[p] += (a * HB[:, -1:] - HB[:, :-1]) * coeffs[p]
        del h


def _a_ones_t(A: torch.Tensor) -> list[torch.Tensor]:
    """Per piece, ``[A_p, 1]^T`` (q+1 x d_in, contiguous) for :func:`_kernel_grads_from_h`."""
    return [torch.cat([a, a.new_ones((a.shape[0], 1))], dim=1).t().contiguous() for a in A]


class _Kernel(torch.autograd.Function):
    """The dense kernel ``K^T`` with the same arithmetic as the blocked path; its backward
    recomputes the distances instead of storing them."""

    @staticmethod
    def forward(ctx, A, B, coeffs, compiled):
        ctx.save_for_backward(A, B, coeffs)
        ctx.compiled = compiled
        return _kernel_rows(_padded_factors(A, B, compiled), coeffs, 0, B.shape[1])

    @staticmethod
    def backward(ctx, grad_K):
        A, B, coeffs = ctx.saved_tensors
        need_a, need_b, need_c = ctx.needs_input_grad[:3]
        dists: list = []
        _kernel_rows(_padded_factors(A, B, ctx.compiled), coeffs, 0, B.shape[1], dists)
        grads = (torch.zeros_like(A) if need_a else None, torch.zeros_like(B) if need_b else None,
                 torch.zeros_like(coeffs) if need_c else None)
        _kernel_grads_rows(A, B, coeffs, dists, grad_K.to(A.dtype), 0, B.shape[1], *grads)
        return (*grads, None)


def snell_kernel(A: torch.Tensor, B: torch.Tensor, coeffs: torch.Tensor,
                 compiled: bool = False) -> torch.Tensor:
    """The dense update ``K^T`` (d_out x d_in) with K[i, j] = sum_p c_p ||A_p[i] - B_p[j]||_2.

    ``A``: (P, d_in, r/P); ``B``: (P, d_out, r/P); ``coeffs``: (P,). Differentiable in all
    three. Entry for entry the same values as the blocked path of :class:`SnellLayer` with
    the same ``compiled`` (``SnellConfig.compile``).
    """
    coeffs = coeffs.to(A.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (A, B, coeffs)):
        return _Kernel.apply(A, B, coeffs, compiled)
    return _kernel_rows(_padded_factors(A, B, compiled), coeffs, 0, B.shape[1])


def _num_zeroed(sparsity: float, numel: int) -> int:
    return min(numel - 1, math.floor(sparsity * numel + 1e-9)) if numel else 0


_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


@torch.no_grad()
def kthvalue_blocked(chunks, k: int, n: int | None = None, window: float = 0.01
                     ) -> torch.Tensor:
    """The k-th smallest (1-based) of the non-negative floats yielded by ``chunks()``, bit
    for bit what ``torch.kthvalue`` returns on their concatenation, without holding them all.

    A radix select over the bit patterns (monotone in the value for non-negative floats):
    ``chunks()`` yields the same values (in any blocking) each time it is called; each call
    counts one 16-bit digit of the entries that share the digits found so far.

    With ``n`` (the number of values), the first call also collects the candidates near
    the k/n quantile of the first chunk (about ``2 * window * n`` values, at most as many as
    the largest chunk holds): when the k-th value is among them (it is unless the first
    chunk misjudged the quantile, or ties crowd the window), ``kthvalue`` on the candidates
    gives it in one call of ``chunks()`` instead of two (fp32). Returns a 0-dim tensor of the
    chunks' dtype and device.
    """
    prefix = rank = None
    dtype = None
    nbits = 0
    shift = None
    candidates: list | None = [] if n else None
    window_bins = None
    collected = cap = 0
    while shift is None or shift > 0:
        counts = None
        for chunk in chunks():
            if counts is None:
                dtype, device = chunk.dtype, chunk.device
                nbits = 8 * chunk.element_size()
                if shift is None:
                    shift = nbits
                    prefix = torch.zeros((), dtype=torch.int64, device=device)
                    rank = torch.full((), k, dtype=torch.int64, device=device)
                counts = torch.zeros(65538, dtype=torch.int64, device=device)
            bits = chunk.reshape(-1).view(_INT_VIEW[chunk.element_size()])
            if bits.dtype == torch.int16:
                bits = bits.to(torch.int32)
            if shift == nbits:  # the top digit (the sign bit is 0): bins 1 .. 32768
                digit = (bits >> (shift - 16)).add_(1)
            else:
                # Only the entries whose higher digits are the prefix count: bins 1 .. 65536;
                # those below go to bin 0 and those above to bin 65537.
                digit = bits - (prefix << shift).to(bits.dtype)
                digit = digit.clamp_(-1, 1 << shift).bitwise_right_shift_(shift - 16).add_(1)
            here = torch.bincount(digit, minlength=65538)
            counts += here
            if candidates is not None:
                cap = max(cap, digit.numel())
                if window_bins is None:  # the bins around the first chunk's k/n quantile
                    cum_here = here.cumsum(0)
                    q = k / n
                    ranks = torch.tensor([max(0.0, q - window), min(1.0, q + window)],
                                         dtype=torch.float64, device=device) * digit.numel()
                    window_bins = torch.searchsorted(cum_here, ranks.ceil().clamp_min(1).to(
                        torch.int64))
                inside = (digit >= window_bins[0]) & (digit <= window_bins[1])
                found = chunk.reshape(-1)[inside]
                collected += found.numel()
                candidates.append(found)
                if collected > cap:  # ties or a poor guess crowd the window: give up
                    candidates = None
                del inside, found
            del bits, digit, here
        if counts is None:
            raise UpcycleError("kthvalue_blocked: chunks() yielded no values")
        if shift == nbits and candidates is not None:
            cum_full = counts.cumsum(0)
            if int(cum_full[-1]) < k:
                raise UpcycleError(f"kthvalue_blocked: k={k} but only {int(cum_full[-1])} "
                                   f"values")
            lo, hi = window_bins
            below = int(cum_full[lo - 1])
            if below < k <= int(cum_full[hi]):  # the k-th is a candidate
                return torch.cat(candidates).kthvalue(k - below).values
        candidates = None
        counts = counts[1:65537]
        cum = counts.cumsum(0)
        if shift == nbits and int(cum[-1]) < k:
            raise UpcycleError(f"kthvalue_blocked: k={k} but only {int(cum[-1])} values")
        value = torch.searchsorted(cum, rank.reshape(1)).reshape(())
        rank = rank - (cum[value] - counts[value])
        prefix = (prefix << 16) | value
        shift -= 16
    int_dtype = _INT_VIEW[torch.empty((), dtype=dtype).element_size()]
    return prefix.to(int_dtype).reshape(1).view(dtype).reshape(())


@dataclass(frozen=True)
class RowParts:
    """The parts of a fused projection's output rows (nn.Linear orientation), each sparsified
    with its own threshold: per part, its rows as contiguous runs ``(start, end)``. Built by
    :func:`row_parts` from a number of equal stacked slices or from row indices per part
    (``FusedLayout.indices()`` of the architecture map)."""

    runs: tuple[tuple[tuple[int, int], ...], ...]
    rows: int

    @property
    def count(self) -> int:
        return len(self.runs)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sum(e - s for s, e in runs) for runs in self.runs)

    def indices(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """One LongTensor of row indices per part."""
        return [torch.cat([torch.arange(s, e, device=device) for s, e in runs])
                for runs in self.runs]

    def row_part(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The part of every row, (rows,) int64."""
        out = torch.empty(self.rows, dtype=torch.long)
        for p, runs in enumerate(self.runs):
            for s, e in runs:
                out[s:e] = p
        return out.to(device)

    def blocks(self, part: int, block_rows: int):
        """``(first row, end row)`` of the part's rows, at most ``block_rows`` at a time."""
        for s, e in self.runs[part]:
            for o0 in range(s, e, block_rows):
                yield o0, min(o0 + block_rows, e)


def row_parts(parts, rows: int, *, name: str = "delta_W") -> RowParts:
    """:class:`RowParts` from ``parts``: an int (that many equal stacked slices), a sequence
    of row-index tensors (or lists) covering ``0 .. rows-1`` once, or a RowParts."""
    if isinstance(parts, RowParts):
        if parts.rows != rows:
            raise UpcycleError(f"{name}: its row parts cover {parts.rows} rows, it has {rows}")
        return parts
    if isinstance(parts, int):
        if parts < 1 or rows % parts:
            raise UpcycleError(f"{name}: cannot split an output dimension of {rows} into "
                               f"{parts} equal slices")
        h = rows // parts
        return RowParts(tuple(((i * h, (i + 1) * h),) for i in range(parts)), rows)
    if not isinstance(parts, Sequence) or not parts:
        raise UpcycleError(f"{name}: parts must be a number of equal slices or a list of row "
                           f"indices per part, got {parts!r}")
    seen = torch.zeros(rows, dtype=torch.long)
    runs = []
    for p, idx in enumerate(parts):
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= rows:
            raise UpcycleError(f"{name}: part {p} has no rows or rows outside 0..{rows - 1}")
        seen.index_add_(0, idx, torch.ones_like(idx))
        idx = idx.sort().values
        breaks = (torch.nonzero(idx[1:] != idx[:-1] + 1).reshape(-1) + 1).tolist()
        starts = [0, *breaks]
        ends = [*breaks, idx.numel()]
        runs.append(tuple((int(idx[a]), int(idx[e - 1]) + 1) for a, e in zip(starts, ends)))
    if not bool((seen == 1).all()):
        raise UpcycleError(f"{name}: its parts must hold each of its {rows} output rows once "
                           f"(sizes {[len(torch.as_tensor(i).reshape(-1)) for i in parts]})")
    return RowParts(tuple(runs), rows)


def _row_blocks(rows: int, block_rows: int):
    """``(first row, end row)`` of each block of delta_W's rows (blocks may cross parts: the
    threshold is applied per row)."""
    for o0 in range(0, rows, block_rows):
        yield o0, min(o0 + block_rows, rows)


def _block_tau(tau: torch.Tensor, row_part: torch.Tensor | None, o0: int, o1: int):
    """The threshold of rows o0:o1: a 0-dim tensor (one part) or (rows, 1), per row's part."""
    if row_part is None:
        return tau[0]
    return tau.index_select(0, row_part[o0:o1]).unsqueeze(1)


def _magnitude_rows(pads, coeffs: torch.Tensor, o0: int, o1: int,
                    scratch: _Scratch | None = None) -> torch.Tensor:
    """|K| of rows o0:o1 (compiled: in the kernel's own loop)."""
    if getattr(pads, "compiled", False):
        return _fused_rows(pads, coeffs, o0, o1, "magnitude")
    return _kernel_rows(pads, coeffs, o0, o1, scratch=scratch).abs_()


class ThresholdHint:
    """A layer's recent thresholds, to guess the next ones: consecutive training steps move
    each part's tau smoothly, so :func:`snell_thresholds` first looks for the k-th value in a
    narrow window around the extrapolated tau, which needs one pass over |K| that counts the
    entries below the window and keeps the few inside it, instead of a radix select. The
    result is exact either way: when the k-th value is not inside the window (or the window
    holds too many entries) the radix select runs as without a hint. Not saved and not
    part of the state; plain floats, so it follows the layer to any device."""

    MIN_WINDOW, MAX_WINDOW = 2e-3, 0.05
    """Bounds of the window's relative half-width around the guess; no guess is tried while
    the recent errors call for a wider window (early steps, a large learning rate)."""

    def __init__(self):
        self.last: list[float] | None = None
        self.before: list[float] | None = None
        self.width = 0.01
        self.errors: list[float] = []
        self.hits = self.misses = 0

    def guesses(self, parts: int) -> list[float | None]:
        if self.last is None or len(self.last) != parts:
            return [None] * parts
        out = []
        for s, tau in enumerate(self.last):
            prev = None if self.before is None else self.before[s]
            if not (tau > 0 and math.isfinite(tau)):
                out.append(None)
            elif prev is not None and prev > 0:  # linear extrapolation, bounded
                out.append(min(2 * tau, max(tau / 2, 2 * tau - prev)))
            else:
                out.append(tau)
        return out

    @property
    def usable(self) -> bool:
        return self.width <= self.MAX_WINDOW

    def update(self, taus: list[float], guesses: list[float | None], tried: bool,
               missed: bool) -> None:
        """Record this pass's exact thresholds; the window becomes 2.5x the largest relative
        error of the last three guesses (the next one's is about the same)."""
        errors = [abs(t / g - 1) for t, g in zip(taus, guesses) if g and t > 0]
        if errors:
            if tried:
                self.misses += missed
                self.hits += not missed
            self.errors = [*self.errors[-2:], max(errors)]
            self.width = max(self.MIN_WINDOW, 2.5 * max(self.errors))
        self.before, self.last = self.last, list(taus)


@torch.no_grad()
def _kthvalue_in_window(windows, k: int, cap: int) -> torch.Tensor | None:
    """The k-th smallest of a set of values when it lies in a window [lo, hi], from one pass:
    ``windows()`` yields, per chunk of the values, how many are below ``lo`` and those
    inside. None when the k-th value is outside the window, or more than ``cap`` values
    are inside."""
    below = 0
    inside: list[torch.Tensor] = []
    count = 0
    for n_below, found in windows():
        below += int(n_below)
        count += found.numel()
        if count > cap:
            return None
        inside.append(found)
    if below < k <= below + count:
        return torch.cat(inside).kthvalue(k - below).values
    return None


@torch.no_grad()
def snell_thresholds(A: torch.Tensor, B: torch.Tensor, coeffs: torch.Tensor, sparsity: float,
                     parts=1, block_rows: int | None = None, *,
                     scratch: _Scratch | None = None, compiled: bool = False,
                     hint: ThresholdHint | None = None) -> torch.Tensor:
    """Per part of delta_W's rows (``parts``: see :func:`row_parts`; an int gives equal
    stacked slices), the threshold tau of the competition mask: the
    ``floor(sparsity * n)``-th smallest ``|K|`` of the part's n entries (-1 when none is
    zeroed), exactly what :func:`sparsify` takes from ``kthvalue``, found block by block
    (``block_rows`` rows of delta_W at a time, never crossing a part; None: a whole run of the
    part at once) by :func:`kthvalue_blocked`, with the kernel's blocks in ``scratch``'s
    buffers when given (``compiled``: see :func:`snell_kernel`). With ``hint`` (the layer's
    :class:`ThresholdHint`, updated here), a single pass looks in a window around the
    expected tau first. Shape (number of parts,)."""
    d_out, d_in = B.shape[1], A.shape[1]
    split = row_parts(parts, d_out)
    coeffs = coeffs.detach().to(A.dtype)
    A, B = A.detach(), B.detach()
    out = torch.full((split.count,), -1.0, dtype=A.dtype, device=A.device)
    if sparsity <= 0:
        return out
    pads = _padded_factors(A, B, compiled)
    scratch = scratch if scratch is not None else _Scratch()
    guesses = hint.guesses(split.count) if hint is not None else [None] * split.count
    tried = hint is not None and hint.usable
    missed = False
    for s, size in enumerate(split.sizes):
        n = size * d_in
        k = _num_zeroed(sparsity, n)
        if k == 0:
            continue
        bounds = list(split.blocks(s, block_rows or d_out))
        if len(bounds) == 1:  # the part is one block: kthvalue itself
            o0, o1 = bounds[0]
            out[s] = _magnitude_rows(pads, coeffs, o0, o1).reshape(-1).kthvalue(k).values
            continue

        def chunks(bounds=bounds):
            for o0, o1 in bounds:
                yield _magnitude_rows(pads, coeffs, o0, o1, scratch)
        if tried and guesses[s] is not None:
            window = torch.tensor([guesses[s] * (1 - hint.width), guesses[s] * (1 + hint.width)],
                                  dtype=A.dtype, device=A.device)

            def windows(bounds=bounds, window=window):
                for o0, o1 in bounds:
                    m = _magnitude_rows(pads, coeffs, o0, o1, scratch).reshape(-1)
                    yield (torch.count_nonzero(m < window[0]),
                           m[(m >= window[0]) & (m <= window[1])])
            tau = _kthvalue_in_window(windows, k, cap=max(1 << 16, n // 8))
            if tau is not None:
                out[s] = tau
                continue
            missed = True
        out[s] = kthvalue_blocked(chunks, k, n=n)
    if hint is not None:
        hint.update(out.tolist(), guesses, tried, missed)
    return out


def _sparsify_rows(K: torch.Tensor, tau: torch.Tensor | None, mode: str,
                   keep_factor: bool = False, scratch: _Scratch | None = None,
                   in_place: bool = True):
    """``(delta, factor)`` for rows of K given their part's threshold (0-dim, or (rows, 1):
    one per row), with the same elementwise arithmetic as :func:`sparsify` (delta = K *
    factor; factor is the detached magnitude term, returned only with keep_factor). ``tau``
    None means sparsity 0 (delta = K, factor None). K's storage is reused for delta
    (``in_place``; otherwise delta is None: the caller only wants the factor). With
    ``scratch`` the factor lives in its buffers 'm' and 'f'."""
    if tau is None:
        return K, None
    if scratch is None:
        magnitude = K.abs()
        factor_out = None
    else:
        magnitude = torch.abs(K, out=scratch.get("m", *K.shape, K))
        factor_out = scratch.get("f", *K.shape, K)
    if mode == "reference":
        # magnitude * (magnitude > tau) as in sparsify (the same products: m * 1.0, m * 0.0);
        # a same-dtype multiply (and a float-valued comparison) is several times faster
        # than one with a bool tensor
        if factor_out is None:
            factor = magnitude.mul_((magnitude > tau).to(magnitude.dtype))
        else:
            factor = torch.gt(magnitude, tau, out=factor_out).mul_(magnitude)
    elif mode == "paper":
        factor = magnitude.sub_(tau.clamp_min(0)).clamp_min_(0)
    else:
        raise UpcycleError(f"SNELL sparsify_mode must be one of {SPARSIFY_MODES}, got {mode!r}")
    delta = K.mul_(factor) if in_place else None
    return delta, (factor if keep_factor else None)


def sparsify(delta: torch.Tensor, sparsity: float, mode: str = "reference",
             num_slices: int = 1, parts=None) -> torch.Tensor:
    """Competition-based sparsification of ``delta`` (d_out x d_in), per part of its rows.

    Zeroes the ``floor(sparsity * n)`` smallest-magnitude entries of each part (n entries
    each) and keeps the rest: ``reference``: ``delta * |delta|`` (magnitude detached);
    ``paper``: ``delta * max(|delta| - tau, 0)``. The parts: ``parts`` (row indices per part,
    or a :class:`RowParts`, see :func:`row_parts`), else ``num_slices`` equal stacked slices.
    Each part's threshold tau comes from ``kthvalue`` on that part alone (no
    ``torch.quantile`` size limit) and is detached, so pruned entries get no gradient and a
    survivor's gradient scales with its magnitude. ``sparsity == 0`` returns ``delta``.
    Non-finite entries are never masked out: a NaN stays NaN (NaN * 0 is NaN).
    """
    if sparsity == 0:
        return delta
    d_out, d_in = delta.shape
    split = row_parts(num_slices if parts is None else parts, d_out)
    magnitude = delta.detach().abs()
    if split.count == 1:
        k = _num_zeroed(sparsity, magnitude.numel())
        threshold = (magnitude.reshape(-1).kthvalue(k).values if k else
                     magnitude.new_full((), -1.0))
    else:
        threshold = magnitude.new_empty((d_out, 1))
        for idx, size in zip(split.indices(delta.device), split.sizes):
            k = _num_zeroed(sparsity, size * d_in)
            threshold[idx] = (magnitude.index_select(0, idx).reshape(-1).kthvalue(k).values
                              if k else -1.0)
    if mode == "reference":
        return delta * (magnitude * (magnitude > threshold))
    if mode == "paper":
        return delta * (magnitude - threshold.clamp_min(0)).clamp_min(0)
    raise UpcycleError(f"SNELL sparsify_mode must be one of {SPARSIFY_MODES}, got {mode!r}")


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


# -- the layer ------------------------------------------------------------------------------

def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def adaptable_types() -> tuple[type, ...]:
    conv1d = _conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


class _SnellLinear(torch.autograd.Function):
    """``y = x (W0 + delta_W_s)^T + b`` with delta_W_s built ``block_rows`` rows at a time,
    in forward and in backward, so no more than a block of it (and of its kernel, mask and
    gradient) exists at once. Saves x, A, B, the coefficients and the thresholds (one scalar
    per part of the rows, ``parts`` a :class:`RowParts`; ``row_part`` the part of each row,
    None for one part); W0 is a parameter, saved by reference. ``weight``/``bias`` may be
    None (the update alone)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, coeffs, sparsity, mode, parts, row_part,
                block_rows, compiled, hint):
        coeffs_c = coeffs.to(A.dtype).detach()
        scratch = _Scratch()
        tau = snell_thresholds(A, B, coeffs_c, sparsity, parts, block_rows, scratch=scratch,
                               compiled=compiled, hint=hint)
        x2d = x.reshape(-1, x.shape[-1])
        d_out, d_in = B.shape[1], A.shape[1]
        y = x2d.new_empty((x2d.shape[0], d_out))
        pads = _padded_factors(A.detach(), B.detach(), compiled)
        for o0, o1 in _row_blocks(d_out, block_rows):
            if compiled:  # W0 + delta in the kernel's own loop
                w_block = _fused_rows(
                    pads, coeffs_c, o0, o1, "delta", mode=mode,
                    tau=_block_tau(tau, row_part, o0, o1) if sparsity > 0 else None,
                    weight=None if weight is None else weight[o0:o1],
                    out_dtype=x.dtype if weight is None else weight.dtype)
                y[:, o0:o1] = F.linear(x2d, w_block, None if bias is None else bias[o0:o1])
                del w_block
                continue
            K = _kernel_rows(pads, coeffs_c, o0, o1, scratch=scratch)
            w_block = scratch.get("w", o1 - o0, d_in, K, x.dtype if weight is None
                                  else weight.dtype)
            if sparsity > 0:
                _, factor = _sparsify_rows(K, _block_tau(tau, row_part, o0, o1), mode,
                                           keep_factor=True, scratch=scratch, in_place=False)
                if weight is None:  # delta = K * factor
                    torch.mul(K, factor, out=w_block)
                else:  # W0 + K * factor in one pass
                    torch.addcmul(weight[o0:o1].to(K.dtype), K, factor, out=w_block)
                del factor
            elif weight is None:
                w_block.copy_(K)
            else:
                torch.add(weight[o0:o1], K.to(weight.dtype), out=w_block)
            del K
            y[:, o0:o1] = F.linear(x2d, w_block, None if bias is None else bias[o0:o1])
            del w_block
        del scratch
        ctx.args = (sparsity, mode, row_part, block_rows, compiled)
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, A, B, coeffs, tau, *([weight] if weight is not None else []))
        return y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, coeffs, tau, *rest = ctx.saved_tensors
        weight = rest[0] if ctx.has_weight else None
        sparsity, mode, row_part, block_rows, compiled = ctx.args
        need_x, need_w, need_b, need_a, need_bb, need_c = ctx.needs_input_grad[:6]
        d_out, d_in = B.shape[1], A.shape[1]
        gy = grad_y.reshape(-1, d_out)
        x2d = x.reshape(-1, d_in)
        gy_c, x_c = gy.to(A.dtype), x2d.to(A.dtype)
        coeffs_c = coeffs.to(A.dtype)
        grad_x = torch.zeros_like(x2d, dtype=grad_y.dtype) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_A = torch.zeros_like(A) if need_a else None
        grad_B = torch.zeros_like(B) if need_bb else None
        grad_c = torch.zeros_like(coeffs_c) if need_c else None
        need_kernel_grad = need_a or need_bb or need_c
        pads = _padded_factors(A, B, compiled)
        a_ones_t = _a_ones_t(A) if need_kernel_grad else None
        scratch = _Scratch()
        for o0, o1 in _row_blocks(d_out, block_rows):
            if compiled:  # the block's gradient, then the rest in one compiled loop
                grad_delta = None
                if need_w or need_kernel_grad:
                    grad_delta = torch.mm(gy_c[:, o0:o1].t(), x_c,
                                          out=scratch.get("g", o1 - o0, d_in, x_c))
                    if need_w:
                        grad_w[o0:o1] = grad_delta
                w_block, H, gc = _fused_rows(
                    pads, coeffs_c, o0, o1, "backward", mode=mode,
                    tau=_block_tau(tau, row_part, o0, o1) if sparsity > 0 else None,
                    weight=None if weight is None else weight[o0:o1],
                    grad=grad_delta if need_kernel_grad else None, need_w=need_x,
                    need_h=need_a or need_bb, need_c=need_c, out_dtype=grad_y.dtype)
                del grad_delta
                if need_x:
                    grad_x.addmm_(gy[:, o0:o1], w_block)
                del w_block
                if need_c:
                    grad_c += torch.stack(gc)
                if H is not None:
                    _kernel_grads_from_h(A, B, coeffs_c, H, o0, o1, grad_A, grad_B, a_ones_t)
                continue
            dists: list | None = [] if need_kernel_grad else None
            K = _kernel_rows(pads, coeffs_c, o0, o1, dists, scratch=scratch)
            _, factor = _sparsify_rows(
                K, _block_tau(tau, row_part, o0, o1) if sparsity > 0 else None, mode,
                keep_factor=True, scratch=scratch, in_place=False)
            if need_x:
                w_block = scratch.get("w", o1 - o0, d_in, K)
                if factor is None:
                    w_block.copy_(K)
                else:
                    torch.mul(K, factor, out=w_block)
                w_block = w_block.to(grad_y.dtype)
                if weight is not None:
                    w_block = w_block.add_(weight[o0:o1].to(grad_y.dtype))
                grad_x.addmm_(gy[:, o0:o1], w_block)
                del w_block
            del K
            if need_w or need_kernel_grad:
                # (rows x d_in), this block only
                grad_delta = torch.mm(gy_c[:, o0:o1].t(), x_c,
                                      out=scratch.get("g", o1 - o0, d_in, x_c))
                if need_w:
                    grad_w[o0:o1] = grad_delta
                if need_kernel_grad:
                    if factor is not None:
                        grad_delta.mul_(factor)  # the magnitude term is detached
                    del factor
                    _kernel_grads_rows(A, B, coeffs_c, dists, grad_delta, o0, o1, grad_A,
                                       grad_B, grad_c, a_ones_t)
                del grad_delta
        del scratch
        grad_b = gy.sum(0) if need_b else None
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        if grad_c is not None:
            grad_c = grad_c.to(coeffs.dtype)
        return (grad_x, grad_w, grad_b, grad_A, grad_B, grad_c, None, None, None, None, None,
                None, None)


DEFAULT_BLOCK_MB = {"cpu": 4.0, "cuda": 16.0}
"""``SnellConfig.block_mb`` when None, per device type (others: the CPU's)."""


def _block_rows(block_mb: float | None, d_in: int, device: torch.device | str = "cpu") -> int:
    """Rows of delta_W per block: ``block_mb`` MiB of them (4-byte values; None: the
    device's ``DEFAULT_BLOCK_MB``), a multiple of the kernel's tile on ``device`` (so that
    blocks use whole tiles), at least one tile."""
    device = torch.device(device)
    if block_mb is None:
        block_mb = DEFAULT_BLOCK_MB.get(device.type, DEFAULT_BLOCK_MB["cpu"])
    tile = _tile_rows(device)
    rows = int(block_mb * 2**20) // max(1, d_in * 4)
    return max(tile, rows - rows % tile)


class SnellLayer(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a SNELL branch:
    ``y = W0 x + b + DropPath(delta_W_s @ Dropout(x))``.

    ``parts``: the parts of a fused projection's output rows, each sparsified with its own
    threshold (row indices per part, as ``FusedLayout.indices()`` gives them; or a number of
    equal stacked slices); ``num_slices`` is the older spelling of an int ``parts``."""

    def __init__(self, base_layer: nn.Module, config: SnellConfig, *, num_slices: int = 1,
                 parts=None, name: str = ""):
        super().__init__()
        conv1d = _conv1d_type()
        self.transposed = conv1d is not None and isinstance(base_layer, conv1d)
        if not (isinstance(base_layer, nn.Linear) or self.transposed):
            raise UpcycleError(f"module {name!r} is a {type(base_layer).__name__}; SNELL adapts "
                               f"only nn.Linear and GPT-2's Conv1D")
        weight = base_layer.weight
        d_out, d_in = (weight.shape[1], weight.shape[0]) if self.transposed else weight.shape
        self.parts = row_parts(num_slices if parts is None else parts, int(d_out),
                               name=f"module {name!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.num_slices = self.parts.count
        # the part of each row, for the per-row threshold of a block (None: one part)
        self.register_buffer("snell_row_part", self.parts.row_part(weight.device)
                             if self.parts.count > 1 else None, persistent=False)
        self.sparsity = float(config.sparsity)
        self.sparsify_mode = config.sparsify_mode
        self.dropout_p = float(config.dropout)
        self.drop_path_p = float(config.drop_path)
        self.recompute = config.recompute
        self.block_mb = None if config.block_mb is None else float(config.block_mb)
        self.compile = bool(config.compile)
        self._block_rows: int | None = None  # set to override block_mb (tests)
        self.threshold_hint = ThresholdHint()  # where the next thresholds are expected
        self.merged = False
        P, q = config.num_pieces, config.r // config.num_pieces
        factory = {"device": weight.device,
                   "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32}
        if factory["dtype"] in (torch.float16, torch.bfloat16):
            factory["dtype"] = torch.float32  # the kernel and its threshold want fp32
        self.snell_A = nn.Parameter(torch.empty(P, self.in_features, q, **factory))
        self.snell_B = nn.Parameter(torch.empty(P, self.out_features, q, **factory))
        nn.init.kaiming_uniform_(self.snell_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.snell_B, a=math.sqrt(5))
        coeffs = torch.tensor(config.piece_coeffs, **factory)
        if config.learnable_coeffs:
            self.snell_coeffs = nn.Parameter(coeffs)
        else:
            self.register_buffer("snell_coeffs", coeffs)

    @property
    def block_rows(self) -> int:
        """Rows of delta_W built at once (from block_mb and the layer's current device)."""
        if self._block_rows is not None:
            return self._block_rows
        return _block_rows(self.block_mb, self.in_features, self.snell_A.device)

    @block_rows.setter
    def block_rows(self, rows: int) -> None:
        self._block_rows = int(rows)

    # the update ------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The sparsified update delta_W_s, (d_out x d_in), in nn.Linear's orientation."""
        return sparsify(snell_kernel(self.snell_A, self.snell_B, self.snell_coeffs,
                                     self.compile),
                        self.sparsity, self.sparsify_mode, parts=self.parts)

    def _weight_oi(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def _fused(self, x: torch.Tensor, A, B, coeffs) -> torch.Tensor:
        delta = sparsify(snell_kernel(A, B, coeffs, self.compile), self.sparsity,
                         self.sparsify_mode, parts=self.parts)
        weight = self._weight_oi()
        return F.linear(x, weight + delta.to(weight.dtype), self.base_layer.bias)

    def _branch(self, x: torch.Tensor, A, B, coeffs) -> torch.Tensor:
        delta = sparsify(snell_kernel(A, B, coeffs, self.compile), self.sparsity,
                         self.sparsify_mode, parts=self.parts)
        return F.linear(x, delta.to(x.dtype))

    def _product(self, x: torch.Tensor, with_base: bool) -> torch.Tensor:
        """``x @ (W0 + delta_W_s)^T + b`` (with_base) or ``x @ delta_W_s^T``."""
        params = (self.snell_A, self.snell_B, self.snell_coeffs)
        if self.recompute == "none" or (self.recompute == "checkpoint"
                                        and not torch.is_grad_enabled()):
            return (self._fused if with_base else self._branch)(x, *params)
        if self.recompute == "checkpoint":
            return checkpoint(self._fused if with_base else self._branch, x, *params,
                              use_reentrant=False)
        weight = self._weight_oi() if with_base else None
        bias = self.base_layer.bias if with_base else None
        return _SnellLinear.apply(x, weight, bias, *params, self.sparsity, self.sparsify_mode,
                                  self.parts, self.snell_row_part, self.block_rows,
                                  self.compile, self.threshold_hint)

    @torch.no_grad()
    def _delta_blocks(self):
        """``(first row, end row, rows of delta_W_s)`` block by block (no autograd)."""
        A, B = self.snell_A.detach(), self.snell_B.detach()
        coeffs = self.snell_coeffs.detach().to(A.dtype)
        tau = snell_thresholds(A, B, coeffs, self.sparsity, self.parts, self.block_rows,
                               compiled=self.compile, hint=self.threshold_hint)
        pads = _padded_factors(A, B, self.compile)
        for o0, o1 in _row_blocks(self.out_features, self.block_rows):
            if self.compile:
                yield o0, o1, _fused_rows(
                    pads, coeffs, o0, o1, "delta", mode=self.sparsify_mode,
                    tau=_block_tau(tau, self.snell_row_part, o0, o1) if self.sparsity > 0
                    else None, out_dtype=A.dtype)
                continue
            K = _kernel_rows(pads, coeffs, o0, o1)
            delta, _ = _sparsify_rows(
                K, _block_tau(tau, self.snell_row_part, o0, o1) if self.sparsity > 0 else None,
                self.sparsify_mode)
            yield o0, o1, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        regularised = self.training and (self.dropout_p > 0 or self.drop_path_p > 0)
        if not regularised:
            # One matmul with W0 + delta_W_s: also what the merged layer computes.
            return self._product(x, with_base=True)
        x_drop = F.dropout(x, self.dropout_p, training=True)
        update = self._product(x_drop, with_base=False)
        return self.base_layer(x) + _drop_path(update, self.drop_path_p, True)

    # merging ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W0 += delta_W_s, a block of rows at a time."""
        if self.merged:
            return
        weight = self._weight_oi()
        for o0, o1, delta in self._delta_blocks():
            weight[o0:o1] += delta.to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._weight_oi()
        for o0, o1, delta in self._delta_blocks():
            weight[o0:o1] -= delta.to(weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        rank = self.snell_A.shape[0] * self.snell_A.shape[2]
        return (f"in={self.in_features}, out={self.out_features}, r={rank}, "
                f"sparsity={self.sparsity}, mode={self.sparsify_mode}, "
                f"parts={list(self.parts.sizes)}, merged={self.merged}")


# -- the model --------------------------------------------------------------------------------

def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _architecture(model: nn.Module):
    """The model's entry in the architecture map, or None when the map does not know it."""
    from ..models.architectures import architecture_of

    try:
        return architecture_of(model, method="SNELL")
    except UpcycleError:
        return None


def default_target_modules(model: nn.Module) -> list[str]:
    """The family's q, k, v (or fused qkv), attention output and MLP matrices of every layer,
    from the architecture map (``snell_target_modules``): layer-relative paths that match a
    module whose dotted name ends with them."""
    from ..models.architectures import snell_target_modules, supported

    model_type = _model_type(model)
    if model_type in UNMAPPED_TARGET_MODULES:
        return list(UNMAPPED_TARGET_MODULES[model_type])
    match = _architecture(model)
    if match is None:
        raise UpcycleError(
            f"SNELL has no default target_modules for model type {model_type!r} (known: "
            f"{supported()}, {', '.join(sorted(UNMAPPED_TARGET_MODULES))}); pass "
            f"target_modules")
    return snell_target_modules(match.arch)


def fused_parts(model: nn.Module, names, fused_qkv=None) -> dict[str, RowParts | int]:
    """For the modules ``names`` of ``model``, how each is split into parts: the layout of
    the architecture map for a mapped fused projection (row indices per part), 3 equal
    slices for a module matching ``fused_qkv`` (None: ``UNMAPPED_FUSED_QKV``) outside the
    map, else 1."""
    from ..models.architectures import model_fused_layouts

    layouts = model_fused_layouts(model) if _architecture(model) is not None else {}
    extra = UNMAPPED_FUSED_QKV if fused_qkv is None else fused_qkv
    out: dict[str, RowParts | int] = {}
    for name in names:
        if name in layouts:
            layout = layouts[name]
            out[name] = row_parts(layout.indices(), layout.rows, name=f"module {name!r}")
        else:
            out[name] = 3 if _matches(name, extra) else 1
    return out


def default_head_modules(model: nn.Module) -> list[str]:
    """Names of the model's task head among its direct children, if any. A language model's
    head (the model's output embedding, often tied to its input embedding, or a module
    holding it, as RoBERTa's MLM ``lm_head``) is not one: it stays frozen."""
    try:
        output_embedding = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        output_embedding = None
    return [name for name, module in model.named_children()
            if name in HEAD_NAMES and not (output_embedding is not None and any(
                m is output_embedding for m in module.modules()))]


def _matches(name: str, patterns) -> bool:
    from .adapter import module_name_matches

    return patterns is not None and module_name_matches(name, patterns)


def _generic_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    """SnellModel.forward as seen on the class: the base model's forward, whose signature is
    visible on each model (``inspect.signature(model.forward)``)."""
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if labels is not None:
        kwargs["labels"] = labels
    return self.base_model(**kwargs)


class _BaseModelForward:
    """``SnellModel.forward``: a function calling the base model that carries the base
    model's ``forward`` signature. Trainer reads that signature to choose dataset columns
    (``remove_unused_columns``) and whether to pass ``num_items_in_batch``; a bare
    ``forward(*args, **kwargs)`` would make it drop every column. Nothing is stored on the
    instance, so copies, pickles, DDP and ``torch.compile`` see an ordinary module."""

    def __get__(self, instance, owner=None):
        if instance is None:
            return _generic_forward
        base = instance._modules["base_model"]

        def forward(*args, **kwargs):
            return base(*args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(base.forward)
        except (TypeError, ValueError):  # a forward without a readable signature
            pass
        forward.__doc__ = _generic_forward.__doc__
        return forward


class SnellModel(nn.Module):
    """A base model with SNELL layers injected; forward is the base model's forward.

    An ordinary module: ``.to()``/``.cuda()``/``.half()``, ``state_dict()``, DDP,
    ``torch.compile`` and ``transformers.Trainer`` treat it as they treat the base model."""

    def __init__(self, model: nn.Module, config: SnellConfig):
        super().__init__()
        if isinstance(model, SnellModel):
            raise UpcycleError("the model already holds SNELL adapters")
        config.validate()
        if config.target_modules is None:
            config.target_modules = default_target_modules(model)
        if config.modules_to_save is None:
            config.modules_to_save = default_head_modules(model)
        self.base_model = model
        self.snell_config = config
        targets = find_modules(model, config.target_modules, argument="SNELL target_modules")
        types = adaptable_types()
        for name, module in targets:
            if isinstance(module, SnellLayer):
                raise UpcycleError(f"module {name!r} already holds a SNELL adapter")
            if not isinstance(module, types):
                raise UpcycleError(
                    f"SNELL target_modules matched {name!r}, a {type(module).__name__}; only "
                    f"nn.Linear and GPT-2's Conv1D can be adapted (narrow the pattern)"
                )
        saved = (find_modules(model, config.modules_to_save, argument="SNELL modules_to_save")
                 if config.modules_to_save else [])
        target_names = {n for n, _ in targets}
        for name, _ in saved:
            if name in target_names:
                raise UpcycleError(f"module {name!r} is both a SNELL target and in "
                                   f"modules_to_save")
        for p in model.parameters():
            p.requires_grad_(False)
        splits = fused_parts(model, [n for n, _ in targets], config.fused_qkv)
        for name, module in targets:
            _set_submodule(model, name, SnellLayer(module, config, parts=splits[name],
                                                   name=name))
        for _, module in saved:
            for p in module.parameters():
                p.requires_grad_(True)
        self.modules_to_save = [n for n, _ in saved]

    # forwarding ------------------------------------------------------------------------
    forward = _BaseModelForward()
    """Calls the base model; ``inspect.signature(model.forward)`` is the base model's, so
    ``transformers.Trainer`` keeps the same dataset columns and loss arguments for it."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # inspection ------------------------------------------------------------------------
    def snell_layers(self) -> dict[str, SnellLayer]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SnellLayer)}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        from .adapter import count_parameters

        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        print(trainable_report(self))

    # merging ---------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold every delta_W_s into its base weight (exact in eval mode)."""
        for layer in self.snell_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        """Subtract every delta_W_s again (W0 back up to float rounding)."""
        for layer in self.snell_layers().values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge and return the base model with plain layers again (the adapter is gone)."""
        for name, layer in self.snell_layers().items():
            layer.merge()
            _set_submodule(self.base_model, name, layer.base_layer)
        return self.base_model

    def unload(self) -> nn.Module:
        """Return the base model with the adapters removed, unmerged."""
        for name, layer in self.snell_layers().items():
            layer.unmerge()
            _set_submodule(self.base_model, name, layer.base_layer)
        return self.base_model

    # saving ----------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What an adapter folder holds: A, B (the coefficients when learnable) and the
        modules_to_save, named as in the base model."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.snell_layers().items():
            state[f"{name}.snell_A"] = layer.snell_A
            state[f"{name}.snell_B"] = layer.snell_B
            if self.snell_config.learnable_coeffs:
                state[f"{name}.snell_coeffs"] = layer.snell_coeffs
        for module_name in self.modules_to_save:
            module = self.base_model.get_submodule(module_name)
            for pname, p in module.named_parameters():
                state[f"{module_name}.{pname}"] = p
        return state

    def save_pretrained(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically."""
        config = self.snell_config.to_dict()
        config["base_model_type"] = _model_type(self.base_model)
        return save_adapter(out, METHOD, config, self.adapter_state_dict(), overwrite=overwrite,
                            base_model=self.base_model)

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | Path, *,
                        is_trainable: bool = False) -> SnellModel:
        """Inject the adapter saved in ``folder`` into ``model`` (its base model)."""
        raw, tensors = load_adapter(folder, METHOD)
        raw.pop("base_model_type", None)
        source = f"adapter {folder}"
        config = SnellConfig.from_dict(raw, source=source)
        wrapped = cls(model, config)
        expected = wrapped.adapter_state_dict()
        check_tensor_shapes(expected, tensors, source)
        with torch.no_grad():
            for name, target in expected.items():
                target.copy_(tensors[name].to(target.dtype))
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
            wrapped.eval()
        return wrapped


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def get_snell_model(model: nn.Module, config: SnellConfig | None = None, **overrides
                    ) -> SnellModel:
    """Inject SNELL adapters into ``model`` (any nn.Module) and freeze everything else but
    the modules_to_save. Keyword ``overrides`` replace fields of ``config``."""
    config = config or SnellConfig()
    if overrides:
        config = SnellConfig(**{**config.to_dict(), **overrides})
    else:
        config = SnellConfig(**config.to_dict())  # never mutate the caller's config
    return SnellModel(model, config)


__all__ = [
    "UNMAPPED_FUSED_QKV",
    "UNMAPPED_TARGET_MODULES",
    "RowParts",
    "SnellConfig",
    "SnellLayer",
    "SnellModel",
    "default_head_modules",
    "default_target_modules",
    "fused_parts",
    "get_snell_model",
    "kthvalue_blocked",
    "row_parts",
    "snell_kernel",
    "snell_thresholds",
    "sparsify",
]
