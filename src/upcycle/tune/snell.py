"""SNELL: sparse tuning with kernelized LoRA (Shen et al., NeurIPS 2024; spec: specs/snell.md).

Each adapted linear map ``W0`` (``d_out x d_in``) gets two low-rank factors split into
``P`` pieces, ``A`` (``P x d_in x r/P``) and ``B`` (``P x d_out x r/P``). The update is a
kernel of them,

    K[i, j] = sum_p c_p * ||A_p[i] - B_p[j]||_2,      delta_W = K^T   (d_out x d_in),

which is generally full rank, sparsified afresh every forward pass by competition: the
``sparsity`` fraction of entries with the smallest ``|K|`` (per matrix; per q/k/v slice of
a fused projection) is zeroed and the survivors are scaled by their own detached magnitude
(``reference`` mode, the released code) or soft-thresholded (``paper`` mode, Eq. 5). The
whole of ``delta_W`` is recomputed in backward (a custom autograd function by default, or a
non-reentrant activation checkpoint), so nothing of size ``d_out x d_in`` is stored for
backward or kept between steps.

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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UpcycleError
from .common import (
    check_tensor_shapes,
    find_modules,
    load_adapter,
    save_adapter,
    trainable_report,
)

METHOD = "snell"
SPARSIFY_MODES = ("reference", "paper")
RECOMPUTE_MODES = ("backward", "checkpoint", "none")

# Default targets per model family (config.model_type): q, k, v, attention output and the
# two MLP matrices of every block, as in the reference recipe. A list entry matches a module
# whose dotted name ends with it.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
             "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                    "output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"],
    "vit": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
            "output.dense"],
    "deit": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
             "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

# Fused q/k/v projections ([q; k; v] stacked along the output dimension): sparsified per
# slice. GPT-2's ``c_attn`` and timm's ``qkv``.
DEFAULT_FUSED_QKV = ["c_attn", "qkv"]

# Classification heads trained (and saved) with the adapter when modules_to_save is None.
HEAD_NAMES = ("classifier", "score", "head", "lm_head")


@dataclass
class SnellConfig:
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
    classification head if the model has one ('classifier', 'score', 'head'); [] for none."""
    fused_qkv: list[str] | str | None = field(default_factory=lambda: list(DEFAULT_FUSED_QKV))
    """Adapted modules that are fused [q; k; v] projections: their delta_W is sparsified per
    third (a separate threshold for q, k and v). Same matching rule as target_modules."""
    dropout: float = 0.1
    """Dropout on the adapter's input (reference recipe: 0.1)."""
    drop_path: float = 0.1
    """DropPath (per-sample stochastic depth) on the adapter's output (reference: 0.1)."""
    recompute: str | bool = "backward"
    """How delta_W avoids being stored for backward. 'backward' (default): a custom autograd
    function saves only x, A and B and recomputes delta_W in backward (the big matmul is not
    redone); 'checkpoint': the layer runs inside a non-reentrant torch.utils.checkpoint
    (recomputes delta_W and the layer's matmul); 'none' (or False): plain autograd, which
    stores delta_W and the kernel's intermediates (faster, more memory). True = 'backward'."""

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

def snell_kernel(A: torch.Tensor, B: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """The dense update ``K^T`` (d_out x d_in) with K[i, j] = sum_p c_p ||A_p[i] - B_p[j]||_2.

    ``A``: (P, d_in, r/P); ``B``: (P, d_out, r/P); ``coeffs``: (P,).
    """
    dist = torch.cdist(B, A, p=2.0)  # (P, d_out, d_in): distance of output j to input i
    return torch.einsum("p,poi->oi", coeffs.to(dist.dtype), dist)


def _num_zeroed(sparsity: float, numel: int) -> int:
    return min(numel - 1, math.floor(sparsity * numel + 1e-9)) if numel else 0


def sparsify(delta: torch.Tensor, sparsity: float, mode: str = "reference",
             num_slices: int = 1) -> torch.Tensor:
    """Competition-based sparsification of ``delta`` (d_out x d_in), per output slice.

    Zeroes the ``floor(sparsity * n)`` smallest-magnitude entries of each of ``num_slices``
    equal slices along the output dimension (n entries each) and keeps the rest:
    ``reference``: ``delta * |delta|`` (magnitude detached); ``paper``:
    ``delta * max(|delta| - tau, 0)``. The threshold tau comes from ``kthvalue`` (no
    ``torch.quantile`` size limit) and is detached, so pruned entries get no gradient and a
    survivor's gradient scales with its magnitude. ``sparsity == 0`` returns ``delta``.
    """
    if sparsity == 0:
        return delta
    d_out = delta.shape[0]
    if d_out % num_slices:
        raise UpcycleError(f"cannot split an output dimension of {d_out} into {num_slices} "
                           f"equal slices")
    slices = delta.reshape(num_slices, -1)
    magnitude = slices.detach().abs()
    k = _num_zeroed(sparsity, slices.shape[1])
    if k == 0:
        threshold = torch.full((num_slices, 1), -1.0, dtype=magnitude.dtype,
                               device=magnitude.device)
    else:
        threshold = magnitude.kthvalue(k, dim=1, keepdim=True).values
    if mode == "reference":
        out = slices * (magnitude * (magnitude > threshold))
    elif mode == "paper":
        out = slices * (magnitude - threshold.clamp_min(0)).clamp_min(0)
    else:
        raise UpcycleError(f"SNELL sparsify_mode must be one of {SPARSIFY_MODES}, got {mode!r}")
    return out.reshape(delta.shape)


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
    """``y = x (W0 + delta_W_s)^T + b`` saving only x, A, B and the coefficients: delta_W_s is
    recomputed from (A, B) in backward, never stored (W0 is a parameter, saved by reference).
    ``weight``/``bias`` may be None (the update alone)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, coeffs, sparsity, mode, num_slices):
        with torch.no_grad():
            delta = sparsify(snell_kernel(A, B, coeffs), sparsity, mode, num_slices)
            full = delta.to(x.dtype) if weight is None else weight + delta.to(weight.dtype)
            y = F.linear(x, full, bias)
        del delta, full
        ctx.sparsify_args = (sparsity, mode, num_slices)
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, A, B, coeffs, *([weight] if weight is not None else []))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B, coeffs, *rest = ctx.saved_tensors
        weight = rest[0] if ctx.has_weight else None
        need_x, need_w, need_b, need_a, need_bb, need_c = ctx.needs_input_grad[:6]
        leaves = [t.detach().requires_grad_(need) for t, need in
                  ((A, need_a), (B, need_bb), (coeffs, need_c))]
        with torch.enable_grad():
            delta = sparsify(snell_kernel(*leaves), *ctx.sparsify_args)
        grad_x = grad_w = grad_b = None
        if need_x:
            full = delta.detach().to(grad_y.dtype)
            if weight is not None:
                full = full + weight.to(grad_y.dtype)
            grad_x = grad_y @ full
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        grad_delta = flat_grad.t().to(delta.dtype) @ x.reshape(-1, x.shape[-1]).to(delta.dtype)
        if need_w:
            grad_w = grad_delta.to(weight.dtype)
        if need_b:
            grad_b = flat_grad.sum(0)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(delta, wanted, grad_delta) if wanted else ())
        grad_abc = [next(grads) if t.requires_grad else None for t in leaves]
        return (grad_x, grad_w, grad_b, *grad_abc, None, None, None)


class SnellLayer(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a SNELL branch:
    ``y = W0 x + b + DropPath(delta_W_s @ Dropout(x))``."""

    def __init__(self, base_layer: nn.Module, config: SnellConfig, *, num_slices: int = 1,
                 name: str = ""):
        super().__init__()
        conv1d = _conv1d_type()
        self.transposed = conv1d is not None and isinstance(base_layer, conv1d)
        if not (isinstance(base_layer, nn.Linear) or self.transposed):
            raise UpcycleError(f"module {name!r} is a {type(base_layer).__name__}; SNELL adapts "
                               f"only nn.Linear and GPT-2's Conv1D")
        weight = base_layer.weight
        d_out, d_in = (weight.shape[1], weight.shape[0]) if self.transposed else weight.shape
        if d_out % num_slices:
            raise UpcycleError(f"module {name!r}: fused q/k/v projection has {d_out} outputs, "
                               f"not divisible into {num_slices} slices")
        self.base_layer = base_layer
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.num_slices = num_slices
        self.sparsity = float(config.sparsity)
        self.sparsify_mode = config.sparsify_mode
        self.dropout_p = float(config.dropout)
        self.drop_path_p = float(config.drop_path)
        self.recompute = config.recompute
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

    # the update ------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The sparsified update delta_W_s, (d_out x d_in), in nn.Linear's orientation."""
        return sparsify(snell_kernel(self.snell_A, self.snell_B, self.snell_coeffs),
                        self.sparsity, self.sparsify_mode, self.num_slices)

    def _weight_oi(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def _fused(self, x: torch.Tensor, A, B, coeffs) -> torch.Tensor:
        delta = sparsify(snell_kernel(A, B, coeffs), self.sparsity, self.sparsify_mode,
                         self.num_slices)
        weight = self._weight_oi()
        return F.linear(x, weight + delta.to(weight.dtype), self.base_layer.bias)

    def _branch(self, x: torch.Tensor, A, B, coeffs) -> torch.Tensor:
        delta = sparsify(snell_kernel(A, B, coeffs), self.sparsity,
                         self.sparsify_mode, self.num_slices)
        return F.linear(x, delta.to(x.dtype))

    def _product(self, x: torch.Tensor, with_base: bool) -> torch.Tensor:
        """``x @ (W0 + delta_W_s)^T + b`` (with_base) or ``x @ delta_W_s^T``."""
        params = (self.snell_A, self.snell_B, self.snell_coeffs)
        if not torch.is_grad_enabled() or self.recompute == "none":
            return (self._fused if with_base else self._branch)(x, *params)
        if self.recompute == "checkpoint":
            return checkpoint(self._fused if with_base else self._branch, x, *params,
                              use_reentrant=False)
        weight = self._weight_oi() if with_base else None
        bias = self.base_layer.bias if with_base else None
        return _SnellLinear.apply(x, weight, bias, *params, self.sparsity, self.sparsify_mode,
                                  self.num_slices)

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
        if self.merged:
            return
        delta = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight.add_(delta.t() if self.transposed else delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        delta = self.delta_weight().to(self.base_layer.weight.dtype)
        self.base_layer.weight.sub_(delta.t() if self.transposed else delta)
        self.merged = False

    def extra_repr(self) -> str:
        rank = self.snell_A.shape[0] * self.snell_A.shape[2]
        return (f"in={self.in_features}, out={self.out_features}, r={rank}, "
                f"sparsity={self.sparsity}, mode={self.sparsify_mode}, "
                f"slices={self.num_slices}, merged={self.merged}")


# -- the model --------------------------------------------------------------------------------

def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_target_modules(model: nn.Module) -> list[str]:
    model_type = _model_type(model)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise UpcycleError(
            f"SNELL has no default target_modules for model type {model_type!r} (known: "
            f"{', '.join(sorted(DEFAULT_TARGET_MODULES))}); pass target_modules"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def default_head_modules(model: nn.Module) -> list[str]:
    """Names of the model's classification head among its direct children, if any."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def _matches(name: str, patterns) -> bool:
    from .common import module_name_matches

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
        for name, module in targets:
            slices = 3 if _matches(name, config.fused_qkv) else 1
            _set_submodule(model, name, SnellLayer(module, config, num_slices=slices, name=name))
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
        from .common import count_parameters

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
        return save_adapter(out, METHOD, config, self.adapter_state_dict(), overwrite=overwrite)

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
    "DEFAULT_TARGET_MODULES",
    "SnellConfig",
    "SnellLayer",
    "SnellModel",
    "default_target_modules",
    "get_snell_model",
    "snell_kernel",
    "sparsify",
]
