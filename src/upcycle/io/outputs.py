"""Guarding a run's output: it may not be (or hold, or lie inside) one of the run's inputs, and
only one run writes it at a time (a lock beside it, held for the whole run).

    with guard_output(out, inputs=[("--model", model), ("--data", data)]):
        ...  # the run; its atomic_dir(out) writes at the end

The lock is ``.OUT.lock`` beside ``out``, held with ``flock`` (released by the kernel when the
process dies, so a killed run never blocks the next one) and removed when the run ends.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import UpcycleError
from .writing import check_replaceable, sweep_stale, write_error

try:
    import fcntl
except ImportError:  # not on POSIX: no lock
    fcntl = None

Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def expand_globs(specs: Iterable[str | os.PathLike]) -> list[str]:
    """Each spec, and the paths a shell glob among them matches (ingredient arguments)."""
    found = []
    for spec in specs:
        spec = str(spec)
        found.append(spec)
        if any(ch in spec for ch in "*?[") and not Path(spec).exists():
            found.extend(sorted(glob.glob(spec)))
    return found


def check_not_input(out: str | os.PathLike, inputs: Inputs,
                    written: Iterable[tuple[str, str | os.PathLike]] = ()) -> None:
    """Refuse an ``out`` that is, holds or lies inside one of ``inputs`` (label, path): writing
    it, or replacing it with ``--overwrite``, would destroy the input. ``written``: other
    folders the run writes or removes (e.g. its checkpoints), which may not hold an input
    either."""
    targets = [("--out", Path(out)), *[(label, Path(p)) for label, p in written]]
    for label, path in inputs:
        if path is None:
            continue
        src = _real(path)
        for target_label, target in targets:
            real = _real(target)
            if real == src:
                relation = "is"
            elif src.is_relative_to(real):
                relation = "holds"
            elif real.is_relative_to(src) and target_label == "--out":
                relation = "lies inside"
            else:
                continue
            what = "--out" if target_label == "--out" else f"--out's {target_label}"
            raise UpcycleError(f"{what} {target} {relation} {label} {path}: writing it would "
                               f"destroy an input; choose an --out outside every input")


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def lock_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path | None]:
    """Hold ``.OUT.lock`` beside ``out`` (its folder must exist) for the block; another holder
    is an error at once naming it. Under torchrun only rank 0 (the writer) takes it."""
    out = Path(out)
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        yield None
        return
    lock = lock_path(out)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UpcycleError(f"--out {out}: cannot write in {out.parent}: "
                               f"{os.strerror(exc.errno).lower()}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UpcycleError(f"--out {out} is being written by another upcycle run"
                               f"{_holder(lock)}; wait for it to end or choose another "
                               f"--out") from None
        try:  # the run that held it may have removed the file meanwhile: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def guard_output(out: str | os.PathLike, *, inputs: Inputs = (),
                 written: Iterable[tuple[str, str | os.PathLike]] = ()) -> Iterator[None]:
    """Before a run's work: ``out`` can be replaced (not ``.``), is no input (see
    :func:`check_not_input`) and its folder is writable; then hold its lock for the block,
    after removing the temporaries that killed runs left beside it. On an error, the folders
    made for ``out`` are removed again when still empty."""
    out = Path(out)
    check_replaceable(out)
    check_not_input(out, list(inputs), list(written))
    created = _missing_folders(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (write_error(out, exc) or UpcycleError(
            f"--out {out}: cannot make its folder {out.parent}: "
            f"{os.strerror(exc.errno).lower()}")) from None
    try:
        with output_lock(out):
            sweep_stale(out)
            yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
