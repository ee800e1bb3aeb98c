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

SNELL is a peft method: importing this package registers it with peft (``PeftType.SNELL``),
so everything peft does for LoRA it does for SNELL::

    import upcycle.tune  # registers SNELL with peft
    from peft import PeftModel, get_peft_model
    model = get_peft_model(hf_model, SnellConfig(r=8, sparsity=0.5))   # or get_snell_model
    model.print_trainable_parameters()
    ... train (Trainer, TRL's SFTTrainer(peft_config=SnellConfig(...))) ...
    model.save_pretrained("adapter")                       # peft's adapter folder
    model = PeftModel.from_pretrained(fresh_hf_model, "adapter")
    merged = model.merge_and_unload()                      # a plain HF model again

The package, one concern a module: :mod:`.config` (SnellConfig and the defaults),
:mod:`.kernel` (K and its gradients, a block of rows at a time), :mod:`.compiled` (the
``compile=True`` fused loop), :mod:`.parts` (a fused projection's row parts),
:mod:`.mask` (the competition mask), :mod:`.threshold` (its exact threshold, found block by
block; the radix select itself is the generic :mod:`upcycle.ops.kselect`), :mod:`.autograd`
(the blocked autograd Function), :mod:`.layer` (SnellLayer, peft's tuner layer), :mod:`.targets`
(default targets, fused parts and heads from the architecture map), :mod:`.model`
(SnellModel, peft's tuner; get_snell_model, save and load) and :mod:`.peft_type` (the tested
peft versions and ``PeftType.SNELL``).
"""

from ...ops.kselect import kthvalue_blocked
from .config import (
    DEFAULT_BLOCK_MB,
    DEFAULT_LR,
    METHOD,
    RECOMPUTE_MODES,
    SPARSIFY_MODES,
    SnellConfig,
)
from .kernel import KERNEL_TILE_ROWS, KERNEL_TILE_ROWS_ACCELERATOR, snell_kernel
from .layer import SnellLayer, adaptable_types
from .mask import sparsify
from .model import SnellModel, get_snell_model, load_snell, save_snell
from .parts import RowParts, row_parts
from .peft_type import PEFT_ERROR, TESTED_PEFT
from .targets import (
    HEAD_NAMES,
    UNMAPPED_FUSED_QKV,
    UNMAPPED_TARGET_MODULES,
    default_head_modules,
    default_target_modules,
    fused_parts,
)
from .threshold import ThresholdHint, snell_thresholds


def _register() -> None:
    """Register SNELL with peft (once; only on the tested peft versions)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if PEFT_ERROR is None and "SNELL" not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="snell", config_cls=SnellConfig, model_cls=SnellModel,
                             prefix="snell_")


_register()

__all__ = [
    "DEFAULT_BLOCK_MB",
    "DEFAULT_LR",
    "HEAD_NAMES",
    "KERNEL_TILE_ROWS",
    "KERNEL_TILE_ROWS_ACCELERATOR",
    "METHOD",
    "RECOMPUTE_MODES",
    "SPARSIFY_MODES",
    "TESTED_PEFT",
    "UNMAPPED_FUSED_QKV",
    "UNMAPPED_TARGET_MODULES",
    "RowParts",
    "SnellConfig",
    "SnellLayer",
    "SnellModel",
    "ThresholdHint",
    "adaptable_types",
    "default_head_modules",
    "default_target_modules",
    "fused_parts",
    "get_snell_model",
    "load_snell",
    "save_snell",
    "kthvalue_blocked",
    "row_parts",
    "snell_kernel",
    "snell_thresholds",
    "sparsify",
]
