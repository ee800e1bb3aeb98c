"""Atomic outputs: folders and files appear whole or not at all; safetensors shards with an
index; the model files copied beside a written model."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
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


_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
"""This machine, in the names of temporary files (a pid means something only on its host)."""
_TEMP = r"\.(?:tmp|old)-([0-9a-f]{6})-(\d+)-"

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
"""What failing to write means for the user: the disk is full, or the target is read-only."""


def _temp_prefix(out: Path, kind: str = "tmp") -> str:
    """``.OUT.tmp-HOST-PID-``: a temporary beside ``out`` names the run that made it, so the
    next run can tell a stale one (its run is gone) and remove it."""
    return f".{out.name}.{kind}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def sweep_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders and files beside ``out`` (``.OUT.tmp-*``, ``.OUT.old-*``)
    that runs on this machine left when they were killed (their pid is gone); returns them."""
    out = Path(out)
    if not out.name or not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{out.name}") + _TEMP)
    removed = []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return []
    for path in entries:
        match = pattern.match(path.name)
        if match is None or match.group(1) != _HOST:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def check_replaceable(out: str | os.PathLike) -> None:
    """Refuse an output that cannot be replaced by a rename: the current folder or one holding
    it (``--out .``), the root, a mount point."""
    out = Path(out)
    real = Path(os.path.realpath(out))
    if out.name in ("", ".", "..") or real == Path(real.anchor) or \
            Path(os.path.realpath(Path.cwd())).is_relative_to(real):
        raise UpcycleError(f"output {out} is the current folder or holds it: an output is "
                           f"written whole and renamed into place, which cannot replace that "
                           f"folder; name a new folder (e.g. {out / 'out'})")
    if real.is_dir() and os.path.ismount(real):
        raise UpcycleError(f"output {out} is a mount point, which a rename cannot replace; "
                           f"name a new folder inside it")


def _error_number(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, SafetensorError):  # safetensors (Rust) reports io errors as text
        match = re.search(r"code: (\d+)", str(exc))
        return int(match.group(1)) if match else None
    return None


def write_error(out: Path, exc: BaseException) -> UpcycleError | None:
    """One line for a write that failed because the disk is full or the target read-only
    (None for other errors, and for an OSError about a file outside ``out``'s folder, e.g. an
    input that cannot be read)."""
    number = _error_number(exc)
    if number not in WRITE_ERRNOS:
        return None
    where = getattr(exc, "filename", None)
    if where is not None:
        parent = Path(os.path.realpath(out.parent))
        if not Path(os.path.realpath(where)).is_relative_to(parent):
            return None
    at = f" (writing {_short(Path(where))})" if where is not None else ""
    return UpcycleError(f"cannot write {_short(out)}: {os.strerror(number).lower()}{at}; "
                        f"nothing was written")


def _appeared(out: Path) -> UpcycleError:
    return UpcycleError(f"output {_short(out)} appeared while this run was writing it (another "
                        f"run?); it was left as it is and nothing was written; pass --overwrite "
                        f"(overwrite=True) to replace it")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite and (out.exists() or out.is_symlink()):
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
        try:
            os.replace(out, old / "previous")
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / "previous", out)  # put the previous output back
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)  # replaces at most an empty folder; never one with files
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(out) from None
        raise


@contextlib.contextmanager
def _converting_write_errors(out: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, SafetensorError) as exc:
        error = write_error(out, exc)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success, move it into place atomically.

    On an exception (SIGINT, and SIGTERM under the CLI, included) the temporary folder is
    removed and ``out`` is left as it was. With ``overwrite`` an existing ``out`` is replaced
    only after the new one is complete; without it, an ``out`` that appeared meanwhile is an
    error at the final rename. Stale temporary folders of killed runs beside ``out`` are
    removed first. A full disk or a read-only target is one :class:`UpcycleError` line.
    """
    out = Path(out)
    check_replaceable(out)
    check_output(out, overwrite)
    sweep_stale(out)
    with _converting_write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        with _converting_write_errors(out):
            yield tmp
            _user_permissions(tmp)
            _move_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; rename it to ``out`` on success (without
    ``overwrite``: only if ``out`` still does not exist then)."""
    out = Path(out)
    if not overwrite:
        check_output(out, overwrite)
    sweep_stale(out)
    with _converting_write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(out), dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _converting_write_errors(out):
            yield tmp
            _user_permissions(tmp)
            if overwrite:
                os.replace(tmp, out)
            else:
                _link_new(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _link_new(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out`` only if nothing is there (a hard link fails if it exists)."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise _appeared(out) from None
    except OSError:  # no hard links on this file system
        if out.exists():
            raise _appeared(out) from None
        os.replace(tmp, out)


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
        check_replaceable(out)
        check_output(out, overwrite)
        with atomic_file(out, overwrite=overwrite) as tmp:
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
