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
