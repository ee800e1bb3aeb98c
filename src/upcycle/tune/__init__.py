"""Memory-efficient tuning of pretrained models: SNELL (``upcycle.tune.snell``), SHERL
(``upcycle.tune.sherl``) and LST (``upcycle.tune.lst``), with their shared adapter format in
``upcycle.tune.adapter``.

:data:`TUNERS` is the one registry of tuners: ``upcycle tune --method NAME``, :func:`load`
and the docs read it. A new tuner is one package (or module) plus one entry here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UpcycleError
from ..io.model_files import check_no_custom_code
from .adapter import ADAPTER_CONFIG, TunerConfig
from .sherl import DEFAULT_LR as SHERL_DEFAULT_LR
from .sherl import SherlConfig, SherlModel, get_sherl_model
from .sherl import check_model_config as sherl_check_model_config
from .snell import DEFAULT_LR as SNELL_DEFAULT_LR
from .snell import SnellConfig, SnellModel, get_snell_model, save_snell


@dataclass(frozen=True)
class Tuner:
    """One tuner: its config dataclass (whose fields and docstrings are the CLI flags), the
    function wrapping a loaded HF model, the model class (``from_pretrained(base, folder)``
    loads a saved adapter), the function writing a wrapped model's adapter folder
    atomically (``save(model, out, overwrite=)``), whether ``merge_and_unload`` folds it into
    a plain model, whether it tunes causal LMs (else classifiers only), its default peak
    learning rate, and ``check_model_config(hf_config, config)``: what it refuses from the
    model's config.json alone, before the weights load (None: nothing)."""

    name: str
    help: str
    config_class: type[TunerConfig]
    get_model: object
    model_class: type[nn.Module]
    save: object
    mergeable: bool
    causal_lm: bool = True
    default_lr: float = 1e-3
    check_model_config: object = None


TUNERS: dict[str, Tuner] = {
    "snell": Tuner("snell", "SNELL: sparse tuning with kernelized LoRA", SnellConfig,
                   get_snell_model, SnellModel, save_snell, mergeable=True,
                   default_lr=SNELL_DEFAULT_LR),
    "sherl": Tuner("sherl", "SHERL: frozen early route fused by an MTSA, then the last "
                            "pretrained layers (memory-efficient)", SherlConfig,
                   get_sherl_model, SherlModel, SherlModel.save_pretrained, mergeable=False,
                   default_lr=SHERL_DEFAULT_LR, check_model_config=sherl_check_model_config),
}

__all__ = ["TUNERS", "SherlConfig", "SherlModel", "SnellConfig", "SnellModel", "Tuner",
           "get_sherl_model", "get_snell_model", "load"]


def load(adapter_dir: str | os.PathLike, base_model: str | os.PathLike | nn.Module | None = None,
         *, dtype: torch.dtype | None = None, is_trainable: bool = False) -> nn.Module:
    """Base model + adapter in one line: ``model = upcycle.tune.load("runs/snell/adapter")``.

    The base model is the one the adapter recorded (``base_model_name_or_path`` in
    ``adapter_config.json``, loaded with the recorded transformers class and label mapping),
    or ``base_model``: a HF model folder, or an already loaded model. Returns the SNELL or
    SHERL model in eval mode with nothing trainable (``is_trainable=True``: the adapter
    trains on)."""
    folder = Path(adapter_dir)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise UpcycleError(f"adapter folder {folder}: no {ADAPTER_CONFIG} (expected a folder "
                           f"written by upcycle tune or save_pretrained, e.g. runs/snell/adapter)")
    try:
        record = json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise UpcycleError(f"{folder / ADAPTER_CONFIG}: not valid JSON: {exc}") from exc
    method = record.get("method") if isinstance(record, dict) else None
    if isinstance(record, dict) and record.get("peft_type") == "SNELL":
        method = "snell"  # SNELL is a peft method: its folders are peft's
    if method not in TUNERS:
        raise UpcycleError(f"{folder / ADAPTER_CONFIG}: method {method!r} is not an upcycle "
                           f"tuner ({', '.join(TUNERS)}); a peft adapter loads with peft's "
                           f"AutoPeftModel.from_pretrained")
    if not isinstance(base_model, nn.Module):
        base_model = _load_base(folder, record, base_model, dtype)
    elif dtype is not None:
        base_model = base_model.to(dtype)
    model = TUNERS[method].model_class.from_pretrained(base_model, folder,
                                                       is_trainable=is_trainable)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def _load_base(folder: Path, record: dict, given, dtype) -> nn.Module:
    import transformers

    path = given if given is not None else record.get("base_model_name_or_path")
    hint = (f"pass the base model's HF folder: upcycle.tune.load({str(folder)!r}, "
            f"base_model='path/to/base-model')")
    if path is None:
        raise UpcycleError(f"{folder / ADAPTER_CONFIG} records no base model "
                           f"(base_model_name_or_path); {hint}")
    path = str(path)
    if not (Path(path) / "config.json").is_file():
        where = "given" if given is not None else f"recorded in {folder / ADAPTER_CONFIG}"
        raise UpcycleError(f"base model {path!r} ({where}) is not a HF model folder here (no "
                           f"config.json); {hint}")
    check_no_custom_code(path, f"base model {path!r}")
    name = record.get("base_model_class")
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        cls = transformers.AutoModel
    kwargs = {} if dtype is None else {"dtype": dtype}
    labels = record.get("base_model_labels")
    if labels:
        id2label = {int(i): v for i, v in labels.items()}
        kwargs.update(id2label=id2label, label2id={v: i for i, v in id2label.items()})
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a head the adapter holds is not "newly initialized"
    try:
        model = cls.from_pretrained(path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise UpcycleError(f"base model {path!r}: cannot load it as {cls.__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
                           f"; {hint}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()
