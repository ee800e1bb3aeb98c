"""SNELL's configuration: :class:`SnellConfig`, checked on construction, and the defaults
the command line and the layer fall back on."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from peft import PeftConfig

from ...errors import UpcycleError
from .peft_type import snell_peft_type

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

DEFAULT_BLOCK_MB = {"cpu": 4.0, "cuda": 16.0}
"""``SnellConfig.block_mb`` when None, per device type (others: the CPU's)."""


@dataclass
class SnellConfig(PeftConfig):
    """Configuration of a SNELL adapter: a peft ``PeftConfig`` (``get_peft_model(model,
    SnellConfig(...))``, ``save_pretrained``, ``PeftConfig.from_pretrained``), its field names
    following peft's where peft has one (``r``, ``target_modules``, ``exclude_modules``,
    ``modules_to_save``).

    Each field's docstring opens with its ``upcycle tune`` help (the first paragraph, up to
    the first blank line), then documents the field. Each field is a flag
    ``--<name-with-dashes>`` unless its ``metadata`` says otherwise: ``"flag"`` (another
    name), ``"invert"`` (a store-true flag giving False), ``"choices"``, ``"metavar"``,
    ``"nargs"``, ``"cli": False`` (no flag of its own)."""

    r: int = 8
    """rank of A and B (default 8)

    The rank of the two factors A (d_in x r) and B (d_out x r); trainable count
    r*(d_in+d_out) per matrix, as LoRA-r. Must be divisible by ``num_pieces``."""
    num_pieces: int = 2
    """pieces of the piecewise-linear kernel; r must be divisible by it

    Pieces P of the piecewise-linear kernel; each piece uses r/P columns of A and B."""
    piece_coeffs: tuple[float, ...] = field(default=(0.1, -0.1), metadata={"cli": False})
    """Coefficient c_p of each piece (one per piece); opposite signs let entries of delta_W
    take both signs."""
    learnable_coeffs: bool = False
    """train the kernel's piece coefficients (default: fixed +-0.1)

    Train the piece coefficients too (the paper); the released code keeps them fixed."""
    sparsity: float = 0.5
    """fraction of each delta_W zeroed every step, in [0, 1); 0 = dense kernelized LoRA
    (default 0.5)

    The fraction of the entries of each delta_W zeroed every step, in [0, 1); 0 gives dense
    kernelized LoRA (delta_W = K)."""
    sparsify_mode: str = field(default="reference", metadata={"choices": SPARSIFY_MODES})
    """'reference' (released code, default) or 'paper' (Eq. 5 soft threshold)

    'reference': K * |K| on the top entries (the released code, reproduces the paper's
    tables); 'paper': K * max(|K| - tau, 0) (Eq. 5's soft threshold)."""
    target_modules: list[str] | str | None = field(
        default=None, metadata={"nargs": "+", "metavar": "NAME"})
    """modules to adapt (names or dotted endings); default: the model family's q, k, v,
    attention output and MLP matrices

    Modules to adapt: a list of names (matching the full dotted name or its ending) or one
    regex matching whole names. None: the default set for the model family."""
    modules_to_save: list[str] | None = field(
        default=None, metadata={"nargs": "*", "metavar": "NAME"})
    """modules trained in full and saved (default: the classifier head; none for a language
    model, whose head stays frozen)

    Other modules trained in full and saved with the adapter (the task head). None: the
    classification head if the model has one ('classifier', 'score', 'head'); a language
    model's head (its output embedding, tied to the input embedding on GPT-2) stays frozen;
    [] for none."""
    exclude_modules: list[str] | str | None = field(default=None, metadata={"cli": False})
    """Modules not to adapt among those target_modules matches (peft's rule: names matching
    the full dotted name or its ending, or one regex)."""
    target_parameters: list[str] | None = field(default=None, metadata={"cli": False})
    """peft's field for adapting bare parameters; SNELL adapts modules only (must stay None)."""
    fused_qkv: list[str] | str | None = field(default=None, metadata={"cli": False})
    """Fused projections are sparsified per part (a separate threshold for the q, k and v
    rows, and for gate and up, wherever the layout puts them). The parts of a mapped
    family's fused projections (GPT-2's c_attn, Phi-3's qkv_proj with its GQA sizes and
    gate_up_proj, GPT-NeoX's interleaved query_key_value) come from the architecture map.
    This field names further adapted modules, outside the map, that are [q; k; v] stacked in
    equal thirds (same matching rule as target_modules); None: ``UNMAPPED_FUSED_QKV``."""
    dropout: float = 0.1
    """dropout on the adapter input (default 0.1)

    Dropout on the adapter's input (reference recipe: 0.1)."""
    drop_path: float = 0.1
    """DropPath on the adapter output (default 0.1)

    DropPath (per-sample stochastic depth) on the adapter's output (reference: 0.1)."""
    recompute: str | bool = field(
        default="backward", metadata={"flag": "--no-recompute", "invert": True})
    """store delta_W for backward instead of recomputing it (more memory)

    How delta_W is computed and kept out of memory. 'backward' (default): block by block
    (``block_mb``), in forward and in a backward that rebuilds each block from A and B; saves
    x, A, B and one threshold per part, and never holds more than a block of delta_W, its
    kernel, mask and gradient at once (also in eval). The two unblocked paths, which build the
    whole delta_W at once (a transient of several times the weight) and are kept to compare
    against: 'checkpoint': the layer inside a non-reentrant torch.utils.checkpoint (recomputes
    delta_W and the layer's matmul in backward); 'none' (or False): plain autograd, which
    stores delta_W and the mask for backward. True = 'backward'. The command line's
    ``--no-recompute`` gives False."""
    block_mb: float | None = field(default=None, metadata={"metavar": "MIB"})
    """MiB of delta_W's rows built at once in forward, backward and merge (default 4 on a
    CPU, 16 on CUDA; a layer's transient is about six blocks)

    The size in MiB of the block of delta_W's rows (rows x d_in values, 4 bytes each, rounded
    down to whole 64-row tiles, at least one) that the 'backward' path builds at once; a
    layer's transient memory is about six such blocks (the kernel's per-piece distances, the
    block, its mask term, its gradient). None (default): ``DEFAULT_BLOCK_MB`` of the layer's
    device, 4 MiB on a CPU and 16 MiB on CUDA, where a step is bound by the number of small
    kernels rather than by memory traffic (measured on an H100, Linear(4096 -> 11008): 56 ms
    per step at 4 MiB, 33 ms at 16 MiB, for 0.06x and 0.31x the weight above peft LoRA)."""
    compile: bool = field(default=False, metadata={"flag": "--snell-compile"})
    """compute SNELL's kernel with torch.compile (one fused loop; needs a C++ compiler on a
    CPU, triton on CUDA; a one-time compile)

    Run each pass's elementwise work on a block (the kernel, |K| for the threshold, the
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

    base_model_class: str | None = field(default=None, metadata={"cli": False})
    """The transformers class of the base model the adapter was trained on, recorded when it
    is saved so that ``upcycle.tune.load`` rebuilds the base model from the folder alone."""
    base_model_labels: dict | None = field(default=None, metadata={"cli": False})
    """The label mapping (id -> name) of a classification base model, recorded likewise."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = snell_peft_type()
        self.piece_coeffs = tuple(float(c) for c in self.piece_coeffs)
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
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
        if self.target_parameters:
            raise UpcycleError("SNELL adapts modules (target_modules), not bare parameters: "
                               "target_parameters must be empty")
        if not isinstance(self.compile, bool):
            raise UpcycleError(f"SNELL compile must be true or false, got {self.compile!r}")
        if isinstance(self.target_modules, str):
            _check_regex(self.target_modules, "target_modules")
        if isinstance(self.fused_qkv, str):
            _check_regex(self.fused_qkv, "fused_qkv")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["piece_coeffs"] = list(self.piece_coeffs)
        return d

    def method_dict(self) -> dict:
        """SNELL's own settings (the fields of this class, none of PeftConfig's)."""
        own = {f.name for f in fields(SnellConfig)} - {f.name for f in fields(PeftConfig)}
        return {k: v for k, v in self.to_dict().items() if k in own}

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "adapter config") -> SnellConfig:
        """A config from the settings of an adapter folder written by upcycle before SNELL
        was a peft method (``"method": "snell"``), refusing fields it does not know."""
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


__all__ = ["DEFAULT_BLOCK_MB", "DEFAULT_LR", "METHOD", "RECOMPUTE_MODES", "SPARSIFY_MODES",
           "SnellConfig"]
