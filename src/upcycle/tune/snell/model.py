"""``SnellModel``: a base model with SNELL layers injected, peft's interface (merge, unload,
``save_pretrained``/``from_pretrained`` of an adapter folder), and :func:`get_snell_model`."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from ...errors import UpcycleError
from ..adapter import (
    Checkpointing,
    copy_saved_tensors,
    count_parameters,
    find_modules,
    load_adapter,
    save_adapter,
    trainable_report,
)
from .config import METHOD, SnellConfig
from .layer import SnellLayer, adaptable_types
from .targets import _model_type, default_head_modules, default_target_modules, fused_parts


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


class SnellModel(Checkpointing, nn.Module):
    """A base model with SNELL layers injected; forward is the base model's forward.

    An ordinary module: ``.to()``/``.cuda()``/``.half()``, ``state_dict()``, DDP,
    ``torch.compile`` and ``transformers.Trainer`` treat it as they treat the base model."""

    writes_adapter_folder = True
    """``transformers.Trainer.save_model(d)`` (upcycle's trainer) writes the adapter folder."""

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

    # activation checkpointing ----------------------------------------------------------
    def _set_checkpointing(self, kwargs: dict | None, every_n_layers: int, offload: bool) -> None:
        """The base model's own checkpointing, with its input embeddings' output requiring
        grad (as peft does): a frozen embedding would otherwise give the checkpointed layers
        inputs without grad, and reentrant checkpointing would train no SNELL parameter."""
        base = self.base_model
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is None or not hasattr(base, "enable_input_require_grads"):
            if kwargs is None:
                return
            raise UpcycleError(f"activation checkpointing: the base model, a "
                               f"{type(base).__name__}, has no activation_checkpointing_enable "
                               f"(a transformers PreTrainedModel has)")
        base.disable_input_require_grads()  # never two hooks
        if kwargs is None:
            base.activation_checkpointing_disable()
            return
        enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        base.disable_input_require_grads()
        base.enable_input_require_grads()

    # inspection ------------------------------------------------------------------------
    def snell_layers(self) -> dict[str, SnellLayer]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SnellLayer)}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
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
        copy_saved_tensors(expected, tensors, source)
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


__all__ = ["SnellModel", "get_snell_model"]
