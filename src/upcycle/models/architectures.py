"""The old home of the architecture map, kept for one release: the map itself is
:mod:`upcycle.models.families`, matching a model to it :mod:`upcycle.models.matching`, the
piecewise runner :mod:`upcycle.models.backbone`."""

from .backbone import (
    base_model,
    call_layer,
    classification_logits,
    classifier_modules,
    embed,
    final_norm_module,
    layer_kwargs,
    layer_list,
    layer_mask,
    layer_windows,
)
from .families import (
    ARCHITECTURES,
    MLP,
    Architecture,
    Attention,
    Dims,
    Fused,
    Head,
    LayerCall,
    register,
    supported,
)
from .matching import (
    FusedLayout,
    Match,
    Sizes,
    architecture_of,
    base_prefix,
    eps_of,
    fused_layouts,
    model_fused_layouts,
    sizes_of,
    snell_target_modules,
)

__all__ = [
    "ARCHITECTURES", "Architecture", "Attention", "Dims", "Fused", "FusedLayout", "Head",
    "LayerCall", "MLP", "Match", "Sizes", "architecture_of", "base_model", "base_prefix",
    "call_layer", "classification_logits", "classifier_modules", "embed", "eps_of",
    "final_norm_module", "fused_layouts", "layer_kwargs", "layer_list", "layer_mask",
    "layer_windows", "model_fused_layouts", "register", "sizes_of", "snell_target_modules",
    "supported",
]
