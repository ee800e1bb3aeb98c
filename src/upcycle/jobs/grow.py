"""The grow job: a HF model folder -> a wider/deeper model folder that computes the same
function (LEMON, or a baseline), checked, written atomically, and optionally trained.

    result = run_grow(GrowJob(model="small-model", out="grown", hidden_size=768, layers=12))
    result.report["max_rel_difference"]

The maximum output difference against the source (fp32, three seeded inputs) must be within
``tolerance`` (relative to max(1, max |output|)), or nothing is written. With ``train``, the
grown model trains on that classification file with LEMON's recipe (the large model's
from-scratch peak learning rate and warm-up, the decay ending at ``steps``) through
``transformers.Trainer``. Used by ``upcycle grow``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UpcycleError
from ..grow import (
    FolderGrowth,
    LemonRecipe,
    example_inputs,
    expand,
    expand_folder,
    max_output_difference,
    stream_blocker,
)
from ..io.checkpoints import load_pretrained, read_config_json
from ..io.model_files import check_no_custom_code
from ..io.outputs import guard_output
from ..io.writing import DEFAULT_MAX_SHARD_BYTES, atomic_dir, check_output, copy_model_files
from ..models.families import supported
from ..runtime import distributed
from ..runtime.devices import check_precision, resolve_device, resolve_dtype
from ..tasks import load_task
from ..training.config import TrainingConfig
from ..training.runs import check_resume, checkpoints_folder, run_fingerprint
from . import finetune
from .finetune import RunSettings

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
LOSSY_METHODS = ("aki", "stack")
"""Methods that are lossy by design: their output difference is reported, not enforced."""


@dataclass
class GrowJob(RunSettings):
    """One growth (the flags of ``upcycle grow``)."""

    model: str
    """The source HF model folder."""
    out: str
    """The output folder (a HF model folder)."""
    hidden_size: int | None = None
    layers: int | None = None
    heads: int | None = None
    intermediate_size: int | None = None
    method: str = "lemon"
    """lemon, or a baseline of :data:`upcycle.grow.METHODS`."""
    seed: int = 0
    """Seed of the symmetry-breaking noise (and of the training run)."""
    tolerance: float = 1e-5
    """Max relative output difference (fp32) allowed."""
    overwrite: bool = False
    train: str | None = None
    """Then train the grown model on this classification file."""
    steps: int | None = None
    scratch_lr: float | None = None
    scratch_warmup: int | None = None
    decay: str = "cosine"
    batch_size: int = 16
    grad_accum: int = 1
    save_steps: int | None = None
    resume: str | None = None
    in_memory: bool = False
    """Load the source and build the grown model whole (the only way for ``train``, a legacy
    pickle, or a family matched by its tensor layout); otherwise the growth is streamed."""
    max_shard_size: int | None = None
    """Bytes per safetensors shard of the output (default: HF's 5 GB)."""


@dataclass
class GrowResult:
    out: Path
    report: dict
    """What growth.json holds."""


def _check_training(job: GrowJob) -> None:
    """The ``train`` settings, checked before anything is loaded."""
    if job.steps is None or job.steps < 1:
        raise UpcycleError("--steps: expected a positive number of training steps with --train")
    for flag, value in (("--scratch-lr", job.scratch_lr),
                        ("--scratch-warmup", job.scratch_warmup)):
        if value is None:
            raise UpcycleError(f"{flag}: required with --train (LEMON keeps the large "
                               f"model's from-scratch peak learning rate and warm-up)")
    if not job.scratch_lr > 0 or job.scratch_warmup < 0:
        raise UpcycleError(f"--scratch-lr/--scratch-warmup: expected a positive learning "
                           f"rate and warm-up steps >= 0, got {job.scratch_lr}, "
                           f"{job.scratch_warmup}")
    if not Path(job.train).is_file():
        raise UpcycleError(f"--train {job.train}: no such file")
    if job.grad_accum < 1:
        raise UpcycleError(f"--grad-accum must be >= 1, got {job.grad_accum}")
    if job.save_steps is not None and job.save_steps < 1:
        raise UpcycleError(f"--save-steps must be >= 1, got {job.save_steps}")
    check_resume(job.resume, checkpoints_folder(Path(job.out)))
    check_precision(resolve_device(job.device), bf16=job.bf16, fp16=job.fp16)
    resolve_dtype(job.dtype)
    TrainingConfig(batch_size=job.batch_size, grad_accum=job.grad_accum).micro_batch(
        int(os.environ.get("WORLD_SIZE", "1")))


def source_config(model_dir: Path):
    """The config of the HF folder ``model_dir``, checked: a folder with weights, a readable
    config.json of a model_type transformers knows, no custom code."""
    # deferred: transformers (an optional dependency) loads only when a model is grown
    import transformers
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise UpcycleError(f"--model {model_dir}: not a HuggingFace model folder (no config.json)")
    read_config_json(model_dir, f"--model {model_dir}")  # not JSON: one line, not a traceback
    check_no_custom_code(model_dir, f"--model {model_dir}")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        model_type = None
        try:
            model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            pass
        raise UpcycleError(f"--model {model_dir}: config.json has model_type {model_type!r}, "
                           f"which transformers {transformers.__version__} does not know; "
                           f"upcycle grow supports {supported()}") from exc
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise UpcycleError(f"--model {model_dir}: no weights (expected one of "
                           f"{', '.join(WEIGHT_FILES)})")
    return config


def load_source(model_dir: Path) -> nn.Module:
    """The model of a HF folder, in its own class (from config.architectures), fp32, eval."""
    import transformers  # deferred: as above
    from transformers import AutoModel

    config = source_config(model_dir)
    cls = AutoModel
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None) or AutoModel
        break
    model = load_pretrained(cls, model_dir, role="--model", dtype=torch.float32)
    for name, tensor in model.state_dict().items():  # before expanding: name the tensor
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise UpcycleError(f"--model {model_dir}: tensor {name!r} contains {bad} values; "
                               f"a model with non-finite weights cannot be grown")
    return model.eval()


def run_grow(job: GrowJob, *, callbacks: Iterable = (),
             say: Callable[[str], None] = print) -> GrowResult:
    """Run ``job`` (see the module's docstring). ``say`` prints the progress lines (the plan,
    the parameter counts, the output difference); ``callbacks``: more ``Trainer`` callbacks
    for ``train``. ``out`` may not be, hold or lie inside ``model`` or ``train``, and is
    locked for the run (a second run on it is refused). Training runs in
    ``<out>.checkpoints`` (the grown model, then the checkpoints), removed once ``out`` is
    written."""
    out = Path(job.out)
    with guard_output(out, inputs=[("--model", job.model), ("--train", job.train)],
                      written=[("checkpoint folder", checkpoints_folder(out))]):
        return _run_grow(job, callbacks=callbacks, say=say)


def _run_grow(job: GrowJob, *, callbacks: Iterable, say: Callable[[str], None]) -> GrowResult:
    src = Path(job.model)
    out = Path(job.out)
    if job.train is not None:
        _check_training(job)
    check_output(out, job.overwrite)
    config = source_config(src)
    blocker = stream_blocker(config)
    if job.train is None and not job.in_memory and blocker is None:
        return _run_streamed(job, say)
    if job.train is None and not job.in_memory:
        say(f"(grown in memory: {blocker})")
    source = load_source(src)
    grown = expand(source, hidden_size=job.hidden_size, num_layers=job.layers,
                   num_heads=job.heads, intermediate_size=job.intermediate_size,
                   seed=job.seed, method=job.method)
    plan = grown.growth_plan
    say(f"grown {plan.describe()}")
    n_source, n_grown = (sum(p.numel() for p in m.parameters()) for m in (source, grown))
    say(f"parameters: {n_source:,} -> {n_grown:,}")
    diffs = [max_output_difference(source, grown, example_inputs(source, seed=s))
             for s in range(3)]
    report = _judge(job, plan, n_source, n_grown, diffs, say)
    if job.train is not None:
        grown, report["train"] = _train(src, grown, job, callbacks, say)
    with atomic_dir(out, overwrite=job.overwrite) as tmp:
        copy_model_files(src, tmp)
        grown.save_pretrained(tmp, safe_serialization=True)
        (tmp / "growth.json").write_text(json.dumps(report, indent=2))
    if job.train is not None and distributed.is_main():
        shutil.rmtree(checkpoints_folder(out), ignore_errors=True)  # the run is complete
    say(f"wrote {out}")
    return GrowResult(out=out, report=report)


def _judge(job: GrowJob, plan, n_source: int, n_grown: int, diffs: list[dict],
           say: Callable[[str], None]) -> dict:
    """Say the output difference against the source; refuse it above ``job.tolerance``
    (nothing is written); the report (growth.json)."""
    if n_grown == n_source:
        print("upcycle grow: warning: the target size equals --model's (pass --hidden-size, "
              "--layers, --heads or --intermediate-size larger than the source's): the output "
              "is a copy of it", file=sys.stderr)
    nan = [r for r in diffs if math.isnan(r["max_rel"]) or math.isnan(r["max_abs"])]
    worst = nan[0] if nan else max(diffs, key=lambda r: r["max_rel"])  # NaN is the worst
    argmax_ok = all(r["argmax_equal"] for r in diffs)
    say(f"max output difference vs source (fp32, 3 inputs): {worst['max_abs']:.3e} "
        f"(relative {worst['max_rel']:.3e}, tolerance {job.tolerance:g}); "
        f"argmax {'identical' if argmax_ok else 'DIFFERS'}")
    lossy = job.method in LOSSY_METHODS
    if not math.isfinite(worst["max_rel"]):  # even a lossy method: its output is broken
        raise UpcycleError(f"the grown model's output difference from --model is not finite "
                           f"({worst['max_rel']}): a NaN or Inf in an output; nothing written")
    if (not worst["max_rel"] <= job.tolerance or not argmax_ok) and not lossy:
        raise UpcycleError(f"the grown model differs from --model by {worst['max_rel']:.3e} "
                           f"(relative), above --tolerance {job.tolerance:g}; nothing written")
    if lossy:
        say(f"(method {job.method} is lossy by design: the tolerance is not enforced)")
    return {"plan": plan.describe(), "family": plan.family,
            "matched_by_structure": plan.by_structure, "method": job.method, "seed": job.seed,
            "max_abs_difference": worst["max_abs"], "max_rel_difference": worst["max_rel"],
            "source": str(job.model)}


def _run_streamed(job: GrowJob, say: Callable[[str], None]) -> GrowResult:
    """The growth streamed tensor by tensor (:func:`upcycle.grow.expand_folder`): the grown
    model is written in float32, as the in-memory path writes it, checked piecewise before
    it is moved into place."""
    reports: list[dict] = []

    def judge(growth: FolderGrowth) -> dict:
        report = _judge(job, growth.plan, *growth.parameters, [growth.difference], say)
        report["streamed"] = True
        reports.append(report)
        return report

    result = expand_folder(
        job.model, job.out, hidden_size=job.hidden_size, num_layers=job.layers,
        num_heads=job.heads, intermediate_size=job.intermediate_size, seed=job.seed,
        method=job.method, dtype=torch.float32, overwrite=job.overwrite,
        max_shard_bytes=job.max_shard_size or DEFAULT_MAX_SHARD_BYTES, judge=judge, say=say,
        progress=not job.quiet)
    say(f"wrote {result.out}")
    return GrowResult(out=result.out, report=reports[0])


def _train(src: Path, grown: nn.Module, job: GrowJob, callbacks: Iterable,
           say: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """Train ``grown`` on ``job.train`` with LEMON's recipe (the from-scratch peak lr and
    warm-up, the decay ending at ``job.steps``) in ``<out>.checkpoints``: the grown model is
    written to its ``grown/`` folder (never into the output's temporary folder, so that a
    killed run leaves nothing but that resumable folder). Returns the trained model."""
    folder = checkpoints_folder(Path(job.out))
    if job.overwrite and not job.resume and folder.exists() and distributed.is_main():
        shutil.rmtree(folder)  # start over, as the checkpoints' overwrite would
    model_dir = folder / "grown"
    if distributed.is_main():
        with atomic_dir(model_dir, overwrite=True) as tmp:
            copy_model_files(src, tmp)
            grown.save_pretrained(tmp, safe_serialization=True)
    device = resolve_device(job.device)
    task = load_task(model_dir, job.train, task="classification")  # --train: classifiers
    data = task.read(job.train, split="train", fix_num_labels=True)
    model = task.load_model(dtype=resolve_dtype(job.dtype))
    recipe = LemonRecipe(max_steps=job.steps, lr=job.scratch_lr,
                         warmup_steps=min(job.scratch_warmup, job.steps), decay=job.decay)
    config = TrainingConfig(max_steps=recipe.max_steps, lr=recipe.lr,
                            warmup_steps=recipe.warmup_steps, batch_size=job.batch_size,
                            grad_accum=job.grad_accum, save_steps=job.save_steps,
                            seed=job.seed, device=device, bf16=job.bf16, fp16=job.fp16,
                            progress=not job.quiet)
    torch.manual_seed(job.seed)
    schedule = lambda optimizer, total: recipe.scheduler(optimizer)  # noqa: E731
    settings = job.settings if job.settings is not None else {
        f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name != "settings"}
    fingerprint = run_fingerprint(argparse.Namespace(**settings),
                                  {"model": job.model, "train": job.train})
    result = finetune.train_task(model, task, data, config, schedule=schedule,
                                 output_dir=folder, resume=job.resume, fingerprint=fingerprint,
                                 overwrite=False, callbacks=list(callbacks))
    batches = task.batches(data, job.batch_size)
    metrics = task.evaluate(model, batches[: max(1, min(len(batches), 8))])
    say(f"trained {result.steps} steps on {device} (LEMON recipe: peak lr {recipe.lr:g}, "
        f"warm-up {recipe.warmup_steps}, {recipe.decay} decay to 0 at step {job.steps}): "
        f"last loss {result.last_loss:.4f}, train accuracy {metrics['accuracy']:.3f}")
    return model, {"steps": result.steps, "resumed_from": result.resumed_from,
                   "last_loss": result.last_loss, "device": str(device),
                   "log_history": result.log_history, **metrics}
