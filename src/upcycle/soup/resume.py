"""MEHL-Soup checkpoints: one small file per finished round, so an interrupted soup resumes.

The file (``mehl-checkpoint.safetensors`` in the checkpoint folder) holds the current soup
(fp32, one tensor per parameter), the implied coefficients C, the state of the random
generator that orders ingredients and batches, and as metadata the round history, the
ingredient order of the current pass, where to continue, and a fingerprint of what the soup
depends on (the ingredients, the method, its settings, the held-out data). It is written to
a temporary file and renamed, so a Ctrl-C while saving keeps the previous round's file.
Model-sized states are written and read one tensor at a time: saving or resuming an
out-of-core soup never holds its anchor whole.

Resuming from it gives the same soup as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UpcycleError
from ..io.checkpoints import SAFETENSORS_SINGLE, Ingredient
from ..io.shards import ShardWriter, TensorEntry
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


class StoredState(Mapping):
    """The tensors ``PREFIX/NAME`` of a checkpoint file as a mapping NAME -> tensor, each
    read from the file when asked (a model-sized state is never read whole)."""

    def __init__(self, path: Path, prefix: str, names: Sequence[str]):
        self.path, self.prefix, self._names = path, prefix, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(self.prefix + name)
        except Exception as exc:
            raise UpcycleError(f"cannot resume: {self.path}: tensor {self.prefix + name!r} "
                               f"cannot be read ({exc})") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class Checkpoint:
    anchor: Mapping[str, torch.Tensor]
    """The soup after the last finished round: fp32, flat, per parameter (CPU; a
    :class:`StoredState`, read a tensor at a time)."""
    coefficients: torch.Tensor
    rng_state: torch.Tensor
    state: dict
    """fingerprint, next_pass, next_round, order, history, rounds_done."""
    extra: dict[str, torch.Tensor | Mapping[str, torch.Tensor]] = field(default_factory=dict)
    """Other tensors the method saved by name, and states (``name/KEY`` in the file) as
    :class:`StoredState` (MEHL: the best held-out state so far, ``best``)."""


def checkpoint_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / CHECKPOINT_FILE


def save_checkpoint(folder: str | os.PathLike, anchor: Mapping[str, torch.Tensor],
                    coefficients: torch.Tensor, rng_state: torch.Tensor, state: dict,
                    extra: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]] | None = None,
                    ) -> Path:
    """Write the checkpoint atomically (one file, renamed into place). ``anchor`` (fp32, as
    ``anchor/NAME``) and every state in ``extra`` (a mapping of tensors, saved as
    ``key/NAME`` in fp32) are read and written one tensor at a time, so a state kept in a
    file (out of core) is never held whole; ``extra``'s plain tensors are saved by name (not
    ``coefficients`` or ``rng_state``)."""
    path = checkpoint_path(folder)
    states: dict[str, Mapping[str, torch.Tensor]] = {"anchor": anchor}
    tensors = {"coefficients": coefficients.detach().cpu(), "rng_state": rng_state.cpu()}
    for key, value in (extra or {}).items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu()
        else:
            states[key] = value
    entries = [TensorEntry(f"{key}/{name}", _shape(mapping, name), torch.float32)
               for key, mapping in states.items() for name in mapping]
    entries += [TensorEntry(key, tuple(t.shape), t.dtype) for key, t in tensors.items()]
    meta = {"upcycle_mehl_checkpoint": json.dumps({"version": FORMAT, **state}, default=float)}
    with atomic_file(path) as tmp:
        scratch = Path(tempfile.mkdtemp(prefix=f"{tmp.name}-", dir=path.parent))
        try:
            with ShardWriter(scratch, entries, max_shard_bytes=1 << 62, metadata=meta) as writer:
                for key, mapping in states.items():
                    read = getattr(mapping, "read", mapping.__getitem__)  # a file's: one buffer
                    for name in mapping:
                        writer.write(f"{key}/{name}", read(name).reshape(_shape(mapping, name)))
                for key, t in tensors.items():
                    writer.write(key, t)
            os.replace(scratch / SAFETENSORS_SINGLE, tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return path


def _shape(mapping: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """Tensor ``name``'s shape, without reading it where ``mapping`` knows it (a file)."""
    shape = getattr(mapping, "shape", None)
    return tuple(shape(name) if shape is not None else mapping[name].shape)


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    path = checkpoint_path(folder)
    if not path.is_file():
        raise UpcycleError(f"cannot resume: no MEHL checkpoint at {path} (nothing was saved "
                           f"there yet; run without resume to start the soup)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = json.loads(meta["upcycle_mehl_checkpoint"])
            keys = list(f.keys())
            coefficients = f.get_tensor("coefficients")
            rng_state = f.get_tensor("rng_state")
            extra: dict = {k: f.get_tensor(k) for k in keys if "/" not in k
                           and k not in ("coefficients", "rng_state")}
    except Exception as exc:
        raise UpcycleError(f"cannot resume: {path} is not a readable MEHL checkpoint: "
                           f"{exc}") from exc
    groups: dict[str, list[str]] = {}
    for k in keys:
        if "/" in k:
            key, name = k.split("/", 1)
            groups.setdefault(key, []).append(name)
    extra.update({key: StoredState(path, f"{key}/", names) for key, names in groups.items()
                  if key != "anchor"})
    anchor = StoredState(path, "anchor/", groups.get("anchor", []))
    if state.get("version") != FORMAT:
        raise UpcycleError(f"cannot resume: {path} has checkpoint format "
                           f"{state.get('version')}, this upcycle reads {FORMAT}")
    return Checkpoint(anchor, coefficients, rng_state, state, extra)
