"""What out-of-core MEHL needs besides the round (:mod:`upcycle.soup.mehl_round`): the reader
that brings ingredient slices to the device one at a time, read ahead by one; the check that
the ingredients can be read that way; and a held state (keep-best's snapshot) kept in a file
instead of memory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import UpcycleError
from ..io.checkpoints import Ingredient
from ..io.shards import ShardWriter, TensorEntry

_Key = tuple[str, int]


class SliceReader:
    """Reads theta_i^l (tensor ``name`` of model-batch row ``row``) as a flat fp32 tensor on
    ``device``, fresh each time (the caller may change it in place). :meth:`plan` gives the
    order the reads will come in; each :meth:`take` then starts reading the next one in a
    background thread, so one slice is read while the previous one is used: at most two
    slices are in flight, whatever K."""

    def __init__(self, ingredients: Sequence[Ingredient], members: Sequence[int],
                 rows: Iterable[int], device: torch.device):
        self._ingredients, self._members = ingredients, list(members)
        self._rows, self._device = list(rows), device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upcycle-mehl-read")
        self._next: dict[_Key, _Key] = {}
        self._pending: tuple[_Key, Future] | None = None

    def plan(self, names: Sequence[str]) -> None:
        """The reads to come: every row of each of ``names``, in that order (a hint: a read
        outside the plan is simply not read ahead)."""
        keys = [(name, row) for name in names for row in self._rows]
        self._next = dict(zip(keys, keys[1:]))
        if keys:
            self._prefetch(keys[0])

    def _load(self, key: _Key) -> torch.Tensor:
        name, row = key
        t = self._ingredients[self._members[row]].get(name).reshape(-1)
        return t.to(device=self._device, dtype=torch.float32)

    def _prefetch(self, key: _Key) -> None:
        if self._pending is None or self._pending[0] != key:
            self._pending = (key, self._pool.submit(self._load, key))

    def take(self, name: str, row: int) -> torch.Tensor:
        key = (name, row)
        pending, self._pending = self._pending, None
        t = pending[1].result() if pending is not None and pending[0] == key else self._load(key)
        nxt = self._next.get(key)
        if nxt is not None:
            self._prefetch(nxt)
        return t

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True)


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


class SpilledState(Mapping):
    """A state (name -> tensor) written to a safetensors file in ``folder`` and read back one
    tensor at a time: keep-best's snapshot without a model copy in memory."""

    def __init__(self, folder: Path, tensors: Mapping[str, torch.Tensor]):
        folder.mkdir(parents=True, exist_ok=True)
        entries = [TensorEntry(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
        with ShardWriter(folder, entries, max_shard_bytes=1 << 62) as writer:
            for name, t in tensors.items():
                writer.write(name, t)
        self.folder = folder
        self._source = Ingredient(folder, role="MEHL's kept state")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._source.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.keys())

    def __len__(self) -> int:
        return len(self._source.keys())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Spill:
    """Keep-best's snapshots as files in a scratch folder (under ``parent``, or the system's
    temporary folder): :meth:`keep` writes the state and drops the previous one (a snapshot is
    taken only when it becomes the kept state); :meth:`close` removes them all."""

    def __init__(self, parent: str | Path | None = None):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="upcycle-mehl-kept-",
                                            dir=None if parent is None else str(parent)))
        self._count = 0
        self._last: SpilledState | None = None

    def keep(self, state: Mapping[str, torch.Tensor]) -> SpilledState:
        self._count += 1
        kept = SpilledState(self.folder / str(self._count), state)
        if self._last is not None:
            self._last.remove()
        self._last = kept
        return kept

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
