"""SNELL as a peft method: :class:`SnellModel` (peft's ``BaseTuner``, as ``LoraModel`` is
LoRA's), :func:`get_snell_model` (``peft.get_peft_model`` with SNELL's defaults), and the
adapter folders: :func:`save_snell` (atomic) and :func:`load_snell`, which also reads folders
written before SNELL was a peft method (``"method": "snell"``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import get_quantization_kwargs
from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from ...errors import UpcycleError
from ...io.writing import atomic_dir
from ..adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Checkpointing,
    base_model_record,
    check_tensor_shapes,
    copy_saved_tensors,
    find_modules,
    load_adapter,
    module_name_matches,
)
from .config import METHOD, SnellConfig
from .layer import SnellLayer
from .targets import default_head_modules, default_target_modules, fused_layouts_of, part_of

ALL_LINEAR = "all-linear"
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}
"""peft's task type of a transformers model, from the end of its class name."""


class SnellModel(Checkpointing, BaseTuner):
    """SNELL's peft tuner: injects :class:`SnellLayer` into the target modules. Built by
    ``peft.get_peft_model(model, SnellConfig(...))`` (or :func:`get_snell_model`), which wraps
    it in a ``PeftModel``; everything peft offers for LoRA (several named adapters,
    ``set_adapter``, ``disable_adapter()``, ``merge_and_unload``, ``save_pretrained``,
    ``PeftModel.from_pretrained``) works the same way."""

    prefix = "snell_"
    tuner_layer_cls = SnellLayer
    target_module_mapping: dict[str, list[str]] = {}  # defaults: :meth:`_prepare_adapter_config`

    # configuration -----------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: SnellConfig, model_config: dict
                                ) -> SnellConfig:
        """SNELL's defaults (the family's q, k, v, output and MLP matrices; the classifier
        head trained and saved), and a clear error for a pattern that matches nothing."""
        model = self.model
        self._fused_layouts = fused_layouts_of(model)  # once, not per adapted module
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model)
        if peft_config.modules_to_save is None:
            peft_config.modules_to_save = default_head_modules(model)
        if peft_config.target_modules != ALL_LINEAR:
            targets = find_modules(model, peft_config.target_modules,
                                   argument="SNELL target_modules")
            for name, _ in targets:
                if module_name_matches(name, peft_config.modules_to_save or []):
                    raise UpcycleError(f"module {name!r} is both a SNELL target and in "
                                       f"modules_to_save")
        return peft_config

    def _post_injection_hook(self, model: nn.Module, config: SnellConfig,
                             adapter_name: str) -> None:
        """Record the base model's class and labels in the config, so that the adapter
        folder alone rebuilds the base model (``upcycle.tune.load``)."""
        record = base_model_record(model)
        config.base_model_class = config.base_model_class or record.get("base_model_class")
        config.base_model_labels = config.base_model_labels or record.get("base_model_labels")

    def _create_and_replace(self, peft_config: SnellConfig, adapter_name: str,
                            target: nn.Module, target_name: str, parent: nn.Module,
                            current_key: str, **optional_kwargs) -> None:
        parts = part_of(current_key, self._fused_layouts, peft_config.fused_qkv)
        if isinstance(target, SnellLayer):
            target.update_layer(adapter_name, peft_config, parts=parts,
                                inference_mode=peft_config.inference_mode)
            return
        quantization = get_quantization_kwargs(self.model)
        new = SnellLayer(target, peft_config, adapter_name, parts=parts, name=current_key,
                         **quantization)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # a further adapter is not trained until set active
        self._replace_module(parent, target_name, new, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module,
                        child: nn.Module) -> None:
        """Put ``new_module`` in ``child``'s place. A SnellLayer makes its factors on its base
        weight's device, and unloading returns modules as they are, so nothing is moved or
        re-tied here (peft's default would copy ``child.weight`` onto modules without one,
        such as RoBERTa's classification head, and fail)."""
        setattr(parent, child_name, new_module)

    # activation checkpointing ----------------------------------------------------------
    def _set_checkpointing(self, kwargs: dict | None, every_n_layers: int, offload: bool) -> None:
        """The base model's own checkpointing, with its input embeddings' output requiring
        grad (as peft does): a frozen embedding would otherwise give the checkpointed layers
        inputs without grad, and reentrant checkpointing would train no SNELL parameter."""
        base = self.model
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
        """The SNELL layers, by their names in the base model."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, SnellLayer)}

    @property
    def snell_config(self) -> SnellConfig:
        """The config of the (first) active adapter."""
        return self.peft_config[self.active_adapters[0]]

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | Path, *,
                        is_trainable: bool = False, adapter_name: str = "default") -> PeftModel:
        """:func:`load_snell` (kept for the name users know from peft and earlier versions)."""
        return load_snell(model, folder, is_trainable=is_trainable, adapter_name=adapter_name)


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for end, task in TASK_TYPES.items() if name.endswith(end)), None)


def get_snell_model(model: nn.Module, config: SnellConfig | None = None, *,
                    adapter_name: str = "default", **overrides) -> PeftModel:
    """``peft.get_peft_model(model, config)`` for SNELL: ``model`` (any nn.Module) gets SNELL
    layers in its target modules and everything else is frozen but the modules_to_save.
    Keyword ``overrides`` replace fields of ``config`` (which is never mutated); peft's
    ``task_type`` is taken from a transformers model's class when the config has none."""
    config = dataclasses.replace(config or SnellConfig(), **overrides)
    if any(isinstance(m, SnellLayer) for m in model.modules()):
        raise UpcycleError("the model already holds SNELL adapters (add another one with "
                           "peft_model.add_adapter(name, config))")
    if config.task_type is None:
        config.task_type = _task_type(model)
    return get_peft_model(model, config, adapter_name=adapter_name)


# adapter folders -------------------------------------------------------------------------
def save_snell(model: PeftModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """``model.save_pretrained`` into ``out`` atomically (peft's folder: adapter_config.json
    with ``"peft_type": "SNELL"`` and adapter_model.safetensors)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
    return Path(out)


def _read_record(folder: Path) -> dict:
    if not folder.is_dir():
        raise UpcycleError(f"adapter folder {folder}: no such folder")
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise UpcycleError(f"adapter folder {folder} is incomplete: missing {ADAPTER_CONFIG}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpcycleError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise UpcycleError(f"{path}: expected a JSON object")
    return record


def _peft_config(record: dict, path: Path) -> SnellConfig:
    known = {f.name for f in dataclasses.fields(SnellConfig)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise UpcycleError(f"{path}: unknown SNELL config field(s) {unknown}")
    try:
        return SnellConfig(**record)
    except TypeError as exc:
        raise UpcycleError(f"{path}: {exc}") from exc


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UpcycleError(f"adapter folder {folder} is incomplete: missing {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UpcycleError(f"{path}: not a readable safetensors file (truncated?): "
                           f"{exc}") from exc


def _legacy_tensors(model: PeftModel, config: SnellConfig, adapter: str
                    ) -> dict[str, torch.Tensor]:
    """The live tensors a folder of the earlier format names (A, B, the coefficients when
    learnable, the modules_to_save's parameters), by its names."""
    tuner = model.base_model
    state: dict[str, torch.Tensor] = {}
    for name, layer in tuner.snell_layers().items():
        state[f"{name}.snell_A"] = layer.snell_A[adapter]
        state[f"{name}.snell_B"] = layer.snell_B[adapter]
        if config.learnable_coeffs:
            state[f"{name}.snell_coeffs"] = layer.snell_coeffs[adapter]
    for module_name in config.modules_to_save or []:
        wrapper = tuner.model.get_submodule(module_name)
        module = wrapper.modules_to_save[adapter] if hasattr(wrapper, "modules_to_save") \
            else wrapper
        for pname, p in module.named_parameters():
            state[f"{module_name}.{pname}"] = p
    return state


def load_snell(model: nn.Module, folder: str | Path, *, is_trainable: bool = False,
               adapter_name: str = "default") -> PeftModel:
    """The SNELL adapter saved in ``folder`` on ``model`` (its base model), as a
    ``PeftModel``: a peft folder (``"peft_type": "SNELL"``, what ``save_pretrained`` writes)
    or one written by upcycle before SNELL was a peft method (``"method": "snell"``). Every
    tensor is checked by name and shape first; one error names the first that differs. In
    eval mode with nothing trainable unless ``is_trainable``."""
    folder = Path(folder)
    record = _read_record(folder)
    source = f"adapter {folder}"
    if record.get("method") == METHOD:  # the earlier format
        raw, tensors = load_adapter(folder, METHOD)
        raw.pop("base_model_type", None)
        config = SnellConfig.from_dict(raw, source=source)
        wrapped = get_snell_model(model, config, adapter_name=adapter_name)
        copy_saved_tensors(_legacy_tensors(wrapped, config, adapter_name), tensors, source)
    elif record.get("peft_type") == "SNELL":
        config = _peft_config(record, folder / ADAPTER_CONFIG)
        tensors = _read_tensors(folder)
        wrapped = get_snell_model(model, config, adapter_name=adapter_name)
        expected = get_peft_model_state_dict(wrapped, adapter_name=adapter_name)
        check_tensor_shapes(expected, tensors, source)
        set_peft_model_state_dict(wrapped, tensors, adapter_name=adapter_name)
    else:
        kind = record.get("peft_type") or record.get("method")
        raise UpcycleError(f"{folder / ADAPTER_CONFIG}: holds a {kind!r} adapter, expected a "
                           f"SNELL one")
    if not is_trainable:
        for p in wrapped.parameters():
            p.requires_grad_(False)
        wrapped.eval()
    return wrapped


__all__ = ["SnellModel", "get_snell_model", "load_snell", "save_snell"]
