"""Peak-memory readings used by the CLI reports and the benchmarks."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` from /proc/self/status: the high-water mark of this process's
    own address space. ``ru_maxrss`` is not used there because Linux carries it across
    ``exec``, so a fresh subprocess started by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Linux: reset this process's peak RSS (VmHWM) to its current RSS, so that
    :func:`peak_rss_mb` measures only what follows (e.g. training, not model loading).
    Returns False where unsupported (then the peak keeps counting from the start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    """Current resident set size in MiB (from /proc on Linux; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / (1024 * 1024)
    except OSError:
        return peak_rss_mb()


def peak_cuda_mb() -> float | None:
    """Peak CUDA memory allocated by torch in MiB, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / (1024 * 1024)


class LiveTensorBytes:
    """Allocator-independent memory count: the bytes of the tensor storages created inside
    ``with LiveTensorBytes() as m:`` that are still alive (``m.live``) and at most at once
    (``m.peak``), on any device, whatever the allocator caches. Tensors that existed before
    (the model's weights) are not counted. Slows every op a little (a Python hook per op)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter._track(out, (args, kwargs))
                return out

        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._mode = _Mode()

    def _track(self, out, inputs) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        # A view or an in-place result shares an input's storage: nothing new (and the
        # storage of a tensor made before the count started must not be counted).
        shared = {t.untyped_storage().data_ptr() for t in tree_flatten(inputs)[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._sizes or key in shared:
                continue
            self._sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __enter__(self) -> LiveTensorBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
