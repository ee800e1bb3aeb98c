"""The run folder of a training job: its checkpoints, the fingerprint that says which run they
belong to, and the checks before a resume."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import UpcycleError
from ..io.writing import write_json
from ..runtime import distributed

RUN_FILE = "run.json"
"""Beside the checkpoints: the fingerprint of the run they belong to."""


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``model`` must hold: its trainable parameters and its persistent
    buffers (a frozen base model is left out), each tensor once."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name in frozen:
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.contiguous()
    return out


def checkpoint_step(path: Path | None) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return -1


def last_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and (p / "trainer_state.json").is_file()]
    return max(found, key=checkpoint_step) if found else None


def _describe(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def prepare_checkpoints(folder: str | os.PathLike, fingerprint: Mapping | None, *,
                        resume: bool | str | os.PathLike | None = None,
                        overwrite: bool = False, argument: str = "--resume") -> Path | None:
    """Get ``folder`` ready for a run's checkpoints and say where to resume from.

    Fresh start (``resume`` falsy): ``folder`` must hold no checkpoint of another run (unless
    ``overwrite``, which removes it); the ``fingerprint`` is written there. ``resume=True``:
    the latest checkpoint in ``folder``; a path: that checkpoint. Either must exist and come
    from a run with the same ``fingerprint``; otherwise an error names what differs.
    """
    folder = Path(folder)
    if not resume:
        if last_checkpoint(folder) is not None:
            if not overwrite:
                raise UpcycleError(
                    f"{folder} holds checkpoints of an earlier run (interrupted?); pass "
                    f"{argument} to continue it, or overwrite to start over")
        if folder.exists() and overwrite and distributed.is_main():
            shutil.rmtree(folder)
        distributed.barrier()
        if distributed.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            if fingerprint is not None:
                write_json(folder / RUN_FILE, dict(fingerprint))
        distributed.barrier()
        return None
    if resume is True or str(resume) == "latest":
        checkpoint = last_checkpoint(folder)
        if checkpoint is None:
            raise UpcycleError(f"{argument}: no checkpoint to resume from in {folder} (a run "
                               f"saves one every save-steps steps)")
    else:
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise UpcycleError(f"{argument} {checkpoint}: not a checkpoint folder (no "
                               f"trainer_state.json)")
    if fingerprint is not None:
        run_file = checkpoint.parent / RUN_FILE
        if not run_file.is_file():
            raise UpcycleError(f"{argument}: {run_file} is missing, so the checkpoint cannot be "
                               f"matched to this run")
        saved = json.loads(run_file.read_text())
        now = json.loads(json.dumps(dict(fingerprint), default=str))
        differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if differ:
            what = "; ".join(f"{k}: {_describe(saved.get(k))} in the checkpoint, "
                             f"{_describe(now.get(k))} now" for k in differ[:4])
            raise UpcycleError(f"{argument}: {checkpoint} was made by another run ({what}); "
                               f"use the same settings, or start over without {argument}")
    return checkpoint


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


DIGEST_SAMPLES = 256
DIGEST_BLOCK = 4096


def weights_digest(path: Path) -> str:
    """A cheap content hash of a weight file: its size, its first MiB (a safetensors header
    with every tensor's name, dtype, shape and offsets, or a pickle's index) and
    ``DIGEST_SAMPLES`` blocks of ``DIGEST_BLOCK`` bytes spread evenly over the rest. About
    2 MiB is read whatever the size: a file with other weights (retrained, another seed,
    edited) differs in nearly every block, so it is told apart from the original, while a
    multi-GB base model is not read whole at every start."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        rest = size - (1 << 20)
        if rest > 0:
            step = max(DIGEST_BLOCK, rest // DIGEST_SAMPLES)
            for offset in range(1 << 20, size, step):
                f.seek(offset)
                digest.update(f.read(DIGEST_BLOCK))
            f.seek(max(1 << 20, size - DIGEST_BLOCK))  # and the very end
            digest.update(f.read(DIGEST_BLOCK))
    return digest.hexdigest()


# Arguments that do not change what is trained: they may differ between a run and its --resume.
_NOT_IN_FINGERPRINT = {"func", "command", "config", "out", "overwrite", "resume", "quiet", "merge", "test",
                       "device", "save_steps", "logging_steps", "dist_timeout"}


def run_fingerprint(args: argparse.Namespace, files: dict[str, str | None]) -> dict:
    """What a run is (model, data, method and settings): its checkpoints resume only a run
    with the same fingerprint. ``files``: argument name -> the model folder or data file it
    names (hashed, so that a changed file is noticed)."""
    fingerprint = {}
    for name, value in files.items():
        if value is None:
            fingerprint[name] = None
            continue
        path = Path(value)
        fingerprint[name] = str(path.resolve())
        if path.is_dir():
            config = path / "config.json"
            fingerprint[f"{name} config.json sha256"] = (_sha256(config) if config.is_file()
                                                         else None)
            weights = sorted(p for p in path.iterdir()
                             if p.suffix in (".safetensors", ".bin", ".pt"))
            fingerprint[f"{name} weight files"] = [[p.name, p.stat().st_size] for p in weights]
            for p in weights:  # a same-size file with other weights is another run
                fingerprint[f"{name} {p.name} digest"] = weights_digest(p)
        elif path.is_file():
            fingerprint[f"{name} sha256"] = _sha256(path)
    fingerprint.update({k: v for k, v in sorted(vars(args).items())
                        if k not in _NOT_IN_FINGERPRINT and k not in files})
    return fingerprint


def checkpoints_folder(out: Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoints: ``<out>.checkpoints`` beside it."""
    return out.parent / f"{out.name}.checkpoints"


def check_resume(resume: str | None, folder: Path) -> None:
    """``--resume`` without a checkpoint to resume: an error before anything is loaded."""
    if resume == "latest" and last_checkpoint(folder) is None:
        raise UpcycleError(f"--resume: no checkpoint to resume from in {folder} (a run saves "
                           f"one every --save-steps steps)")
