"""torch.distributed glue: gloo on CPU, NCCL on GPU, launched with ``torchrun``.

Nothing here is a protocol of its own: it reads torchrun's environment, initialises the
default process group once, and offers the few collectives the methods use.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..errors import UpcycleError

if dist.is_available():
    # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when it
    # is first imported, and torch imports it lazily (through torch._dynamo, e.g. on a process's
    # first optimizer). Imported after the default group is up, it keeps that group alive for
    # good: destroy_process_group() cannot free it, gloo's worker threads outlive the
    # interpreter, and a rank can abort at exit ("terminate called without an active
    # exception"). Imported here, before any group exists, its defaults are None.
    import torch.distributed.nn  # noqa: F401


DEFAULT_TIMEOUT_S = 600
"""How long a collective waits for the other ranks (``--dist-timeout``): a hung rank ends
every rank in bounded time instead of torch's 30 minutes."""
_timeout_s: float = DEFAULT_TIMEOUT_S


def set_timeout(seconds: float) -> None:
    """The process-group timeout of the next :func:`init_from_env` (and of Trainer's
    ``ddp_timeout``), in seconds."""
    global _timeout_s
    if not seconds > 0:
        raise UpcycleError(f"--dist-timeout must be > 0 seconds, got {seconds}")
    _timeout_s = float(seconds)


def timeout_seconds() -> int:
    """The process-group timeout in whole seconds (at least 1)."""
    return max(1, int(round(_timeout_s)))


_PEER_FAILURES = ("Timed out waiting", "timed out", "Connection closed by peer",
                  "Connection reset by peer", "Watchdog caught collective operation timeout")


def collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank hung or died (torch's
    ``DistError``, or gloo's RuntimeError naming a timeout or a closed connection); None for
    any other exception."""
    dist_error = getattr(dist, "DistError", ())
    text = str(exc)
    if not (isinstance(exc, dist_error) if dist_error else False) and not (
            isinstance(exc, RuntimeError) and any(w in text for w in _PEER_FAILURES)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if first.startswith("[") and "] " in first:  # gloo's "[source.cc:78] ..." prefix
        first = first.split("] ", 1)[1]
    return (f"torchrun: rank {os.environ.get('RANK', '?')}: a collective failed, another rank "
            f"hung or stopped (--dist-timeout {timeout_seconds()} s): {first}")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device | str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1.

    Returns True when running distributed. Backend: NCCL when the job's ``device`` is CUDA
    (default: when CUDA is available), else gloo; a CUDA rank uses ``cuda:LOCAL_RANK``.
    Collectives time out after :func:`timeout_seconds` (``--dist-timeout``).
    """
    if dist.is_available() and dist.is_initialized():
        _destroy_at_exit()  # also a group that accelerate or the caller opened
        return True
    if not launched_by_torchrun():
        return False
    if device is None:
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = torch.device(device).type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UpcycleError(
                f"torchrun: local rank {local} needs CUDA device {local}, but this machine has "
                f"{torch.cuda.device_count()} (NCCL needs one GPU per process): start at most "
                f"{torch.cuda.device_count()} processes per node (--nproc-per-node), or run on "
                f"the CPU with --device cpu (gloo)")
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend,
                            timeout=datetime.timedelta(seconds=timeout_seconds()))
    _destroy_at_exit()
    return True


_AT_EXIT = False


def _destroy_at_exit() -> None:
    global _AT_EXIT
    if not _AT_EXIT:
        atexit.register(shutdown)
        _AT_EXIT = True


def shutdown() -> None:
    """Destroy the default process group if one is up (registered at exit by ``init_from_env``).

    A process that exits with its gloo group alive can abort during interpreter teardown, when
    a gloo worker thread still releasing a tensor needs the GIL ("terminate called without an
    active exception"), and NCCL warns; torch asks for an explicit ``destroy_process_group``
    before exit, which joins gloo's threads once nothing else holds the group (see the import
    of ``torch.distributed.nn`` above, and the collection of reference cycles below).
    """
    if dist.is_available() and dist.is_initialized():
        # torch 2.13 stashes a Python object in the thread-local state of every backward, so a
        # gloo work launched during a backward (DDP's all-reduce, MEHL's gradient hooks) needs
        # the GIL when gloo's worker thread releases it. Joining that worker while holding the
        # GIL (the group's destructor) would deadlock; a short sleep releases the GIL first.
        time.sleep(0.05)
        dist.destroy_process_group()
        # What still holds the group from a reference cycle (a DDP wrapper inside a finished
        # Trainer, its callbacks...) lets go of it now rather than during teardown.
        gc.collect()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op when not distributed) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(items: Sequence, *, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous share of ``items`` (every rank gets a nearly equal slice)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n = len(items)
    start = (n * r) // w
    end = (n * (r + 1)) // w
    return list(items[start:end])


def barrier() -> None:
    if is_distributed():
        dist.barrier()
