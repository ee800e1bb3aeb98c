"""Atomic outputs: folders and files appear whole or not at all; safetensors shards with an
index; the model files copied beside a written model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UpcycleError
from .checkpoints import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, WEIGHT_FILE_SUFFIXES, _short
from .model_files import model_files

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # HuggingFace's default max_shard_size ("5GB")


def holds_model(path: Path) -> bool:
    """True when ``path`` already holds a model (a weight file, or a folder with weights)."""
    if path.is_file():
        return True
    if path.is_dir():
        return any(c.suffix in WEIGHT_FILE_SUFFIXES or c.name == SAFETENSORS_INDEX
                   for c in path.iterdir())
    return False


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        if holds_model(out):
            raise UpcycleError(
                f"output {_short(out)} already holds a model; pass --overwrite (overwrite=True) "
                f"to replace it"
            )
        if out.is_dir() and any(out.iterdir()):
            raise UpcycleError(
                f"output folder {_short(out)} already exists and is not empty; pass "
                f"--overwrite (overwrite=True) to replace it"
            )


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _user_permissions(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions a plain
    ``mkdir``/``open`` would under the user's umask: ``tempfile`` and safetensors make
    owner-only (0700/0600) files, which would otherwise end up as the output. Executable
    files stay executable."""
    mask = _umask()
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        executable = p.is_dir() or os.stat(p).st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success, move it into place atomically.

    On an exception the temporary folder is removed and ``out`` is left as it was. With
    ``overwrite`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _user_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; rename it to ``out`` on success."""
    out = Path(out)
    if not overwrite:
        check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _user_permissions(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_safetensors_shards(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``state`` into ``folder`` as HF does: one ``model.safetensors`` or shards + index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(_contiguous(shards[0]), str(folder / SAFETENSORS_SINGLE), metadata=meta)
        return [SAFETENSORS_SINGLE]
    names = []
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(_contiguous(shard), str(folder / fname), metadata=meta)
        names.append(fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    (folder / SAFETENSORS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return names


def copy_model_files(source_dir: Path, dest: Path) -> None:
    """Copy a HF folder's config, tokenizer, processor and generation files (not its weights,
    nothing else: see :func:`~upcycle.io.model_files.model_files`) as regular files."""
    for name, source in model_files(source_dir).items():
        shutil.copyfile(source, dest / name)


def save_model(
    out: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    *,
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, bytes | str] | None = None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a model atomically.

    ``out`` ending in ``.safetensors`` gets one file. Otherwise ``out`` is a folder: the
    weights (sharded when larger than ``max_shard_bytes``), the non-weight files of
    ``source_dir`` (config, tokenizer) when given, so ``from_pretrained(out)`` works, and any
    ``extra_files`` / ``extra_tensors`` (name -> safetensors dict) written beside them.
    """
    out = Path(out)
    if out.suffix == ".safetensors":
        check_output(out, overwrite)
        with atomic_file(out) as tmp:
            save_file(_contiguous(state), str(tmp), metadata={"format": "pt"})
        return out
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if source_dir is not None:
            copy_model_files(Path(source_dir), tmp)
        write_safetensors_shards(tmp, state, max_shard_bytes=max_shard_bytes)
        for name, content in (extra_files or {}).items():
            data = content.encode() if isinstance(content, str) else content
            (tmp / name).write_bytes(data)
        for name, tensors in (extra_tensors or {}).items():
            save_file(_contiguous(tensors), str(tmp / name))
    return out
