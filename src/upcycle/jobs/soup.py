"""A soup job end to end: ingredients on disk + a task -> soup + report.

The task is classification (held-out accuracy, loss) or a causal LM (held-out token loss and
perplexity), chosen from the model's config (see :func:`upcycle.tasks.load_task`).
Ingredients may be full checkpoints or peft LoRA adapter folders on ``base``.

Used by ``upcycle soup`` (one method), ``upcycle demo`` and the soup benchmarks (every
method): the orchestration lives here once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UpcycleError
from ..io.checkpoints import Ingredient, _short
from ..io.ingredients import open_ingredients, validate_ingredients
from ..runtime import distributed
from ..runtime.devices import check_precision, resolve_device, resolve_dtype
from ..runtime.memory import peak_rss_mb
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
from ..tasks import evaluate_task, is_lm_task, load_task, task_loss
from ..tasks.causal_lm import CausalLMTask, LMData, is_causal_lm
from ..tasks.classification import ClassificationTask, LabeledData

DATA_METHODS = ("greedy", "learned", "learned+", "mehl", "mehl+")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class SoupJob:
    ingredients: list[Ingredient]
    task: ClassificationTask | CausalLMTask | None = None
    held_out: LabeledData | LMData | None = None
    test: LabeledData | LMData | None = None
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
    causal_lm: bool = False
    """The ingredients are causal LMs (from the model's config, or ``task="causal-lm"``)."""
    tokenizer_dir: Path | None = None
    """Causal LM: the folder the tokenizer comes from (the model folder, an ingredient or the
    base), None when none has one."""

    @property
    def is_lm(self) -> bool:
        return self.causal_lm or is_lm_task(self.task)

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
        return evaluate_task(self.task, model, self.batches(split), precision=self.precision)

    def score(self, state: dict) -> float:
        """Held-out score for greedy (higher is better): accuracy, ties broken by lower loss;
        for a causal LM minus the held-out token loss."""
        return score_of(self.evaluate_state(state))


def score_of(metrics: dict) -> float:
    """Higher is better: accuracy (ties broken by lower loss) when there is one, else minus
    the loss (causal LM)."""
    if "accuracy" not in metrics:
        return -metrics["loss"]
    return metrics["accuracy"] - 1e-6 * metrics["loss"]


def find_tokenizer_dir(folders) -> Path | None:
    """The first of ``folders`` (None entries skipped) holding tokenizer files."""
    for folder in folders:
        if folder is not None and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
            return Path(folder)
    return None


def _tokenizer_candidates(ingredients, model_dir, base) -> list[Path]:
    """Where a causal LM's tokenizer may be: --model, each ingredient's folder (an adapter's
    own folder, then its base), then --base; each once, in that order."""
    found: list[Path] = []
    for folder in [model_dir, *[d for ing in ingredients for d in (
            ing.path if ing.path.is_dir() else None, ing.hf_dir)], base]:
        if folder is not None and Path(folder).is_dir() and Path(folder) not in found:
            found.append(Path(folder))
    return found


def prepare_soup_job(
    ingredient_specs, *, model_dir=None, held_out=None, data=None, held_out_fraction=None,
    test=None, seed: int = 0, max_length: int | None = None, batch_size: int = 128,
    eval_batch_size: int = 128, progress: bool = True, check_finite: bool = True,
    device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
    precision: str | None = None, base=None, task: str | None = "auto", chunk: bool = False,
) -> SoupJob:
    """Open and validate the ingredients and read the data (all checks before any work).

    ``device``: auto (CUDA if available, else the CPU; under torchrun cuda:LOCAL_RANK), cpu,
    cuda, cuda:N, mps. ``dtype``: the weights' dtype for the job and the soup (None: as
    stored). ``precision``: "bf16"/"fp16" autocast for learned/MEHL and evaluation.
    ``base``: the base model of peft LoRA adapter ingredients (needed for them; a causal
    LM's tokenizer is also looked for there). ``task``: "auto" (from the model's config),
    "classification" or "causal-lm". ``max_length``: default 128 tokens for classification,
    min(512, position limit) for a causal LM; ``chunk``: a causal-LM .txt file is one stream.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if precision not in (None, "bf16", "fp16"):
        raise UpcycleError(f"precision {precision!r}: expected bf16, fp16 or None")
    precision = check_precision(device, bf16=precision == "bf16", fp16=precision == "fp16")
    if base is not None and not isinstance(base, Ingredient) and not Path(base).exists():
        raise UpcycleError(f"--base {base}: no such folder")
    ingredients = open_ingredients(ingredient_specs, base=base)
    validate_ingredients(ingredients, check_finite=check_finite)
    job = SoupJob(ingredients, batch_size=batch_size, eval_batch_size=eval_batch_size,
                  progress=progress, device=device, dtype=dtype, precision=precision)
    config_dir = model_dir or ingredients[0].hf_dir
    job.causal_lm = task == "causal-lm" or (
        task in (None, "auto") and config_dir is not None and is_causal_lm(config_dir))
    base_dir = base.hf_dir if isinstance(base, Ingredient) else (
        Path(base) if base is not None and Path(base).is_dir() else None)
    if job.causal_lm:
        job.tokenizer_dir = find_tokenizer_dir(_tokenizer_candidates(ingredients, model_dir,
                                                                     base_dir))
    if held_out is None and data is None:
        if test is not None:
            raise UpcycleError("--test needs held-out data too (--held-out, or --data with "
                               "--held-out-fraction)")
        return job
    model_dir = config_dir
    if model_dir is None:
        raise UpcycleError("the ingredients are not HuggingFace folders: pass --model DIR (a HF "
                           "folder with the model's config) to evaluate them on data")
    if job.causal_lm and job.tokenizer_dir is None:
        looked = ", ".join(_short(p) for p in _tokenizer_candidates(ingredients, model_dir,
                                                                    base_dir))
        raise UpcycleError(f"no tokenizer in any ingredient or --base (looked in {looked}): "
                           f"save one beside a model with tokenizer.save_pretrained, or pass "
                           f"--base (or --model) with a folder that has it")
    job.task = load_task(model_dir, held_out or data, max_length=max_length, task=task,
                         base_dir=job.tokenizer_dir if job.causal_lm else None, chunk=chunk)
    job.causal_lm = is_lm_task(job.task)
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
    if not job.is_lm and job.task.num_labels is None:
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
                              loss_fn=task_loss(job.task), config=config, **placement)
    else:
        config = _mehl_config(method, model_batch=model_batch, epochs=epochs, lr=lr,
                              models_epochs=models_epochs, grad_clip=grad_clip, seed=seed,
                              progress=job.progress, compact_directions=compact_directions,
                              shard_directions=shard_directions)
        result = mehl_soup(job.ingredients, job.model(), job.batches("held_out", fit=True),
                           loss_fn=task_loss(job.task), config=config,
                           eval_fn=lambda m: evaluate_task(job.task, m, job.batches("held_out"),
                                                           precision=job.precision),
                           checkpoint_dir=checkpoint_dir, resume=resume, callback=callback,
                           **placement)
    seconds = time.perf_counter() - start
    row = {"method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if job.device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(job.device) / 2**20
    if job.task is not None:
        # MEHL's last round already evaluated the held-out split on exactly these weights,
        # unless the soup is stored in another dtype than the model ran in (bf16 ingredients)
        last = result.history[-1] if method.startswith("mehl") and _same_dtypes(
            job, result.state) else {}
        keys = ("loss", "perplexity") if job.is_lm else ("accuracy", "loss")
        held = ({k: last[f"held_out_{k}"] for k in keys}
                if all(f"held_out_{k}" in last for k in keys) else None)
        row.update(_metrics(job, result.state, held_out=held))
    return result, row


def _same_dtypes(job: SoupJob, state: dict) -> bool:
    own = job.model().state_dict()
    return all(v.dtype == own[k].dtype for k, v in state.items() if k in own)


def _metrics(job: SoupJob, state: dict, *, test: bool = True,
             held_out: dict | None = None) -> dict:
    """Held-out (unless already known) and test metrics of a state dict: accuracy and loss,
    or for a causal LM token loss and perplexity."""
    keys = ("loss", "perplexity") if job.is_lm else ("accuracy", "loss")
    row = {}
    held = held_out if held_out is not None else job.evaluate_state(state, "held_out")
    row.update({f"held_out_{k}": held[k] for k in keys})
    if test and job.test is not None:
        t = job.evaluate_state(state, "test")
        row.update({f"test_{k}": t[k] for k in keys})
    return row


def ingredient_rows(job: SoupJob, *, names: list[str] | None = None,
                    progress: bool = False) -> list[dict]:
    """Held-out metrics of every ingredient, in order (kept on the job for greedy). Rows are
    called ``names[i]`` when given, else "ingredient i"; ``progress``: a progress bar."""
    from tqdm.auto import tqdm

    rows = []
    for i, ing in enumerate(tqdm(job.ingredients, desc="scoring ingredients", leave=False,
                                 disable=not progress or not distributed.is_main())):
        name = names[i] if names is not None else f"ingredient {ing.index}"
        rows.append({"method": name, "path": str(ing.path),
                     **_metrics(job, ing.state_dict(), test=False)})
    job.ingredient_metrics = [{k[len("held_out_"):]: v for k, v in r.items()
                               if k.startswith("held_out_")} for r in rows]
    return rows


def best_ingredient_row(job: SoupJob, rows: list[dict]) -> dict:
    """The ingredient with the best held-out score (accuracy, ties broken by loss; a causal
    LM: the lowest token loss), chosen on held-out, never on test, with its test metrics."""
    i = max(range(len(rows)), key=lambda j: (rows[j].get("held_out_accuracy", 0.0),
                                             -rows[j]["held_out_loss"]))
    return {**rows[i], **_metrics(job, job.ingredients[i].state_dict()),
            "method": f"best ingredient ({i + 1})", "index": i}
