"""peft LoRA adapters as soup ingredients: ``theta_i = theta_base + Delta W_i``, one tensor at a time.

A LoRA adapter folder (``adapter_config.json`` with ``peft_type: LORA`` and
``adapter_model.safetensors``/``.bin``) plus the base model it was trained from is an
ingredient like any checkpoint: :class:`LoraIngredient` has the interface of
:class:`upcycle.io.checkpoints.Ingredient` (``keys``, ``shape``, ``dtype``, ``get``,
``state_dict``, ``label``, ``path``, ``index``, ``hf_dir``), so every soup method works on it
unchanged. ``get(name)`` reads the base tensor and, when the adapter targets it, adds

    Delta W = scale * B @ A,   scale = lora_alpha / r  (lora_alpha / sqrt(r) with use_rslora),

transposed for ``fan_in_fan_out`` (GPT-2's ``Conv1D`` stores weights as (in, out)) and for
embeddings, with ``rank_pattern``/``alpha_pattern`` applied per module as peft does. Tensors
the adapter saved whole (``modules_to_save``, trained biases) replace the base's. Nothing
merged is kept: N adapters never cost N models.

The uniform soup of adapters is therefore the mean of the merged models, which is NOT the
model with the mean of the A's and the mean of the B's.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UpcycleError
from .checkpoints import (
    Ingredient,
    _short,
    checked,
    config_differences,
    error_line,
    read_config_json,
)
from .model_files import tied_groups_of_folder
from .source import SourceReads

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.weight)?$")
# config fields whose non-default values change what merging means: refused, not ignored
_UNSUPPORTED = {"use_dora": "DoRA", "target_parameters": "LoRA on nn.Parameter targets",
                "layer_replication": "layer replication", "use_qalora": "QALoRA",
                "trainable_token_indices": "trainable tokens", "use_bdlora": "BD-LoRA"}
UPCYCLE_ADAPTER_KEY = "upcycle_adapter"
"""The marker of an adapter folder written for an upcycle tuner: ``adapter_config.json`` holds
``"upcycle_adapter": "<method>"`` (beside ``"method"``) and no ``peft_type``, so that it is never
taken for a peft adapter."""
_NOT_SOUPABLE = {
    "snell": "soup the folder written by `upcycle tune --merge` (its merged/ folder, a plain "
             "HF model with the update folded in), not the adapter",
    "sherl": "it cannot be souped (it replaces the forward; its MTSA is no weight update of "
             "the base model); soup full fine-tunes or LoRA adapters instead",
    "lst": "it cannot be souped (it replaces the forward; its side network is no weight "
           "update of the base model); soup full fine-tunes or LoRA adapters instead",
}


def is_adapter(path: str | os.PathLike) -> bool:
    """A peft adapter folder (``adapter_config.json``, and no full model weights)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not any(
        (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                       "pytorch_model.bin"))


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first pattern matching the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraIngredient(SourceReads):
    """A LoRA adapter on ``base`` (an :class:`Ingredient`), read lazily one tensor at a time."""

    def __init__(self, path: str | os.PathLike, base: Ingredient, index: int = 1):
        self.path = Path(path)
        self.index = index
        self.base = base
        self.hf_dir = base.hf_dir
        self._file: Path | None = None
        self._torch_state: dict[str, torch.Tensor] | None = None
        self._adapter_meta: dict[str, tuple[int, ...]] = {}
        # base tensor name -> (A key, B key, scale, transpose)
        self._lora: dict[str, tuple[str, str, float, bool]] = {}
        self._replace: dict[str, str] = {}  # base tensor name -> adapter key
        self._open()

    @property
    def whole_files(self) -> list[Path]:
        """The base's files loaded whole (see :attr:`Ingredient.whole_files`); the adapter
        itself is small."""
        return self.base.whole_files

    @property
    def label(self) -> str:
        return f"ingredient {self.index} ({_short(self.path)}, LoRA adapter)"

    def __repr__(self) -> str:
        return f"LoraIngredient({str(self.path)!r}, base={str(self.base.path)!r}, index={self.index})"

    # -- opening ---------------------------------------------------------------------------
    def _open(self) -> None:
        cfg_file = self.path / ADAPTER_CONFIG
        if not cfg_file.is_file():
            raise UpcycleError(f"{self.label}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UpcycleError(f"{self.label}: {ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise UpcycleError(f"{self.label}: {ADAPTER_CONFIG} holds a JSON "
                               f"{type(config).__name__}, expected an object")
        if config.get("peft_type") != "LORA":
            raise UpcycleError(f"{self.label}: peft_type {config.get('peft_type')}; only LoRA "
                               f"adapters (peft_type LORA) can be souped")
        for key, what in _UNSUPPORTED.items():
            if config.get(key):
                raise UpcycleError(f"{self.label}: uses {what} ({key} in {ADAPTER_CONFIG}), "
                                   f"which cannot be merged as base + scale * B @ A")
        self.config = config
        self._check_recorded_base(config.get("base_model_name_or_path"))
        self._open_weights()
        lora_parts: dict[str, dict[str, str]] = {}
        for key in self._adapter_meta:
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            name = name.replace(".base_layer.", ".")  # a trained bias of a LoRA-wrapped layer
            m = _LORA_KEY.match(name)
            if m:
                lora_parts.setdefault(m["module"], {})[m["part"]] = key
            else:
                self._replace[self._base_name(name, key)] = key
        if not lora_parts and not self._replace:
            raise UpcycleError(f"{self.label}: the adapter holds no LoRA tensors")
        for module, parts in lora_parts.items():
            self._add_lora(module, parts, config)
        for group in self._tied:
            self._tie(group)

    def _check_recorded_base(self, recorded) -> None:
        """When the adapter names its base as an existing folder, that folder must describe the
        same model as the base given (config and weights)."""
        if not recorded or self.base.hf_dir is None:
            return
        rec = Path(recorded)
        if not (rec / "config.json").is_file() or not (self.base.hf_dir / "config.json").is_file():
            return
        if rec.resolve() == self.base.hf_dir.resolve():
            return
        a = read_config_json(rec, f"{self.label}: its recorded base")
        b = read_config_json(self.base.hf_dir, f"{self.label}: its base")
        diff = config_differences(a, b)
        if diff:
            shown = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff[:3])
            raise UpcycleError(f"{self.label}: trained on {recorded}, whose config differs from "
                               f"the base {_short(self.base.path)} ({shown}): an adapter for "
                               f"another base")
        try:
            recorded_base = Ingredient(rec)
        except UpcycleError:
            return
        for name in self.base.keys():  # one weight matrix (biases and norms often start equal)
            if (name in recorded_base.keys() and self.base.dtype(name).is_floating_point
                    and len(self.base.shape(name)) >= 2):
                x, y = recorded_base.get(name).float(), self.base.get(name).float()
                if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-2, atol=1e-3):
                    raise UpcycleError(
                        f"{self.label}: trained on {recorded}, whose weights differ from the "
                        f"base {_short(self.base.path)} (e.g. {name!r}): an adapter for "
                        f"another base")
                break

    def _open_weights(self) -> None:
        for fname in ADAPTER_WEIGHTS:
            file = self.path / fname
            if file.is_file():
                self._file = file
                break
        else:
            raise UpcycleError(f"{self.label}: no adapter weights (expected "
                               f"{' or '.join(ADAPTER_WEIGHTS)})")
        try:
            if self._file.suffix == ".safetensors":
                with safe_open(str(self._file), framework="pt") as handle:
                    for key in handle.keys():
                        self._adapter_meta[key] = tuple(handle.get_slice(key).get_shape())
            else:
                state = torch.load(self._file, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(state, dict) or not all(
                        isinstance(v, torch.Tensor) for v in state.values()):
                    raise UpcycleError(f"{self.label}: {_short(self._file)} does not hold a "
                                       f"state dict of tensors")
                self._torch_state = dict(state)
                self._adapter_meta = {k: tuple(v.shape) for k, v in state.items()}
        except UpcycleError:
            raise
        except Exception as exc:
            raise UpcycleError(f"{self.label}: {_short(self._file)} is not readable: "
                               f"{error_line(exc)}") from exc

    @property
    def _tied(self) -> list[list[str]]:
        """The base's tied parameter groups (``[model.embed_tokens.weight, lm_head.weight]``)."""
        if not hasattr(self, "_tied_groups"):
            folder = self.base.hf_dir
            self._tied_groups = (tied_groups_of_folder(folder) if folder is not None
                                 and (folder / "config.json").is_file() else [])
        return self._tied_groups

    def _tie(self, group: list[str]) -> None:
        """A tied parameter is one tensor: the adapter's change of any of its names (a
        ``modules_to_save`` head, a LoRA on the embedding) is the change of that one tensor,
        under every name the base stores, as peft does with ``ensure_weight_tying=True`` and
        as its ``merge_and_unload`` does for a LoRA on a tied embedding. When the adapter
        trained only some names of the group, one warning says so (peft without
        ``ensure_weight_tying`` would leave a saved head untied from the embedding)."""
        touched = [n for n in group if n in self._lora or n in self._replace]
        if not touched:
            return
        stored = [n for n in group if n in set(self.base.keys())]
        source = next((n for n in touched if n in stored), touched[0])
        replaced, lora = self._replace.get(source), self._lora.get(source)
        for name in group:
            self._replace.pop(name, None)
            self._lora.pop(name, None)
        for name in stored:
            if replaced is not None:
                self._replace[name] = replaced
            if lora is not None:
                self._lora[name] = lora
        if len(touched) < len(group):
            how = "has a LoRA on" if lora is not None else "saves"
            others = ", ".join(repr(n) for n in group if n not in touched)
            print(f"upcycle: warning: {self.label}: the adapter {how} {touched[0]!r} of a model "
                  f"whose {others} is the same tensor (tied): it enters the soup as that one "
                  f"tensor, so {others} changes too (as peft's ensure_weight_tying=True and its "
                  f"merge_and_unload of a tied embedding do)", file=sys.stderr)

    def _base_name(self, name: str, adapter_key: str) -> str:
        """The base's tensor name for a (prefix-stripped) adapter tensor name (a name of a
        tied parameter the base does not store, e.g. ``lm_head.weight``, as it is)."""
        keys = [*self.base.keys(), *(n for g in self._tied for n in g)]
        if name in keys:
            return name
        parts = name.split(".")
        for k in range(1, len(parts) - 1):  # adapter saved from a wrapper: drop leading parts
            if ".".join(parts[k:]) in keys:
                return ".".join(parts[k:])
        matches = [key for key in keys if key.endswith("." + name)]
        if len(matches) == 1:
            return matches[0]
        raise UpcycleError(f"{self.label}: adapter tensor {adapter_key!r} targets {name!r}, "
                           f"which base {_short(self.base.path)} lacks: an adapter for another "
                           f"base?")

    def _add_lora(self, module: str, parts: dict[str, str], config: dict) -> None:
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise UpcycleError(f"{self.label}: module {module!r} has only one of its LoRA "
                               f"matrices A and B")
        target = self._base_name(module + ".weight", a_key)
        a_shape, b_shape = self._adapter_meta[a_key], self._adapter_meta[b_key]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise UpcycleError(f"{self.label}: module {module!r}: only LoRA on linear and "
                               f"embedding layers can be merged (A has shape {a_shape})")
        r = a_shape[0]
        if b_shape[1] != r:
            raise UpcycleError(f"{self.label}: module {module!r}: A is {a_shape}, B is {b_shape}: "
                               f"ranks differ")
        expected_r = _pattern_value(config.get("rank_pattern"), module, config.get("r", r))
        if expected_r != r:
            raise UpcycleError(f"{self.label}: module {module!r} has rank {r}, its config says "
                               f"{expected_r}")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        delta_shape = (b_shape[0], a_shape[1])  # (out, in)
        base_shape = self._shape_of(target)
        transpose = bool(embedding or config.get("fan_in_fan_out"))
        shape = delta_shape[::-1] if transpose else delta_shape
        if shape != base_shape:
            if delta_shape[::-1] == base_shape and not transpose and delta_shape[0] != delta_shape[1]:
                transpose = True  # a Conv1D target saved without fan_in_fan_out
            else:
                raise UpcycleError(f"{self.label}: module {module!r}: B @ A has shape "
                                   f"{delta_shape}, the base's {target!r} has {base_shape}: an "
                                   f"adapter for another base")
        self._lora[target] = (a_key, b_key, float(scale), transpose)

    def _shape_of(self, name: str) -> tuple[int, ...]:
        """The base's shape of ``name``, or of the stored name of its tied group."""
        if name in set(self.base.keys()):
            return self.base.shape(name)
        group = next(g for g in self._tied if name in g)
        return self.base.shape(next(n for n in group if n in set(self.base.keys())))

    # -- reading ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def numel(self) -> int:
        return self.base.numel()

    @property
    def targets(self) -> list[str]:
        """Base tensors this adapter changes (LoRA targets and replaced tensors)."""
        return sorted(set(self._lora) | set(self._replace))

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        if self._torch_state is not None:
            return self._torch_state[key]
        with safe_open(str(self._file), framework="pt") as handle:
            return handle.get_tensor(key)

    check_finite = False
    """Check every merged tensor for NaN/Inf as it is formed (see :class:`Ingredient`)."""

    def get(self, name: str) -> torch.Tensor:
        """The merged tensor (:meth:`_merged`), checked when :attr:`check_finite` is set."""
        t = self._merged(name)
        return checked(self, name, t) if self.check_finite else t

    def _merged(self, name: str) -> torch.Tensor:
        """The merged tensor ``name`` (base + scale * B @ A, fp32 arithmetic, base dtype),
        formed now and not kept."""
        if name in self._replace:  # saved whole (modules_to_save, a trained bias, or an
            base = self._adapter_tensor(self._replace[name])  # embedding saved with its LoRA)
            if tuple(base.shape) != self.base.shape(name):
                raise UpcycleError(f"{self.label}: saved tensor {name!r} has shape "
                                   f"{tuple(base.shape)}, the base's has {self.base.shape(name)}")
            base = base.to(self.base.dtype(name))
        else:
            base = self.base.get(name)
        if name not in self._lora:
            return base
        a_key, b_key, scale, transpose = self._lora[name]
        a = self._adapter_tensor(a_key).to(torch.float32)
        b = self._adapter_tensor(b_key).to(torch.float32)
        delta = (b @ a) * scale
        if transpose:
            delta = delta.T
        return (base.to(torch.float32) + delta).to(base.dtype)



def upcycle_tuner_of(config: dict) -> str | None:
    """The upcycle tuner ("snell", "sherl", "lst") an ``adapter_config.json`` belongs to: its
    :data:`UPCYCLE_ADAPTER_KEY` marker, the ``method`` of folders written before it, or
    ``"peft_type": "SNELL"`` (SNELL as a peft method); None for anything else."""
    for value in (config.get(UPCYCLE_ADAPTER_KEY), config.get("method"),
                  config.get("peft_type")):
        if isinstance(value, str) and value.lower() in _NOT_SOUPABLE:
            return value.lower()
    return None


def refuse_upcycle_adapter(path: str | os.PathLike, index: int) -> None:
    """One error saying what to do instead when ``path`` is the adapter folder of an upcycle
    tuner (SNELL: soup its ``--merge`` folder; SHERL, LST: not soupable)."""
    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return  # LoraIngredient reports it
    method = upcycle_tuner_of(config) if isinstance(config, dict) else None
    if method is not None:
        raise UpcycleError(f"ingredient {index} ({_short(Path(path))}): a {method.upper()} "
                           f"adapter (upcycle tune --method {method}), not a LoRA adapter: "
                           f"{_NOT_SOUPABLE[method]}")


def open_adapter(path: str | os.PathLike, base: Ingredient | str | os.PathLike | None,
                 index: int = 1) -> LoraIngredient:
    """A LoRA adapter folder as an ingredient on ``base`` (a path or an opened Ingredient);
    an upcycle tuner's adapter folder is refused with what to do instead."""
    refuse_upcycle_adapter(path, index)
    if base is None:
        raise UpcycleError(f"ingredient {index} ({_short(Path(path))}): a LoRA adapter "
                           f"({ADAPTER_CONFIG}): pass --base (base=) with the model it was "
                           f"trained from")
    if not isinstance(base, Ingredient):
        base = Ingredient(base, index=0)
    return LoraIngredient(path, base, index)
