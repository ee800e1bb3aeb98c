"""What out-of-core MEHL needs besides the round (:mod:`upcycle.soup.mehl_round`): the reader
that brings ingredient slices to the device one at a time, read ahead by one; the check that
the ingredients can be read that way; and a held state (keep-best's snapshot) kept in a file
instead of memory.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UpcycleError
from ..io.checkpoints import SAFETENSORS_SINGLE, Ingredient, checked
from ..io.shards import ShardWriter, TensorEntry

PIECE = 1 << 24
"""Out of core, a tensor of more elements is read, combined and written in pieces of this
many (64 MiB in fp32): a vocabulary-sized embedding (Llama-3's 128k x 4096) costs the
buffers of one piece, not four fp32 copies of the whole tensor."""

_Key = tuple[str, int, int]  # (tensor, model-batch row, piece)


def pieces(numel: int) -> list[tuple[int, int]]:
    """The element ranges [a, b) a flat tensor of ``numel`` elements is handled in."""
    return [(a, min(a + PIECE, numel)) for a in range(0, numel, PIECE)] or [(0, 0)]


class SliceReader:
    """Reads theta_i^l (tensor ``name`` of model-batch row ``row``; a tensor over
    :data:`PIECE` elements one piece at a time) as a flat fp32 tensor on ``device``. :meth:`plan` gives the order the reads will come in; each :meth:`take` then
    starts reading the next one in a background thread, so one slice is read while the
    previous one is used: two slices in flight, whatever K.

    A tensor stored contiguously (safetensors, zip ``.bin``) is read with ``os.preadv``
    straight into one of two reused buffers (no memory map, no page faults on fresh memory);
    anything else (a LoRA ingredient's merged tensor) through ``get``. A taken slice stays
    valid until the next :meth:`take` (the caller may change it in place)."""

    def __init__(self, ingredients: Sequence[Ingredient], members: Sequence[int],
                 rows: Iterable[int], device: torch.device, names: Sequence[str] = ()):
        self._ingredients, self._members = ingredients, list(members)
        self._rows, self._device = list(rows), device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upcycle-mehl-read")
        self._next: dict[_Key, _Key] = {}
        self._pending: tuple[_Key, Future] | None = None
        self._buffers: list[dict[str, torch.Tensor]] = [{}, {}]
        self._loads = 0
        self._fds: dict[Path, int] = {}
        # The buffers for the largest of ``names``, made here, in the calling thread: memory
        # the reader thread allocated would come from its own malloc arena, where freed
        # blocks of per-step transients fragment (measured: 2x the peak RSS above start).
        if names and self._rows:
            first = ingredients[self._members[self._rows[0]]]
            sizes = {name: min(PIECE, math.prod(first.shape(name))) for name in names}
            big = max(sizes, key=lambda n: sizes[n] * first.dtype(n).itemsize)
            cpu = device.type == "cpu"
            for slot in (0, 1):
                if not (cpu and all(first.dtype(n) == torch.float32 for n in names)):
                    self._buffer(slot, "raw", first.dtype(big), sizes[big])
                if cpu:
                    self._buffer(slot, "f32", torch.float32, max(sizes.values()))

    def plan(self, names: Sequence[str]) -> None:
        """The reads to come: for each of ``names`` in that order, each of its pieces
        (:func:`pieces`), every row (a hint: a read outside the plan is simply not read
        ahead)."""
        if not self._rows:
            self._next = {}
            return
        first = self._ingredients[self._members[self._rows[0]]]
        keys = [(name, row, p) for name in names
                for p in range(len(pieces(math.prod(first.shape(name))))) for row in self._rows]
        self._next = dict(zip(keys, keys[1:]))
        if keys:
            self._prefetch(keys[0])

    def _buffer(self, slot: int, kind: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self._buffers[slot].get(kind)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8,
                              pin_memory=self._device.type == "cuda")
            self._buffers[slot][kind] = buf
        return buf[:nbytes].view(dtype)

    def _load(self, key: _Key, slot: int) -> torch.Tensor:
        name, row, piece = key
        source = self._ingredients[self._members[row]]
        a, b = pieces(math.prod(source.shape(name)))[piece]
        where = source.locate(name) if hasattr(source, "locate") else None
        if where is None:  # (computed whole: a LoRA ingredient's tensor, once per piece)
            t = source.get(name).reshape(-1)[a:b]
            return t.to(device=self._device, dtype=torch.float32, copy=True)
        file, offset, nbytes = where
        dtype = source.dtype(name)
        offset, nbytes = offset + a * dtype.itemsize, (b - a) * dtype.itemsize
        numel = b - a
        kind = "f32" if dtype == torch.float32 and self._device.type == "cpu" else "raw"
        raw = self._buffer(slot, kind, dtype, numel)
        if nbytes:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            read_into(fd, raw.view(torch.uint8), offset, source.label, name)
        if getattr(source, "check_finite", False):
            whole = (a, b) == (0, math.prod(source.shape(name)))
            checked(source, name if whole else f"{name}[{a}:{b}]", raw)
        if kind == "f32":
            return raw
        if self._device.type != "cpu":
            return raw.to(self._device).to(torch.float32)  # synchronous: the buffer is reused
        return self._buffer(slot, "f32", torch.float32, numel).copy_(raw)

    def _submit(self, key: _Key) -> Future:
        slot, self._loads = self._loads % 2, self._loads + 1
        return self._pool.submit(self._load, key, slot)

    def _prefetch(self, key: _Key) -> None:
        if self._pending is not None:
            if self._pending[0] == key:
                return
            self._pending[1].result()  # its buffer is about to be reused
        self._pending = (key, self._submit(key))

    def take(self, name: str, row: int, piece: int = 0) -> torch.Tensor:
        """Piece ``piece`` of theta_row^name, flat fp32 on the device."""
        key = (name, row, piece)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] != key:
            pending[1].result()  # a read nobody wants: let it finish before reusing buffers
            pending = None
        t = (pending[1] if pending is not None else self._submit(key)).result()
        nxt = self._next.get(key)
        if nxt is not None:
            self._prefetch(nxt)
        return t

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].result()
        self._pending = None
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffers = [{}, {}]


def check_readable_per_tensor(ingredients: Sequence[Ingredient]) -> None:
    """Out-of-core MEHL reads every slice from the files again at each step: refuse an
    ingredient held whole in memory instead (a legacy pickle), saying how to convert it."""
    for ing in ingredients:
        held = getattr(ing, "whole_files", [])
        if held:
            raise UpcycleError(
                f"{ing.label}: {held[0].name} is a legacy (non-zip) PyTorch pickle, which cannot "
                f"be memory-mapped: out-of-core MEHL (--directions out-of-core) reads each "
                f"tensor from the files again at every step. Convert it once to safetensors "
                f"(upcycle has no convert command: python -c \"import torch, safetensors.torch "
                f"as st; st.save_file(torch.load('{held[0]}'), 'model.safetensors')\" in the "
                f"folder), or use --directions resident")


class FileState(Mapping):
    """A state (name -> tensor) in one safetensors file in ``folder``, read one tensor at a
    time: :meth:`read` into a buffer reused from call to call (valid until the next call),
    ``state[name]`` as a tensor of its own."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file = folder / SAFETENSORS_SINGLE
        self._source = Ingredient(folder, role="MEHL's scratch state")
        self._fd: int | None = None
        self._buffer: torch.Tensor | None = None

    @staticmethod
    @contextmanager
    def writing(folder: Path, entries: Sequence[TensorEntry]
                ) -> Iterator[Callable[[str, torch.Tensor], None]]:
        """A state file in ``folder``, written one tensor at a time by the function yielded
        (``put(name, tensor)``: every entry once, in any order, converted to the entry's dtype
        and shape; ``put(name, flat, start)``: a part of one); leaving the block checks that
        every entry was written."""
        folder.mkdir(parents=True, exist_ok=True)
        shapes = {e.name: e.shape for e in entries}
        with ShardWriter(folder, entries, max_shard_bytes=1 << 62) as writer:
            def put(name: str, t: torch.Tensor, start: int | None = None) -> None:
                if start is None:
                    writer.write(name, t.reshape(shapes[name]))
                else:  # elements [start, start + t.numel()) of the flat tensor
                    writer.write_part(name, t.reshape(-1), start)

            yield put

    @classmethod
    def write(cls, folder: Path, entries: Sequence[TensorEntry],
              tensors: Iterable[tuple[str, torch.Tensor]]) -> FileState:
        """Write ``tensors`` ((name, tensor) pairs, as :meth:`writing`) to ``folder``."""
        with cls.writing(folder, entries) as put:
            for name, t in tensors:
                put(name, t)
        return cls(folder)

    def _read(self, name: str, reuse: bool, part: tuple[int, int] | None = None
              ) -> torch.Tensor:
        """Tensor ``name`` (or elements [a, b) of it, flat: ``part``) read into the buffer
        reused from call to call (``reuse``) or into a new tensor."""
        file, offset, nbytes = self._source.locate(name)
        dtype = self._source.dtype(name)
        if part is not None:
            offset, nbytes = offset + part[0] * dtype.itemsize, (part[1] - part[0]) * dtype.itemsize
        if not reuse:
            out = torch.empty(nbytes, dtype=torch.uint8)
        else:
            if self._buffer is None or self._buffer.numel() < nbytes:
                self._buffer = torch.empty(nbytes, dtype=torch.uint8)
            out = self._buffer[:nbytes]
        if self._fd is None:
            self._fd = os.open(file, os.O_RDONLY)
        read_into(self._fd, out, offset, self._source.label, name)
        return out.view(dtype) if part is not None else out.view(dtype).view(self._source.shape(name))

    def read(self, name: str, part: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (elements [a, b) of it, flat: ``part``) in a buffer reused from
        call to call."""
        return self._read(name, True, part)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._read(name, False)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._source.shape(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.keys())

    def __len__(self) -> int:
        return len(self._source.keys())

    def remove(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        shutil.rmtree(self.folder, ignore_errors=True)


class FileAnchor(Mapping):
    """MEHL's anchor out of core: flat fp32 tensors in a file of the scratch folder, read one
    tensor at a time (:meth:`read`); :meth:`replace` writes the next anchor beside it (which
    may read the current one meanwhile) and then drops the current one."""

    def __init__(self, folder: Path, numels: Mapping[str, int]):
        self.folder = folder
        self._entries = [TensorEntry(name, (n,), torch.float32) for name, n in numels.items()]
        self._shapes = {e.name: e.shape for e in self._entries}
        self._count = 0
        self._state: FileState | None = None

    @contextmanager
    def replacing(self) -> Iterator[Callable[[str, torch.Tensor], None]]:
        """Write the next anchor with the function yielded (``put(name, tensor)``, every
        tensor once, in any order); on leaving the block it replaces the current one (which
        may be read meanwhile)."""
        self._count += 1
        folder = self.folder / f"anchor-{self._count}"
        with FileState.writing(folder, self._entries) as put:
            yield put
        if self._state is not None:
            self._state.remove()
        self._state = FileState(folder)

    def replace(self, tensors: Iterable[tuple]) -> None:
        """:meth:`replacing` with ``tensors``: (name, tensor) pairs, or (name, flat part,
        start) triples (start None: the whole tensor)."""
        with self.replacing() as put:
            for name, t, *start in tensors:
                put(name, t, *start)

    @property
    def file(self) -> Path:
        return self._state.file

    def read(self, name: str, part: tuple[int, int] | None = None) -> torch.Tensor:
        return self._state.read(name, part)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._state[name]

    def __iter__(self) -> Iterator[str]:
        return iter(e.name for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        if self._state is not None:
            self._state.remove()
            self._state = None


class Spill:
    """Out-of-core MEHL's scratch folder (under ``parent``, or the system's temporary
    folder) for states of flat fp32 tensors (``numels``: name -> size): the anchor
    (:meth:`anchor`) and keep-best's snapshots (:meth:`keep`: the state written, or the
    anchor's file linked, dropping the previous snapshot: one is taken only when it becomes
    the kept state); :meth:`close` removes it all."""

    def __init__(self, parent: str | Path | None, numels: Mapping[str, int]):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=".upcycle-mehl-scratch-",
                                            dir=None if parent is None else str(parent)))
        self.numels = dict(numels)
        self._count = 0
        self._last: FileState | None = None

    def anchor(self) -> FileAnchor:
        """An anchor in this folder, with no state until its first
        :meth:`FileAnchor.replace`."""
        return FileAnchor(self.folder, self.numels)

    def keep(self, state: Mapping[str, torch.Tensor]) -> FileState:
        self._count += 1
        folder = self.folder / f"kept-{self._count}"
        if isinstance(state, FileAnchor):  # the anchor's file as it is now: a hard link
            folder.mkdir()
            try:
                os.link(state.file, folder / SAFETENSORS_SINGLE)
            except OSError:
                shutil.copyfile(state.file, folder / SAFETENSORS_SINGLE)
            kept = FileState(folder)
        else:  # read and written one tensor at a time
            entries = [TensorEntry(n, (k,), torch.float32) for n, k in self.numels.items()]
            kept = FileState.write(folder, entries, ((n, state[n]) for n in self.numels))
        if self._last is not None:
            self._last.remove()
        self._last = kept
        return kept

    def close(self) -> None:
        if self._last is not None:
            self._last.remove()
        shutil.rmtree(self.folder, ignore_errors=True)


def read_into(fd: int, out: torch.Tensor, offset: int, label: str, name: str) -> None:
    """Fill the uint8 tensor ``out`` with the bytes of ``fd`` from ``offset`` (one error
    naming the source and tensor when the file ends first)."""
    view = memoryview(out.numpy())
    done, nbytes = 0, out.numel()
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise UpcycleError(f"{label}: its file is truncated (tensor {name!r})")
        done += n
