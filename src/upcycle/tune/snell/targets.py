"""Which modules of a model SNELL adapts by default, how each fused projection splits into
parts, and which task head is trained with the adapter: from the architecture map
(:mod:`upcycle.models.families`), with SNELL-only defaults for families outside it."""

from __future__ import annotations

from torch import nn

from ...errors import UpcycleError
from ...models.families import supported
from ...models.matching import architecture_of, model_fused_layouts, snell_target_modules
from ..adapter import module_name_matches
from .parts import RowParts, row_parts

# Default targets and fused layouts come from the architecture map
# (upcycle.models.families: snell_target_modules, model_fused_layouts). Families SNELL adapts
# that the map does not describe (no other method supports them) keep their SNELL-only
# defaults here: ELECTRA has BERT's layer layout, DeiT ViT's.
UNMAPPED_TARGET_MODULES: dict[str, list[str]] = {
    "electra": ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"],
    # transformers 5's DeiT layer (4.x: attention.attention.query, ..., intermediate.dense)
    "deit": ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
             "mlp.fc1", "mlp.fc2"],
}

# Fused [q; k; v] projections of models outside the map (timm's ``qkv``), split into equal
# thirds when ``SnellConfig.fused_qkv`` is None. Mapped families take their layout (GQA
# sizes, interleaving, gate/up) from the map.
UNMAPPED_FUSED_QKV = ["c_attn", "qkv"]

# Classification heads trained (and saved) with the adapter when modules_to_save is None.
HEAD_NAMES = ("classifier", "score", "head", "lm_head")


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _architecture(model: nn.Module):
    """The model's entry in the architecture map, or None when the map does not know it."""
    try:
        return architecture_of(model, method="SNELL")
    except UpcycleError:
        return None


def default_target_modules(model: nn.Module) -> list[str]:
    """The family's q, k, v (or fused qkv), attention output and MLP matrices of every layer,
    from the architecture map (``snell_target_modules``): layer-relative paths that match a
    module whose dotted name ends with them."""
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


def fused_layouts_of(model: nn.Module) -> dict:
    """The architecture map's fused projections of ``model`` by full module name (empty
    outside the map); found once per model, then looked up by :func:`part_of`."""
    return model_fused_layouts(model) if _architecture(model) is not None else {}


def part_of(name: str, layouts: dict, fused_qkv=None) -> RowParts | int:
    """How module ``name`` is split into parts: the layout of the architecture map for a
    mapped fused projection (row indices per part), 3 equal slices for a module matching
    ``fused_qkv`` (None: ``UNMAPPED_FUSED_QKV``) outside the map, else 1."""
    if name in layouts:
        layout = layouts[name]
        return row_parts(layout.indices(), layout.rows, name=f"module {name!r}")
    return 3 if _matches(name, UNMAPPED_FUSED_QKV if fused_qkv is None else fused_qkv) else 1


def fused_parts(model: nn.Module, names, fused_qkv=None) -> dict[str, RowParts | int]:
    """:func:`part_of` for each of the modules ``names`` of ``model``."""
    layouts = fused_layouts_of(model)
    return {name: part_of(name, layouts, fused_qkv) for name in names}


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
    return patterns is not None and module_name_matches(name, patterns)


__all__ = [
    "HEAD_NAMES",
    "UNMAPPED_FUSED_QKV",
    "UNMAPPED_TARGET_MODULES",
    "default_head_modules",
    "default_target_modules",
    "fused_layouts_of",
    "fused_parts",
    "part_of",
]
