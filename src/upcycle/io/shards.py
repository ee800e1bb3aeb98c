"""Writing a model shard by shard when its tensors come one piece at a time.

:class:`ShardWriter` is told every tensor's name, shape and dtype first; it lays them out in
HuggingFace's sharded safetensors files (``model.safetensors``, or ``model-0000i-of-0000n``
shards with ``model.safetensors.index.json``, split at ``max_shard_bytes`` as
``save_pretrained`` does), so the planned size is known before anything is written. Each
tensor is then written at its place in its file as soon as it exists, in any order, and
dropped: the writer never holds more than the tensor it is given. The files are ordinary
safetensors (the header lists the tensors, the data follows contiguously), loadable by
``safetensors`` and ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UpcycleError
from .checkpoints import _ST_DTYPES, SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from .writing import DEFAULT_MAX_SHARD_BYTES

_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items() if dtype is not None}


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to be written: its name, shape and dtype."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def _split(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive entries into shards of at most ``max_shard_bytes`` (a larger tensor alone),
    as :func:`upcycle.io.writing.write_safetensors_shards` and HF split them."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _header(entries: Sequence[TensorEntry], metadata: dict[str, str]) -> tuple[bytes, dict]:
    """The safetensors header (8-byte length + JSON padded to 8 bytes) and each tensor's
    (start, end) in the data that follows."""
    offsets, start = {}, 0
    header: dict = {"__metadata__": metadata}
    for entry in entries:
        if entry.dtype not in _ST_NAMES:
            raise UpcycleError(f"tensor {entry.name!r}: dtype {entry.dtype} cannot be written "
                               f"to safetensors")
        offsets[entry.name] = (start, start + entry.nbytes)
        header[entry.name] = {"dtype": _ST_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [start, start + entry.nbytes]}
        start += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


class ShardWriter:
    """Write the tensors ``entries`` into ``folder`` as HF's (sharded) safetensors files.

        with ShardWriter(folder, entries, max_shard_bytes=2 * 1024**3) as writer:
            for name, tensor in pieces:
                writer.write(name, tensor)     # converted to its entry's dtype, then written

    ``planned_bytes`` (the files' total size) is known on construction; a file is created
    only when its first tensor is written. Leaving the ``with`` block normally checks that
    every tensor was written and writes the index (several shards)."""

    def __init__(self, folder: str | os.PathLike, entries: Sequence[TensorEntry], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise UpcycleError("writing safetensors shards needs a little-endian machine")
        self.folder = Path(folder)
        shards = _split(list(entries), max(1, int(max_shard_bytes)))
        meta = {"format": "pt", **(metadata or {})}
        self.files: list[str] = ([SAFETENSORS_SINGLE] if len(shards) == 1 else
                                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                  for i in range(len(shards))])
        self._headers: list[bytes] = []
        self._sizes: list[int] = []
        self._where: dict[str, tuple[int, int, TensorEntry]] = {}
        for index, shard in enumerate(shards):
            header, offsets = _header(shard, meta)
            self._headers.append(header)
            self._sizes.append(len(header) + sum(e.nbytes for e in shard))
            for entry in shard:
                self._where[entry.name] = (index, len(header) + offsets[entry.name][0], entry)
        self.planned_bytes = sum(self._sizes)
        self._fds: dict[int, int] = {}
        self._written: set[str] = set()
        self._filled: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def _fd(self, index: int) -> int:
        if index not in self._fds:
            path = self.folder / self.files[index]
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            self._fds[index] = fd
            self._pwrite(fd, self._headers[index], 0)
            os.ftruncate(fd, self._sizes[index])
        return self._fds[index]

    @staticmethod
    def _pwrite(fd: int, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` as ``name`` (converted to the planned dtype)."""
        if name not in self._where:
            raise UpcycleError(f"internal: tensor {name!r} was not planned for the output")
        index, offset, entry = self._where[name]
        if tuple(tensor.shape) != entry.shape:
            raise UpcycleError(f"internal: tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"planned {entry.shape}")
        data = tensor.detach().to("cpu", entry.dtype).contiguous().reshape(-1)
        if data.numel():
            self._pwrite(self._fd(index), data.view(torch.uint8).numpy(), offset)
        else:
            self._fd(index)
        self._written.add(name)

    def write_part(self, name: str, flat: torch.Tensor, start: int) -> None:
        """Write elements [start, start + flat.numel()) of tensor ``name`` (in its row-major
        order, converted to the planned dtype); it counts as written once every element
        has been (parts written once each)."""
        if name not in self._where:
            raise UpcycleError(f"internal: tensor {name!r} was not planned for the output")
        index, offset, entry = self._where[name]
        total = math.prod(entry.shape)
        if start < 0 or start + flat.numel() > total:
            raise UpcycleError(f"internal: part [{start}, {start + flat.numel()}) of tensor "
                               f"{name!r} is outside its {total} elements")
        data = flat.detach().to("cpu", entry.dtype).contiguous().reshape(-1)
        fd = self._fd(index)
        if data.numel():
            self._pwrite(fd, data.view(torch.uint8).numpy(), offset + start * data.element_size())
        self._filled[name] = self._filled.get(name, 0) + data.numel()
        if self._filled[name] >= total:
            self._written.add(name)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def finish(self) -> list[str]:
        """Check that every planned tensor was written, write the index; the file names."""
        missing = [n for n in self._where if n not in self._written]
        if missing:
            raise UpcycleError(f"internal: planned tensors were never written: {missing[:5]}")
        for index in range(len(self.files)):
            self._fd(index)  # a shard of empty tensors only
        self.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for _, _, e in
                                                    self._where.values())},
                     "weight_map": {n: self.files[i] for n, (i, _, _) in self._where.items()}}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        return list(self.files)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        self.close()
