"""What the tuning methods share: the trainable-parameter report and adapter save/load.

An adapter folder holds ``adapter_config.json`` (the method name, the marker
``"upcycle_adapter": "<method>"`` that tells it from a peft adapter, its config and, as peft
does, the base model it was trained on: ``base_model_name_or_path``, plus the model class
and its label mapping) and ``adapter_model.safetensors`` (only the trained tensors),
written atomically. :func:`load` rebuilds base + adapter from the folder alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UpcycleError
from ..io.lora import UPCYCLE_ADAPTER_KEY
from ..io.writing import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class TunerConfig:
    """What every tuner's dataclass config offers besides its fields: ``to_dict`` and
    ``to_json_string``, the two methods ``transformers``' callbacks (TensorBoard, W&B, ...) call
    on ``model.config`` when a wrapped model is trained with ``Trainer``."""

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict, source: str = "adapter config"):
        """The config a saved ``adapter_config.json`` describes; an unknown field is an
        error naming ``source``."""
        from dataclasses import fields

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UpcycleError(f"{source}: unknown field {unknown[0]!r} (known: {sorted(known)})")
        return cls(**data)


def check_recorded_backbone(saved: dict | None, here: dict, source: str) -> None:
    """An adapter's recorded ``base`` description (family, sizes, head) against the model it
    is loaded onto (``here``, same keys); None (an old folder) is not checked."""
    if saved is None:
        return
    mismatch = [(k, saved.get(k), now) for k, now in here.items() if saved.get(k) != now]
    if mismatch:
        what = ", ".join(f"{k} {was!r} (base model: {now!r})" for k, was, now in mismatch)
        raise UpcycleError(f"{source} were trained on another backbone: {what}")


class Checkpointing:
    """Activation (gradient) checkpointing with ``transformers``' switches, as
    ``Trainer(gradient_checkpointing=True)`` (or ``activation_checkpointing=True``) calls them:
    ``activation_checkpointing_enable``/``_disable``, their deprecated ``gradient_*`` aliases
    and ``is_activation_checkpointing``/``is_gradient_checkpointing``. A tuner says what is
    recomputed in :meth:`_set_checkpointing`; :meth:`checkpointed` runs one of its own blocks
    under ``torch.utils.checkpoint`` when the switch is on and the block takes part in
    autograd. The default ``checkpoint`` arguments are ``use_reentrant=False``, as
    ``transformers``' own."""

    _checkpointing: dict | None = None
    """``checkpoint``'s keyword arguments plus ``every_n_layers`` and ``offload``, or None."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        kwargs = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise UpcycleError(f"every_n_layers: expected a positive integer, got "
                               f"{every_n_layers!r}")
        self._set_checkpointing(kwargs, every_n_layers, offload)
        self._checkpointing = {"kwargs": kwargs, "every_n_layers": every_n_layers,
                               "offload": bool(offload)}

    def activation_checkpointing_disable(self) -> None:
        self._set_checkpointing(None, 1, False)
        self._checkpointing = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (transformers' older name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Alias of :meth:`activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self._checkpointing is not None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing is not None

    def _set_checkpointing(self, kwargs: dict | None, every_n_layers: int, offload: bool) -> None:
        """Switch the tuner's own recomputation on (``kwargs``) or off (None)."""

    def checkpointed(self, index: int, function, *args):
        """``function(*args)``, recomputed in the backward pass when checkpointing is on, the
        module trains and this is block ``index`` of every ``every_n_layers``."""
        state = self._checkpointing
        if state is None or not self.training or not torch.is_grad_enabled() \
                or index % state["every_n_layers"]:
            return function(*args)
        if state["offload"]:
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return checkpoint(function, *args, **state["kwargs"])
        return checkpoint(function, *args, **state["kwargs"])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared parameter counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """peft's format: 'trainable params: X || all params: Y || trainable%: Z'."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


BASE_MODEL_KEYS = ("base_model_name_or_path", "base_model_class", "base_model_labels")


def base_model_record(model: nn.Module | None) -> dict:
    """What an adapter records about its base model (peft's ``base_model_name_or_path``,
    the transformers class, and the label mapping of a classification head) so that
    :func:`load` can rebuild it."""
    config = getattr(model, "config", None)
    if model is None or config is None:
        return {}
    record = {"base_model_name_or_path": getattr(config, "_name_or_path", None) or None}
    cls = type(model)
    if cls.__module__.startswith("transformers"):
        record["base_model_class"] = cls.__name__
    if "Classification" in cls.__name__ and getattr(config, "id2label", None):
        record["base_model_labels"] = {str(i): name for i, name in config.id2label.items()}
    return record


def save_adapter(out: str | os.PathLike, method: str, config: Mapping, tensors: Mapping[str, torch.Tensor],
                 *, overwrite: bool = False, base_model: nn.Module | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically into ``out``;
    ``base_model`` (the HF model the adapter was trained on) is recorded for :func:`load`."""
    record = {"method": method, UPCYCLE_ADAPTER_KEY: method, **base_model_record(base_model),
              **config}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "method": method})
    return Path(out)


def load_adapter(folder: str | os.PathLike, method: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an adapter folder written by :func:`save_adapter`; clear errors when incomplete."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UpcycleError(f"adapter folder {folder}: no such folder")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / f).is_file()]
    if missing:
        raise UpcycleError(f"adapter folder {folder} is incomplete: missing {', '.join(missing)}")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise UpcycleError(f"{folder / ADAPTER_CONFIG}: not valid JSON: {exc}") from exc
    if config.get("method") != method:
        raise UpcycleError(f"{folder / ADAPTER_CONFIG}: holds a {config.get('method')!r} adapter, "
                           f"expected {method!r}")
    config.pop("method")
    for key in (UPCYCLE_ADAPTER_KEY, *BASE_MODEL_KEYS):
        config.pop(key, None)
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise UpcycleError(f"{folder / ADAPTER_WEIGHTS}: not a readable safetensors file "
                           f"(truncated?): {exc}") from exc
    return config, tensors


def copy_saved_tensors(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor],
                       source: str) -> None:
    """Copy a saved adapter's tensors into the model's (``expected``: name -> the model's
    tensor), each in the model's dtype, after checking that they are exactly these tensors."""
    check_tensor_shapes(expected, loaded, source)
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(loaded[name].to(target.dtype))


def check_tensor_shapes(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor],
                        source: str) -> None:
    """Every expected tensor present in ``loaded`` with the same shape; name the first that is not."""
    for name, t in expected.items():
        if name not in loaded:
            raise UpcycleError(f"{source}: tensor {name!r} is missing")
        if tuple(loaded[name].shape) != tuple(t.shape):
            raise UpcycleError(f"{source}: tensor {name!r} has shape {tuple(loaded[name].shape)}, "
                               f"the base model needs {tuple(t.shape)} (a different base model?)")
    extra = sorted(set(loaded) - set(expected))
    if extra:
        raise UpcycleError(f"{source}: tensor {extra[0]!r} does not belong to this model "
                           f"({len(extra)} unexpected tensors)")


# -- module matching by name (peft's rules) ----------------------------------------------------

def module_name_matches(name: str, patterns) -> bool:
    """peft's rule: a string is a regex that must match the whole dotted name; a list holds
    names that match the full name or its ending (``"query"`` matches ``"...self.query"``)."""
    import re

    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_modules(model: nn.Module, patterns, *, argument: str = "target_modules"
                 ) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` matching ``patterns``; every list entry (or the
    regex) must match something, else an error listing the module names that exist."""
    named = [(n, m) for n, m in model.named_modules() if n]
    matched = [(n, m) for n, m in named if module_name_matches(n, patterns)]
    unmatched = ([patterns] if not matched else []) if isinstance(patterns, str) else [
        p for p in patterns if not any(module_name_matches(n, [p]) for n, _ in named)]
    if unmatched:
        leaves = sorted({n.split(".")[-1] for n, m in named
                         if not list(m.children()) and not n.split(".")[-1].isdigit()})
        raise UpcycleError(
            f"{argument}: {', '.join(repr(p) for p in unmatched)} matches no module of "
            f"{type(model).__name__}; its leaf modules are named: {', '.join(leaves[:40])}"
            + (" ..." if len(leaves) > 40 else "")
        )
    return matched
