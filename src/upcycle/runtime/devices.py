"""Where a job runs and in which precision: one place that turns ``--device``/``--dtype``/
``--bf16``/``--fp16`` into torch objects, with clear errors where the machine cannot do it.

- ``resolve_device("auto")``: under torchrun, ``cuda:LOCAL_RANK`` when CUDA is available
  (else the CPU); otherwise CUDA if available, then MPS, else the CPU.
- ``resolve_dtype("bfloat16")``: the torch dtype for the weights a job loads (None: as stored).
- ``autocast(device, "bf16")``: a ``torch.autocast`` context (a no-op for None).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from ..errors import UpcycleError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto", *, argument: str = "--device"
                   ) -> torch.device:
    """The torch device for ``spec`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a
    ``torch.device``). Raises :class:`UpcycleError` naming ``argument`` when this machine
    has no such device."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    local_rank = os.environ.get("LOCAL_RANK")
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif _mps_available() and local_rank is None:
            spec = "mps"
        else:
            spec = "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise UpcycleError(f"{argument} mps: this machine has no MPS device (Apple GPU); use "
                               f"{argument} cpu or auto")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise UpcycleError(f"{argument} {spec}: CUDA is not available on this machine ({why}, "
                               f"torch {torch.__version__}); use {argument} cpu or auto")
        if spec == "cuda":
            index = int(local_rank) if local_rank is not None else torch.cuda.current_device()
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise UpcycleError(f"{argument} {spec}: expected one of {DEVICE_CHOICES}") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise UpcycleError(f"{argument} {spec}: this machine has {count} CUDA device(s) "
                               f"(cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    raise UpcycleError(f"{argument} {spec!r}: expected one of {DEVICE_CHOICES}")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def resolve_dtype(spec: str | torch.dtype | None, *, argument: str = "--dtype"
                  ) -> torch.dtype | None:
    """The torch dtype named by ``spec`` (None: keep what is stored)."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    try:
        return DTYPES[spec.strip().lower()]
    except KeyError:
        raise UpcycleError(f"{argument} {spec!r}: expected one of "
                           f"{', '.join(DTYPE_CHOICES)}") from None


def check_precision(device: torch.device, *, bf16: bool = False, fp16: bool = False) -> str | None:
    """The autocast precision (``"bf16"``, ``"fp16"`` or None) after checking the device can
    do it; raises naming the flag otherwise."""
    if bf16 and fp16:
        raise UpcycleError("--bf16 and --fp16 exclude each other: choose one")
    if bf16:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UpcycleError(f"--bf16: {torch.cuda.get_device_name(device)} cannot compute in "
                               f"bfloat16 (needs compute capability 8.0+); use --fp16")
        return "bf16"
    if fp16:
        if device.type == "cpu":
            raise UpcycleError("--fp16: float16 mixed precision needs a GPU (CUDA or MPS); on the "
                               "CPU use --bf16")
        return "fp16"
    return None


def autocast(device: torch.device, precision: str | None):
    """``torch.autocast`` for ``precision`` ("bf16"/"fp16") on ``device``; a no-op for None."""
    if precision is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def add_device_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                         dtype: bool = True, mixed_precision: bool = True,
                         dist_timeout: bool = True) -> None:
    """``--device`` (and ``--dtype``, ``--bf16``/``--fp16``, ``--dist-timeout``) with the same
    names everywhere."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help=f"where to run: {DEVICE_CHOICES} (default: auto = CUDA if "
                             f"available, else the CPU; under torchrun cuda:LOCAL_RANK)")
    if dist_timeout:
        parser.add_argument("--dist-timeout", type=float, default=600, metavar="SECONDS",
                            help="under torchrun: how long a rank waits for the others before "
                                 "every rank stops with an error (a hung rank)")
    if dtype:
        parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                            help="dtype of the weights the job loads (default: as stored)")
    if mixed_precision:
        parser.add_argument("--bf16", action="store_true",
                            help="bfloat16 autocast for the forward/backward passes")
        parser.add_argument("--fp16", action="store_true",
                            help="float16 autocast with loss scaling (GPU only)")


def available_devices() -> list[str]:
    """The device types this machine has (CPU always): what tests parametrize over."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if _mps_available():
        out.append("mps")
    return out
