"""The tune job: a pretrained HF model + data -> a tuned adapter (and merged model) + report.

    result = run_tune(TuneJob(method="snell", model="base-model", data="train.jsonl",
                              out="runs/snell", tuner_config=SnellConfig(r=4), max_steps=100))
    result.report["held_out_metrics"]

Loads the task (:func:`upcycle.tasks.load_task`), wraps the model with the tuner of
:data:`upcycle.tune.TUNERS`, trains it with ``transformers.Trainer``
(:func:`upcycle.jobs.finetune.train_task`), evaluates held-out (and test) data, checks the
merge, and writes into ``out`` atomically: ``adapter/`` (with its model card),
``merged/`` (``merge=True``), ``report.json`` and ``runs/`` (TensorBoard logs, when it is
installed). Checkpoints during the run go to ``<out>.checkpoints/``; under ``torchrun`` only
rank 0 writes. Used by ``upcycle tune`` and the benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UpcycleError
from ..io.outputs import guard_output
from ..io.writing import atomic_dir, check_output, copy_model_files, write_json
from ..runtime import distributed
from ..runtime.devices import check_precision, resolve_device, resolve_dtype
from ..runtime.memory import current_rss_mb, peak_rss_mb
from ..tasks import Task, load_task
from ..tasks.classification import logits_of
from ..training.config import TrainingConfig
from ..training.fit import FitResult
from ..training.runs import check_resume, checkpoint_step, checkpoints_folder, run_fingerprint
from ..tune import TUNERS
from ..tune.adapter import TunerConfig, count_parameters
from . import finetune
from .finetune import RunSettings


@dataclass
class TuneJob(RunSettings):
    """One tuning run (the flags of ``upcycle tune``). ``settings`` is also what report.json
    records under "method_config" (None: this job's fields and the tuner config's)."""

    method: str
    """A tuner of :data:`upcycle.tune.TUNERS` ("snell", "sherl")."""
    model: str
    """HF model folder (with or without a classification head)."""
    data: str
    """Training data (the task formats of :func:`upcycle.tasks.load_task`)."""
    out: str
    """Output folder: adapter/, merged/ (with ``merge``), report.json."""
    tuner_config: TunerConfig | None = None
    """The tuner's config (None: its defaults)."""
    held_out: str | None = None
    """Held-out data for the reported metric (None: ``held_out_fraction`` of ``data``)."""
    held_out_fraction: float = 0.1
    test: str | None = None
    """Test data, only reported (never used for any choice)."""
    seed: int = 0
    """Seed of the held-out split, the shuffling, a new head and the adapter init."""
    epochs: float = 1
    max_steps: int | None = None
    lr: float | None = None
    """Peak learning rate (None: the tuner's ``default_lr``)."""
    weight_decay: float = 0.01
    batch_size: int = 32
    grad_accum: int = 1
    eval_steps: int | None = None
    """Evaluate on the held-out data every N steps; the best checkpoint is the one written."""
    save_steps: int | None = None
    resume: str | None = None
    """"latest" or a checkpoint folder: continue an interrupted run."""
    logging_steps: int = 10
    task: str = "auto"
    max_length: int | None = None
    chunk: bool = False
    overwrite: bool = False
    merge: bool = False
    """Also write merged/: a plain HF model folder with the update folded in."""
    config: dict | None = None
    """The resolved ``--config`` of the run, recorded in report.json (the CLI's)."""
    command: str | None = None
    """The command line, recorded in report.json and the model cards."""


@dataclass
class TuneResult:
    out: Path
    report: dict
    """What report.json holds."""
    task: Task
    model: nn.Module
    """The tuned model, in eval mode."""
    fit: FitResult


def _settings(job: TuneJob, config: TunerConfig) -> dict:
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)
              if f.name not in ("tuner_config", "settings", "config", "command")}
    return {**fields, **dataclasses.asdict(config)}


def _check(job: TuneJob) -> None:
    if job.max_steps is not None and job.max_steps < 1:
        raise UpcycleError(f"--max-steps must be >= 1, got {job.max_steps}")
    if not job.epochs > 0:
        raise UpcycleError(f"--epochs must be > 0, got {job.epochs}")
    for flag in ("grad_accum", "eval_steps", "save_steps", "logging_steps", "batch_size"):
        value = getattr(job, flag)
        if value is not None and value < 1:
            raise UpcycleError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def run_tune(job: TuneJob, *, callbacks: Iterable = ()) -> TuneResult:
    """Run ``job`` (see the module's docstring); ``callbacks``: more ``Trainer`` callbacks.
    ``out`` may not be, hold or lie inside ``model`` or a data file, and is locked for the
    run (a second run on it is refused)."""
    out = Path(job.out)
    with guard_output(out, inputs=[("--model", job.model), ("--data", job.data),
                                   ("--held-out", job.held_out), ("--test", job.test)],
                      written=[("checkpoint folder", checkpoints_folder(out))]):
        return _run_tune(job, callbacks=callbacks)


def _run_tune(job: TuneJob, *, callbacks: Iterable = ()) -> TuneResult:
    tuner = TUNERS.get(job.method)
    if tuner is None:
        raise UpcycleError(f"method {job.method!r}: expected one of {', '.join(TUNERS)}")
    tuner_config = job.tuner_config if job.tuner_config is not None else tuner.config_class()
    if job.merge and not tuner.mergeable:  # refuse before anything loads
        raise UpcycleError(f"--merge: a {job.method} model cannot be merged into a plain model "
                           f"(it is not a weight update); drop --merge")
    settings = job.settings if job.settings is not None else _settings(job, tuner_config)
    out = Path(job.out)
    check_output(out, job.overwrite)
    _check(job)
    device = resolve_device(job.device)
    precision = check_precision(device, bf16=job.bf16, fp16=job.fp16)
    dtype = resolve_dtype(job.dtype)
    folder = checkpoints_folder(out)
    check_resume(job.resume, folder)
    distributed.init_from_env(device)
    world = distributed.world_size()
    main_rank = distributed.is_main()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main_rank and not job.quiet \
        else (lambda *a: None)

    task = load_task(job.model, job.data, max_length=job.max_length, head_seed=job.seed,
                     task=job.task, chunk=job.chunk)
    if task.name == "causal-lm" and not tuner.causal_lm:
        others = ", ".join(f"--method {t.name}" for t in TUNERS.values() if t.causal_lm)
        raise UpcycleError(f"--method {job.method} tunes classifiers; {job.model} is a causal "
                           f"LM (use {others}, or --task classification for a new head)")
    if tuner.check_model_config is not None:  # from config.json, before the weights load
        tuner.check_model_config(task.config, tuner_config)
    train_data = task.read_training(job.data)
    if job.held_out:
        held_out = task.read(job.held_out, split="held-out")
    else:
        train_data, held_out = task.split(train_data, job.held_out_fraction, seed=job.seed)
    test = task.read(job.test, split="test") if job.test else None

    torch.manual_seed(job.seed)
    model = task.load_model(dtype=dtype)
    rss_after_load = current_rss_mb()
    tuned = tuner.get_model(model, tuner_config)
    trainable, total = count_parameters(tuned)
    if main_rank and not job.quiet:
        tuned.print_trainable_parameters()

    config = TrainingConfig(
        epochs=job.epochs, max_steps=job.max_steps,
        lr=job.lr if job.lr is not None else tuner.default_lr,
        weight_decay=job.weight_decay, batch_size=job.batch_size, grad_accum=job.grad_accum,
        eval_steps=job.eval_steps, save_steps=job.save_steps,
        logging_steps=job.logging_steps, seed=job.seed, device=device, bf16=job.bf16,
        fp16=job.fp16, progress=not job.quiet)
    config.micro_batch(world)  # a batch size that does not split is an error before training
    say(f"training {job.method} on {len(train_data)} examples ({world} rank(s), {device}"
        + (f", {precision} autocast" if precision else "") + f"), held-out {len(held_out)}"
        + (f", test {len(test)}" if test else ""))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = finetune.train_task(
        tuned, task, train_data, config, eval_data=held_out if job.eval_steps else None,
        output_dir=folder, resume=job.resume,
        fingerprint=run_fingerprint(argparse.Namespace(**settings),
                                    {"model": job.model, "data": job.data,
                                     "held_out": job.held_out}),
        overwrite=job.overwrite, callbacks=list(callbacks))
    peak_train = peak_rss_mb()
    tuned.eval()
    held_batches = distributed.shard(task.batches(held_out, job.batch_size))
    test_batches = distributed.shard(task.batches(test, job.batch_size)) if test else None
    held_metrics = task.evaluate(tuned, held_batches)
    test_metrics = task.evaluate(tuned, test_batches) if test_batches is not None else None
    best_step = checkpoint_step(Path(result.best_checkpoint)) if result.best_checkpoint \
        else None

    report = {
        "method": job.method,
        "task": task.name,
        "model": str(job.model),
        "data": str(job.data),
        "held_out": held_out.source,
        "test": str(job.test) if job.test else None,
        "examples": {"train": len(train_data), "held_out": len(held_out),
                     "test": len(test) if test else None},
        "world_size": world,
        "device": str(device),
        "dtype": job.dtype,
        "precision": precision,
        "steps": result.steps,
        "steps_this_run": len(result.step_losses),
        "resumed_from": result.resumed_from,
        "best_step": best_step,
        "lr": config.lr,
        "batch_size": job.batch_size,
        "grad_accum": job.grad_accum,
        "train_seconds": result.seconds,
        "seconds_per_step": result.seconds / max(1, len(result.step_losses)),
        "final_train_loss": result.last_loss,
        "peak_rss_mb": peak_train,
        "peak_rss_above_model_mb": peak_train - rss_after_load,
        "peak_gpu_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                               if device.type == "cuda" else None),
        "trainable_params": trainable,
        "all_params": total,
        "held_out_metrics": held_metrics,
        "test_metrics": test_metrics,
        "log_history": result.log_history,
        "method_config": {k: v for k, v in settings.items() if k not in ("func", "command")},
        "config": job.config, "command": job.command,
    }
    if main_rank:
        with atomic_dir(out, overwrite=job.overwrite) as tmp:
            tuner.save(tuned, tmp / "adapter", overwrite=True)
            report["adapter"] = str(out / "adapter")
            if job.merge:
                probe = held_batches[0] if held_batches else task.batches(held_out, 4)[0]
                probe = {k: v.to(device) for k, v in probe.items()}
                with torch.no_grad():
                    before = logits_of(tuned, probe)
                    merged = tuned.merge_and_unload()
                    after = logits_of(merged, probe)
                report["merge_max_abs_logit_diff"] = float((after - before).abs().max())
                _save_merged(merged, task, tmp / "merged")
                report["merged"] = str(out / "merged")
            if (folder / "runs").is_dir():  # TensorBoard logs, when it is installed
                shutil.copytree(folder / "runs", tmp / "runs")
            write_json(tmp / "report.json", report)
            for folder_name in ("adapter", "merged"):
                if (tmp / folder_name).is_dir():
                    (tmp / folder_name / "README.md").write_text(
                        adapter_card(report, report["command"]))
        shutil.rmtree(folder, ignore_errors=True)  # the run is complete: its checkpoints go
    distributed.barrier()
    return TuneResult(out=out, report=report, task=task, model=tuned, fit=result)


def _save_merged(merged: nn.Module, task: Task, folder: Path) -> None:
    folder.mkdir(parents=True)
    copy_model_files(task.model_dir, folder)  # tokenizer / preprocessor files
    merged.save_pretrained(folder, safe_serialization=True)
    task.save_tokenizer(folder)  # a causal LM's with its pad token (EOS when it had none)


def adapter_card(report: Mapping, command: str | None = None) -> str:
    """The model card (``README.md``) of a tuning run's adapter/ and merged/ folders: the
    method, the base model, the held-out and test metrics and the command (``report``: the
    run's report.json)."""
    method = report.get("method", "?")
    base = report.get("model", "?")
    lines = ["---", "library_name: transformers", f"base_model: {base}", "tags:", "- upcycle",
             f"- {method}", "---", "", f"# {method.upper()} fine-tune of `{base}`", "",
             f"Made with `upcycle tune --method {method}` on `{report.get('data', '?')}` "
             f"({report.get('steps', '?')} steps, lr {report.get('lr', '?')}, batch "
             f"{report.get('batch_size', '?')}); {report.get('trainable_params', 0):,} of "
             f"{report.get('all_params', 0):,} parameters trained.", ""]
    if command:
        lines += ["Command:", "", "```bash", command, "```", "",
                  "`report.json` (one folder up) holds the full resolved configuration: "
                  "`upcycle tune --config report.json` repeats the run.", ""]
    rows = [("held-out", report.get("held_out_metrics")), ("test", report.get("test_metrics"))]
    rows = [(split, m) for split, m in rows if m]
    if rows:
        lines += ["## Metrics", "", "| split | examples | accuracy | loss |", "|---|---|---|---|"]
        for split, m in rows:
            acc = m.get("accuracy")
            lines.append(f"| {split} | {m.get('n', '-')} | "
                         f"{'-' if acc is None else f'{100 * acc:.2f}%'} | "
                         f"{m.get('loss', float('nan')):.4f} |")
        lines += ["", "The held-out split chose nothing but the best checkpoint (with "
                      "--eval-steps); the test split was used for these figures only.", ""]
    lines += ["## Use", "", "```python", "import upcycle.tune",
              'model = upcycle.tune.load("path/to/adapter")   # base model + adapter, eval mode',
              "```", "", "The `merged/` folder (with `--merge`) is a plain HF model folder: "
              "`from_pretrained` of the class its config.json names (`architectures`) loads "
              "it.", ""]
    return "\n".join(lines)
