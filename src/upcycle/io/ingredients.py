"""Opening and checking soup ingredients: paths, globs and folders expanded to checkpoints or
LoRA adapters, then validated against each other."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UpcycleError
from .checkpoints import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TORCH_INDEX,
    WEIGHT_FILE_SUFFIXES,
    Ingredient,
    checked,
    config_differences,
    read_config_json,
)
from .lora import is_adapter, open_adapter


def _looks_like_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return any((path / f).is_file() for f in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX,
                                                   "pytorch_model.bin", TORCH_INDEX,
                                                   "adapter_config.json"))
    return path.is_file() and path.suffix in WEIGHT_FILE_SUFFIXES


def expand_ingredient_paths(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Turn CLI/API arguments into checkpoint paths.

    Each spec is a checkpoint file, a HF model folder, a peft adapter folder, a folder of
    checkpoints (files, HF or adapter folders, taken in sorted order) or a shell glob.
    """
    paths: list[Path] = []
    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if any(ch in spec for ch in "*?[") and not p.exists():
            matches = sorted(glob.glob(spec))
            if not matches:
                raise UpcycleError(f"ingredient pattern {spec!r} matches no files")
            paths.extend(Path(m) for m in matches)
        elif p.is_dir() and not _looks_like_checkpoint(p):
            inner = sorted(c for c in p.iterdir() if _looks_like_checkpoint(c))
            if not inner:
                raise UpcycleError(
                    f"ingredient folder {spec!r} holds no checkpoints (expected .safetensors/.bin/"
                    f".pt files or HuggingFace model folders)"
                )
            paths.extend(inner)
        else:
            paths.append(p)
    return paths


def open_ingredients(specs: Sequence[str | os.PathLike], *,
                     base: str | os.PathLike | Ingredient | None = None) -> list[Ingredient]:
    """Open the ingredients ``specs`` name. peft LoRA adapter folders among them become
    :class:`upcycle.io.lora.LoraIngredient` on ``base`` (required for them), merged one
    tensor at a time; full checkpoints and adapters may be mixed."""
    paths = expand_ingredient_paths(specs)
    if not paths:
        raise UpcycleError("no ingredients given")
    if base is not None and not isinstance(base, Ingredient) and any(map(is_adapter, paths)):
        base = Ingredient(base, index=0)
    return [open_adapter(p, base, index=i + 1) if is_adapter(p) else Ingredient(p, index=i + 1)
            for i, p in enumerate(paths)]


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def validate_ingredients(ingredients: Sequence[Ingredient], *, check_finite: bool = True,
                         dtype: torch.dtype | None = None, progress: bool = False,
                         defer_finite: bool = False) -> None:
    """Check that all ingredients are checkpoints of one model, before any work is done.

    Same tensor names, shapes and dtypes as the first ingredient (floating tensors may differ
    in dtype when the soup converts them all to ``dtype``, e.g. fp32 and bf16 ingredients with
    ``--dtype float32``), from the headers, and (by default) only finite floating values.
    ``check_finite``: reads every tensor once now (``progress``: a progress bar over the
    ingredients), or with ``defer_finite`` marks each ingredient to check every tensor as
    the soup reads it (``check_finite`` on the source): one read instead of two, and an
    ingredient with NaN/Inf still stops the soup before anything is written (a soup is
    written only once made).
    """
    if not ingredients:
        raise UpcycleError("no ingredients given")
    ref = ingredients[0]
    ref_keys = set(ref.keys())
    for ing in ingredients[1:]:
        keys = set(ing.keys())
        if keys != ref_keys:
            missing = sorted(ref_keys - keys)
            extra = sorted(keys - ref_keys)
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) of {ref.label}, e.g. {missing[0]!r}")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) {ref.label} lacks, e.g. {extra[0]!r}")
            raise UpcycleError(
                f"{ing.label}: not the same architecture: " + "; ".join(parts)
            )
        for name in ref.keys():
            if ing.shape(name) != ref.shape(name):
                raise UpcycleError(
                    f"{ing.label}: {name!r} has shape {_shape_str(ing.shape(name))}, "
                    f"{ref.label.split(' (')[0]} has {_shape_str(ref.shape(name))}"
                )
            if ing.dtype(name) != ref.dtype(name) and not (
                    dtype is not None and ing.dtype(name).is_floating_point
                    and ref.dtype(name).is_floating_point):
                hint = (" (pass --dtype to convert every ingredient to one dtype)"
                        if ing.dtype(name).is_floating_point and ref.dtype(name).is_floating_point
                        else "")
                raise UpcycleError(
                    f"{ing.label}: {name!r} has dtype {ing.dtype(name)}, "
                    f"{ref.label.split(' (')[0]} has {ref.dtype(name)}{hint}"
                )
    if check_finite and defer_finite:
        for ing in ingredients:
            ing.check_finite = True
    elif check_finite:
        for ing in tqdm(ingredients, desc="checking ingredients", disable=not progress,
                        leave=False):
            for name in ing.keys():
                checked(ing, name, ing.get(name))


def check_configs(ingredients: Sequence[Ingredient], *,
                  config_from: int | None = None) -> Path | None:
    """The ingredients' ``config.json`` agree on every field but bookkeeping (``rope_theta``
    1e4 vs 5e5 is two different models, not a choice for the first to win), else one error
    naming the field. ``config_from`` (1-based, ``--config-from N``): the ingredient whose
    config the soup takes instead; its folder is returned (None when not given)."""
    if config_from is not None:
        if not 1 <= config_from <= len(ingredients):
            raise UpcycleError(f"--config-from {config_from}: expected an ingredient number "
                               f"from 1 to {len(ingredients)}")
        chosen = ingredients[config_from - 1]
        if chosen.hf_dir is None or not (chosen.hf_dir / "config.json").is_file():
            raise UpcycleError(f"--config-from {config_from}: {chosen.label} has no "
                               f"config.json")
        return chosen.hf_dir
    with_config = [ing for ing in ingredients
                   if ing.hf_dir is not None and (ing.hf_dir / "config.json").is_file()]
    if len(with_config) < 2:
        return None
    ref = with_config[0]
    ref_config = read_config_json(ref.hf_dir, ref.label)
    for ing in with_config[1:]:
        if ing.hf_dir == ref.hf_dir:
            continue
        diff = config_differences(ref_config, read_config_json(ing.hf_dir, ing.label))
        if diff:
            field = diff[0]
            other = read_config_json(ing.hf_dir, ing.label)
            raise UpcycleError(
                f"{ing.label}: its config.json differs from {ref.label.split(' (')[0]}'s in "
                f"{field!r} ({other.get(field)!r} vs {ref_config.get(field)!r}"
                f"{f', and {len(diff) - 1} more field(s)' if len(diff) > 1 else ''}): pass "
                f"--config-from N to choose the ingredient whose config the soup takes")
    return None
