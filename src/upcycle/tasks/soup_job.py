"""A soup job end to end: ingredients on disk + a classification task -> soup + report.

Used by ``upcycle soup`` (one method), ``upcycle demo`` and the soup benchmarks (every
method): the orchestration lives here once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed
from ..checkpoints import Ingredient, open_ingredients, validate_ingredients
from ..devices import check_precision, resolve_device, resolve_dtype
from ..errors import UpcycleError
from ..memory import peak_rss_mb
from ..soup import (
    METHODS,
    LearnedConfig,
    MehlConfig,
    SoupResult,
    greedy_soup,
    learned_soup,
    mehl_soup,
    uniform_soup,
)
from ..soup import resume as soup_resume
from ..soup.common import load_state
from . import ClassificationTask, LabeledData, classification_loss, evaluate, load_task

DATA_METHODS = ("greedy", "learned", "learned+", "mehl", "mehl+")


@dataclass
class SoupJob:
    ingredients: list[Ingredient]
    task: ClassificationTask | None = None
    held_out: LabeledData | None = None
    test: LabeledData | None = None
    batch_size: int = 128
    eval_batch_size: int = 128
    progress: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the model runs (ingredients are read to it one tensor at a time)."""
    dtype: torch.dtype | None = None
    """dtype of the weights the job loads, and of the soup (None: as stored)."""
    precision: str | None = None
    """Autocast for the forward/backward passes: "bf16", "fp16" or None."""
    _batches: dict = field(default_factory=dict)
    _model: torch.nn.Module | None = None
    ingredient_metrics: list[dict] | None = None
    """Held-out metrics of each ingredient, once :func:`ingredient_rows` has run."""

    @property
    def source_dir(self) -> Path | None:
        return self.task.model_dir if self.task is not None else self.ingredients[0].hf_dir

    def batches(self, split: str, *, fit: bool = False) -> list[dict]:
        """Global batches of a split (for fitting), or this rank's share (for evaluation)."""
        data = self.held_out if split == "held_out" else self.test
        key = (split, fit)
        if key not in self._batches:
            size = self.batch_size if fit else self.eval_batch_size
            batches = self.task.batches(data, size)
            self._batches[key] = batches if fit else distributed.shard(batches)
        return self._batches[key]

    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self.task.load_model().to(device=self.device, dtype=self.dtype)
        return self._model

    def evaluate_state(self, state: dict, split: str = "held_out") -> dict:
        model = self.model()
        load_state(model, state)
        return evaluate(model, self.batches(split), precision=self.precision)

    def score(self, state: dict) -> float:
        """Held-out accuracy, ties broken by lower loss (for greedy)."""
        return score_of(self.evaluate_state(state))


def score_of(metrics: dict) -> float:
    return metrics["accuracy"] - 1e-6 * metrics["loss"]


def prepare_soup_job(
    ingredient_specs, *, model_dir=None, held_out=None, data=None, held_out_fraction=None,
    test=None, seed: int = 0, max_length: int = 128, batch_size: int = 128,
    eval_batch_size: int = 128, progress: bool = True, check_finite: bool = True,
    device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
    precision: str | None = None,
) -> SoupJob:
    """Open and validate the ingredients and read the data (all checks before any work).

    ``device``: auto (CUDA if available, else the CPU; under torchrun cuda:LOCAL_RANK), cpu,
    cuda, cuda:N, mps. ``dtype``: the weights' dtype for the job and the soup (None: as
    stored). ``precision``: "bf16"/"fp16" autocast for learned/MEHL and evaluation.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if precision not in (None, "bf16", "fp16"):
        raise UpcycleError(f"precision {precision!r}: expected bf16, fp16 or None")
    precision = check_precision(device, bf16=precision == "bf16", fp16=precision == "fp16")
    ingredients = open_ingredients(ingredient_specs)
    validate_ingredients(ingredients, check_finite=check_finite)
    job = SoupJob(ingredients, batch_size=batch_size, eval_batch_size=eval_batch_size,
                  progress=progress, device=device, dtype=dtype, precision=precision)
    if held_out is None and data is None:
        if test is not None:
            raise UpcycleError("--test needs held-out data too (--held-out, or --data with "
                               "--held-out-fraction)")
        return job
    model_dir = model_dir or ingredients[0].hf_dir
    if model_dir is None:
        raise UpcycleError("the ingredients are not HuggingFace folders: pass --model DIR (a HF "
                           "folder with the model's config) to evaluate them on data")
    job.task = load_task(model_dir, held_out or data, max_length=max_length)
    if held_out is not None:
        job.held_out = job.task.read(held_out, split="held-out")
        if test is not None:
            job.test = job.task.read(test, split="test")
    else:
        pool = job.task.read(data, split="data")
        if held_out_fraction is None:
            raise UpcycleError("--data needs --held-out-fraction (or give --held-out FILE)")
        rest, job.held_out = job.task.split(pool, held_out_fraction, seed)
        job.test = job.task.read(test, split="test") if test is not None else rest
    if job.task.num_labels is None:
        raise UpcycleError(f"model {model_dir}: has no classification head, so the number of "
                           f"classes is unknown; soup ingredients must be classification models")
    return job


def _mehl_config(method: str, *, model_batch: int, epochs: int, lr: float | None,
                 models_epochs: int, grad_clip: float | None, seed: int, progress: bool,
                 compact_directions: bool, shard_directions: bool = False) -> MehlConfig:
    return MehlConfig(model_batch=model_batch, blockwise=method.endswith("+"), epochs=epochs,
                      models_epochs=models_epochs, grad_clip=grad_clip, seed=seed,
                      progress=progress, compact_directions=compact_directions,
                      shard_directions=shard_directions,
                      **({"lr": lr} if lr else {}))


def check_resume(job: SoupJob, method: str, checkpoint_dir, *, model_batch: int = 18,
                 epochs: int = 5, lr: float | None = None, models_epochs: int = 1,
                 grad_clip: float | None = None, seed: int = 0,
                 compact_directions: bool = False, shard_directions: bool = False) -> dict:
    """Before any work: the MEHL checkpoint in ``checkpoint_dir`` exists and was made from
    these ingredients, this method, these settings and this held-out data (raises saying
    which differs). Returns the checkpoint's state (rounds done, history...)."""
    if not method.startswith("mehl"):
        raise UpcycleError(f"resume applies to MEHL soups (mehl, mehl+), not {method}: the other "
                           f"methods keep no checkpoint")
    config = _mehl_config(method, model_batch=model_batch, epochs=epochs, lr=lr,
                          models_epochs=models_epochs, grad_clip=grad_clip, seed=seed,
                          progress=False, compact_directions=compact_directions,
                          shard_directions=shard_directions)
    saved = soup_resume.load_checkpoint(checkpoint_dir)
    model = job.model()
    first = next(n for n, _ in model.named_parameters())
    settings = {**config.settings(), "precision": job.precision,
                "model_dtype": str(dict(model.named_parameters())[first].dtype)}
    current = soup_resume.fingerprint(job.ingredients, job.batches("held_out", fit=True),
                                      method, settings)
    soup_resume.check_fingerprint(saved.state["fingerprint"], current,
                                  soup_resume.checkpoint_path(checkpoint_dir))
    return saved.state


def run_method(job: SoupJob, method: str, *, model_batch: int = 18, epochs: int = 5,
               lr: float | None = None, models_epochs: int = 1, grad_clip: float | None = None,
               seed: int = 0, compact_directions: bool = False,
               shard_directions: bool = False, checkpoint_dir=None,
               resume: bool = False, callback=None) -> tuple[SoupResult, dict]:
    """Run one soup method on the job's device and precision; returns the soup and a report
    row (metrics, time, peak memory). MEHL only: ``checkpoint_dir`` (a checkpoint after
    every round), ``resume`` (continue from it), ``callback(record)`` after each round."""
    if method not in METHODS:
        raise UpcycleError(f"unknown soup method {method!r}; choose from {', '.join(METHODS)}")
    if method in DATA_METHODS and job.task is None:
        raise UpcycleError(f"method {method!r} needs held-out data (--held-out FILE, or --data FILE "
                           f"--held-out-fraction F)")
    if resume and not method.startswith("mehl"):
        raise UpcycleError(f"resume applies to MEHL soups (mehl, mehl+), not {method}")
    n = len(job.ingredients)
    if method in ("learned", "learned+", "mehl", "mehl+") and n < 2:
        raise UpcycleError(f"method {method!r} needs at least 2 ingredients, got {n}")
    start = time.perf_counter()
    placement = {"device": job.device, "precision": job.precision, "dtype": job.dtype}
    if method == "uniform":
        result = uniform_soup(job.ingredients, progress=job.progress, dtype=job.dtype)
    elif method == "greedy":
        known = None if job.ingredient_metrics is None else [
            score_of(m) for m in job.ingredient_metrics]
        result = greedy_soup(job.ingredients, job.score, progress=job.progress,
                             ingredient_scores=known, dtype=job.dtype)
    elif method.startswith("learned"):
        config = LearnedConfig(blockwise=method.endswith("+"), epochs=epochs, seed=seed,
                               progress=job.progress, **({"lr": lr} if lr else {}))
        result = learned_soup(job.ingredients, job.model(), job.batches("held_out", fit=True),
                              loss_fn=classification_loss, config=config, **placement)
    else:
        config = _mehl_config(method, model_batch=model_batch, epochs=epochs, lr=lr,
                              models_epochs=models_epochs, grad_clip=grad_clip, seed=seed,
                              progress=job.progress, compact_directions=compact_directions,
                              shard_directions=shard_directions)
        result = mehl_soup(job.ingredients, job.model(), job.batches("held_out", fit=True),
                           loss_fn=classification_loss, config=config,
                           eval_fn=lambda m: evaluate(m, job.batches("held_out"),
                                                      precision=job.precision),
                           checkpoint_dir=checkpoint_dir, resume=resume, callback=callback,
                           **placement)
    seconds = time.perf_counter() - start
    row = {"method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if job.device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(job.device) / 2**20
    if job.task is not None:
        # MEHL's last round already evaluated the held-out split on exactly these weights.
        last = result.history[-1] if method.startswith("mehl") else {}
        held = ({"accuracy": last["held_out_accuracy"], "loss": last["held_out_loss"]}
                if "held_out_accuracy" in last else None)
        row.update(_metrics(job, result.state, held_out=held))
    return result, row


def _metrics(job: SoupJob, state: dict, *, test: bool = True,
             held_out: dict | None = None) -> dict:
    """Held-out (unless already known) and test metrics of a state dict."""
    row = {}
    held = held_out if held_out is not None else job.evaluate_state(state, "held_out")
    row["held_out_accuracy"], row["held_out_loss"] = held["accuracy"], held["loss"]
    if test and job.test is not None:
        t = job.evaluate_state(state, "test")
        row["test_accuracy"], row["test_loss"] = t["accuracy"], t["loss"]
    return row


def ingredient_rows(job: SoupJob) -> list[dict]:
    """Held-out metrics of every ingredient, in order (kept on the job for greedy)."""
    rows = []
    for ing in job.ingredients:
        rows.append({"method": f"ingredient {ing.index}", "path": str(ing.path),
                     **_metrics(job, ing.state_dict(), test=False)})
    job.ingredient_metrics = [{"accuracy": r["held_out_accuracy"], "loss": r["held_out_loss"]}
                              for r in rows]
    return rows


def best_ingredient_row(job: SoupJob, rows: list[dict]) -> dict:
    """The ingredient with the best held-out accuracy (chosen on held-out, never on test),
    with its test metrics."""
    i = max(range(len(rows)), key=lambda j: (rows[j]["held_out_accuracy"],
                                             -rows[j]["held_out_loss"]))
    return {**rows[i], **_metrics(job, job.ingredients[i].state_dict()),
            "method": f"best ingredient ({i + 1})", "index": i}
