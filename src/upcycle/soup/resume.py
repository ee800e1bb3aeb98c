"""MEHL-Soup checkpoints: one small file per finished round, so an interrupted soup resumes.

The file (``mehl-checkpoint.safetensors`` in the checkpoint folder) holds the current soup
(fp32, one tensor per parameter), the implied coefficients C, the state of the random
generator that orders ingredients and batches, and as metadata the round history, the
ingredient order of the current pass, where to continue, and a fingerprint of what the soup
depends on (the ingredients, the method, its settings, the held-out data). It is written to
a temporary file and renamed, so a Ctrl-C while saving keeps the previous round's file.

Resuming from it gives the same soup as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UpcycleError
from ..io.checkpoints import Ingredient
from ..io.writing import atomic_file

CHECKPOINT_FILE = "mehl-checkpoint.safetensors"
FORMAT = 2


def _files_of(ingredient: Ingredient) -> list[Path]:
    p = ingredient.path
    if p.is_dir():
        return sorted(c for c in p.iterdir() if c.is_file() and
                      (c.suffix in (".safetensors", ".bin", ".pt", ".pth") or c.name.endswith(".json")))
    return [p]


def ingredients_fingerprint(ingredients: Sequence[Ingredient]) -> list[dict]:
    """Each ingredient's absolute path and its files' sizes and modification times."""
    out = []
    for ing in ingredients:
        files = []
        for f in _files_of(ing):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
        out.append({"path": os.path.abspath(ing.path), "files": files})
    return out


def data_fingerprint(batches: Sequence[dict]) -> str:
    """A hash of the held-out batches (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    h.update(str(len(batches)).encode())
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                h.update(f"{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def fingerprint(ingredients: Sequence[Ingredient], held_out: Sequence[dict], method: str,
                settings: dict) -> dict:
    return {"ingredients": ingredients_fingerprint(ingredients), "method": method,
            "settings": settings, "held_out": data_fingerprint(held_out)}


def check_fingerprint(saved: dict, current: dict, where: Path) -> None:
    """Raise, saying what differs, when a checkpoint was made for another soup."""
    head = f"cannot resume from {where}: it was made"
    a, b = saved["ingredients"], current["ingredients"]
    if [x["path"] for x in a] != [x["path"] for x in b]:
        old = [x["path"] for x in a]
        new = [x["path"] for x in b]
        diff = next((i for i in range(min(len(old), len(new))) if old[i] != new[i]), None)
        detail = (f"ingredient {diff + 1} was {old[diff]}, now {new[diff]}" if diff is not None
                  else f"{len(old)} ingredients then, {len(new)} now")
        raise UpcycleError(f"{head} from other ingredients ({detail})")
    for i, (x, y) in enumerate(zip(a, b)):
        if x["files"] != y["files"]:
            raise UpcycleError(f"{head} from other ingredient files: ingredient {i + 1} "
                               f"({y['path']}) changed since the checkpoint was written")
    if saved["method"] != current["method"]:
        raise UpcycleError(f"{head} by method {saved['method']}, not {current['method']}")
    for key in sorted(set(saved["settings"]) | set(current["settings"])):
        old, new = saved["settings"].get(key), current["settings"].get(key)
        if old != new:
            raise UpcycleError(f"{head} with other settings: {key} was {old}, now {new}")
    if saved["held_out"] != current["held_out"]:
        raise UpcycleError(f"{head} with other held-out data (the batches differ)")


@dataclass
class Checkpoint:
    anchor: dict[str, torch.Tensor]
    """The soup after the last finished round: fp32, flat, per parameter (CPU)."""
    coefficients: torch.Tensor
    rng_state: torch.Tensor
    state: dict
    """fingerprint, next_pass, next_round, order, history, rounds_done."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Other tensors the method saved (MEHL: the best held-out state so far, ``best/NAME``)."""


def checkpoint_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / CHECKPOINT_FILE


def save_checkpoint(folder: str | os.PathLike, anchor: dict[str, torch.Tensor],
                    coefficients: torch.Tensor, rng_state: torch.Tensor, state: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint atomically (one file, renamed into place); ``extra``: other
    tensors by name (not ``anchor/...``, ``coefficients`` or ``rng_state``)."""
    path = checkpoint_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"anchor/{k}": v.detach().to("cpu", torch.float32).contiguous()
               for k, v in anchor.items()}
    tensors["coefficients"] = coefficients.detach().cpu().contiguous()
    tensors["rng_state"] = rng_state.cpu().contiguous()
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    meta = {"format": "pt", "upcycle_mehl_checkpoint": json.dumps({"version": FORMAT, **state},
                                                                     default=float)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    path = checkpoint_path(folder)
    if not path.is_file():
        raise UpcycleError(f"cannot resume: no MEHL checkpoint at {path} (nothing was saved "
                           f"there yet; run without resume to start the soup)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = json.loads(meta["upcycle_mehl_checkpoint"])
            anchor = {k[len("anchor/"):]: f.get_tensor(k) for k in f.keys()
                      if k.startswith("anchor/")}
            coefficients = f.get_tensor("coefficients")
            rng_state = f.get_tensor("rng_state")
            extra = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("anchor/")
                     and k not in ("coefficients", "rng_state")}
    except Exception as exc:
        raise UpcycleError(f"cannot resume: {path} is not a readable MEHL checkpoint: "
                           f"{exc}") from exc
    if state.get("version") != FORMAT:
        raise UpcycleError(f"cannot resume: {path} has checkpoint format "
                           f"{state.get('version')}, this upcycle reads {FORMAT}")
    return Checkpoint(anchor, coefficients, rng_state, state, extra)
