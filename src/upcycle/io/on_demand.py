"""Running a model whose parameters stay on disk: each module reads its own parameters just
before its forward and drops them just after (:func:`weights_on_demand`), so a model runs with
the memory of its largest module, not of the whole model.

    with empty_weights():                      # parameters on the meta device
        model = cls(config)
    with weights_on_demand(model, read):       # read(name) -> the tensor, e.g. from a checkpoint
        logits = model(**inputs).logits

The model's own forward runs unchanged (embedding, every layer, the head), so what it computes
is what ``from_pretrained`` + forward would. Used by LEMON's streamed lossless check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def _own_meta_parameters(module: nn.Module) -> list[str]:
    return [name for name, p in module._parameters.items() if p is not None and p.is_meta]


@contextlib.contextmanager
def weights_on_demand(model: nn.Module, read: Callable[[str], torch.Tensor]) -> Iterator[nn.Module]:
    """While inside, every module of ``model`` whose own parameters are on the meta device
    gets them from ``read(dotted parameter name)`` before its forward (as frozen parameters)
    and gives them back after it. A module that reads another module's parameters outside
    that module's forward would see meta tensors: HF models do not."""
    handles = []
    originals: dict[tuple[int, str], tuple[nn.Module, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        names = _own_meta_parameters(module)
        if not names:
            continue
        full = {n: f"{module_name}.{n}" if module_name else n for n in names}
        for n in names:
            originals[(id(module), n)] = (module, module._parameters[n])

        def load(mod, args, _full=full):
            for n, key in _full.items():
                mod._parameters[n] = nn.Parameter(read(key), requires_grad=False)

        def drop(mod, args, output, _full=full):
            for n in _full:
                mod._parameters[n] = originals[(id(mod), n)][1]

        handles.append(module.register_forward_pre_hook(load))
        handles.append(module.register_forward_hook(drop))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for (_, n), (module, param) in originals.items():
            module._parameters[n] = param
