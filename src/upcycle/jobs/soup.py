"""A soup job end to end: ingredients on disk + a task -> soup + report.

The task is classification (held-out accuracy, loss) or a causal LM (held-out token loss and
perplexity), chosen from the model's config (see :func:`upcycle.tasks.load_task`).
Ingredients may be full checkpoints or peft LoRA adapter folders on ``base``.

Used by ``upcycle soup`` (one method), ``upcycle demo`` and the soup benchmarks (every
method): the orchestration lives here once.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UpcycleError
from ..io.checkpoints import Ingredient, _short
from ..io.ingredients import (
    check_configs,
    expand_ingredient_paths,
    open_ingredients,
    validate_ingredients,
)
from ..io.outputs import expand_globs, guard_output
from ..io.writing import check_output, write_json
from ..runtime import distributed
from ..runtime.devices import check_precision, resolve_device, resolve_dtype
from ..runtime.memory import peak_rss_mb
from ..soup import SoupContext, SoupResult, get_method
from ..soup.anchor import check_merges, merges_need_base, resolve_merge_configs
from ..soup.common import load_state
from ..soup.keep_best import not_kept_row
from ..soup.merge import check_base
from ..soup.mergekit import mergekit_files
from ..soup.registry import check_count, method_names
from ..soup.resume import checkpoint_path
from ..tasks import Task, load_task
from ..tasks.causal_lm import LMData, is_causal_lm
from ..tasks.classification import LabeledData
from .soup_files import (
    _tokenizer_candidates,
    config_with_dtype,
    find_tokenizer_dir,
    tokenizer_files,
)

REPORT_COLUMNS = [
    ("method", "method", ""), ("held_out_accuracy", "held-out acc", ".4f"),
    ("held_out_loss", "held-out loss", ".4f"), ("test_accuracy", "test acc", ".4f"),
    ("seconds", "time (s)", ".1f"), ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
]
LM_REPORT_COLUMNS = [
    ("method", "method", ""), ("held_out_loss", "held-out loss", ".4f"),
    ("held_out_perplexity", "held-out ppl", ".3f"), ("test_loss", "test loss", ".4f"),
    ("test_perplexity", "test ppl", ".3f"), ("seconds", "time (s)", ".1f"),
    ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
]
COLUMNS = {"classification": REPORT_COLUMNS, "causal-lm": LM_REPORT_COLUMNS}
"""The report table's columns for each kind of task."""

@dataclass
class SoupJob:
    ingredients: list[Ingredient]
    task: Task | None = None
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
    base: Ingredient | None = None
    """The base model (``--base``), opened when a method merges relative to it or LoRA
    adapters are among the ingredients."""
    config_dir: Path | None = None
    """The ingredient folder whose config the soup takes (``--config-from N``; None: the
    first ingredient's, or ``--model``'s)."""

    @property
    def task_name(self) -> str:
        """The task's kind: "classification" or "causal-lm" (known without data too)."""
        if self.task is not None:
            return self.task.name
        return "causal-lm" if self.causal_lm else "classification"

    @property
    def source_dir(self) -> Path | None:
        if self.config_dir is not None:
            return self.config_dir
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
        return self.task.evaluate(model, self.batches(split), precision=self.precision)

    def score(self, state: dict) -> float:
        """Held-out score for greedy (higher is better): accuracy, ties broken by lower loss;
        for a causal LM minus the held-out token loss."""
        return self.task.score(self.evaluate_state(state))


def prepare_soup_job(
    ingredient_specs, *, model_dir=None, held_out=None, data=None, held_out_fraction=None,
    test=None, seed: int = 0, max_length: int | None = None, batch_size: int = 128,
    eval_batch_size: int | None = None, progress: bool = True, check_finite: bool = True,
    device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
    precision: str | None = None, base=None, task: str | None = "auto", chunk: bool = False,
    need_base: bool = False, config_from: int | None = None,
) -> SoupJob:
    """Open and validate the ingredients and read the data (all checks before any work).

    ``device``: auto (CUDA if available, else the CPU; under torchrun cuda:LOCAL_RANK), cpu,
    cuda, cuda:N, mps. ``dtype``: the weights' dtype for the job and the soup (None: as
    stored). ``precision``: "bf16"/"fp16" autocast for learned/MEHL and evaluation.
    ``base``: the base model of peft LoRA adapter ingredients (needed for them; a causal
    LM's tokenizer is also looked for there). ``task``: "auto" (from the model's config),
    "classification" or "causal-lm". ``max_length``: default 128 tokens for classification,
    min(512, position limit) for a causal LM; ``chunk``: a causal-LM .txt file is one stream.
    ``eval_batch_size``: the batch size of scoring and evaluation (None: ``batch_size``).
    ``need_base``: the method merges relative to ``base`` (required then, opened and checked
    against the ingredients: same tensors and shapes). ``config_from``: the ingredient
    (1-based) whose config.json the soup takes when the ingredients' configs differ (else
    differing configs are refused, naming the field).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if precision not in (None, "bf16", "fp16"):
        raise UpcycleError(f"precision {precision!r}: expected bf16, fp16 or None")
    precision = check_precision(device, bf16=precision == "bf16", fp16=precision == "fp16")
    if base is not None and not isinstance(base, Ingredient) and not Path(base).exists():
        raise UpcycleError(f"--base {base}: no such folder")
    if need_base and base is None:
        raise UpcycleError("this method needs --base: the model the ingredients were "
                           "fine-tuned from")
    if need_base and not isinstance(base, Ingredient):
        base = Ingredient(base, index=0, role="--base")
    ingredients = open_ingredients(ingredient_specs, base=base)
    if need_base:
        check_base(base, ingredients)
    # headers now; NaN/Inf as the soup reads each tensor: one read, not two, and the first
    # output (a terminal's or a log's) does not wait for a read of every ingredient
    validate_ingredients(ingredients, check_finite=check_finite, dtype=dtype,
                         defer_finite=True)
    job = SoupJob(ingredients, batch_size=batch_size,
                  eval_batch_size=batch_size if eval_batch_size is None else eval_batch_size,
                  progress=progress, device=device, dtype=dtype, precision=precision)
    job.base = base if isinstance(base, Ingredient) else None
    job.config_dir = check_configs(ingredients, config_from=config_from)
    config_dir = model_dir or job.config_dir or ingredients[0].hf_dir
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
    job.causal_lm = job.task.name == "causal-lm"
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
    if not job.causal_lm and job.task.num_labels is None:
        raise UpcycleError(f"model {model_dir}: has no classification head, so the number of "
                           f"classes is unknown; soup ingredients must be classification models")
    return job


def soup_context(job: SoupJob, *, checkpoint_dir=None, resume: bool = False,
                 callback=None) -> SoupContext:
    """What a soup method gets from the job: with data, the model, the held-out batches and
    the task's loss, evaluation and score (all loaded when a method first asks for them)."""
    data = job.task is not None
    known = None if job.ingredient_metrics is None else [
        job.task.score(m) for m in job.ingredient_metrics]
    return SoupContext(
        load_model=job.model if data else None,
        load_held_out=(lambda: job.batches("held_out", fit=True)) if data else None,
        loss_fn=job.task.loss if data else None,
        eval_fn=(lambda m: job.task.evaluate(m, job.batches("held_out"),
                                             precision=job.precision)) if data else None,
        score_fn=job.score if data else None, ingredient_scores=known,
        device=job.device, precision=job.precision, dtype=job.dtype, progress=job.progress,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        resume=resume, callback=callback, base=job.base)


def check_resume(job: SoupJob, method: str, config, checkpoint_dir) -> dict:
    """Before any work: the checkpoint in ``checkpoint_dir`` exists and was made from these
    ingredients, this method, these settings (``config``, the method's config) and this
    held-out data (raises saying which differs). Returns the checkpoint's state (rounds
    done, history...)."""
    entry = get_method(method)
    if not entry.resumable:
        raise UpcycleError(f"resume applies to {_resumable()}, not {method}: the other "
                           f"methods keep no checkpoint")
    return entry.check_resume(job.ingredients,
                              soup_context(job, checkpoint_dir=checkpoint_dir), config)


def _resumable() -> str:
    return " or ".join(method_names(resumable=True))


def run_method(job: SoupJob, method: str, config=None, *, checkpoint_dir=None,
               resume: bool = False, callback=None, **settings) -> tuple[SoupResult, dict]:
    """Run one soup method on the job's device and precision; returns the soup and a report
    row (metrics, time, peak memory). ``config``: the method's config (None: made from
    ``settings``, e.g. ``model_batch=4, epochs=2``, see :meth:`SoupMethod.make_config`).
    Resumable methods (MEHL): ``checkpoint_dir`` (a checkpoint after every round), ``resume``
    (continue from it), ``callback(record)`` after each round."""
    entry = get_method(method)
    if entry.needs_data and job.task is None:
        raise UpcycleError(f"method {method!r} needs held-out data (--held-out FILE, or --data FILE "
                           f"--held-out-fraction F)")
    if resume and not entry.resumable:
        raise UpcycleError(f"resume applies to {_resumable()}, not {method}")
    n = len(job.ingredients)
    check_count(entry, n)
    if config is None:
        config = make_method_config(entry, n, settings)
    context = soup_context(job, checkpoint_dir=checkpoint_dir, resume=resume,
                           callback=callback)
    start = time.perf_counter()
    result = entry.run(job.ingredients, context, config)
    seconds = time.perf_counter() - start
    row = {"method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if job.device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(job.device) / 2**20
    if job.task is not None:
        # (the row's peak_rss_mb is updated once the soup is evaluated, and again once saved)
        # A fitted soup whose last record evaluated the held-out split already did so on
        # exactly these weights, unless the soup is stored in another dtype than the model
        # ran in (bf16 ingredients)
        last = result.history[-1] if result.history and _same_dtypes(job, result.state) else {}
        kept = result.info.get("keep_best")
        if kept is not None and last:  # the state kept: the start or the best round's
            last = {f"held_out_{k}": v for k, v in kept["kept_held_out"].items()}
        keys = job.task.metric_names
        held = ({k: last[f"held_out_{k}"] for k in keys}
                if all(f"held_out_{k}" in last for k in keys) else None)
        row.update(_metrics(job, result.state, held_out=held))
        row["peak_rss_mb"] = peak_rss_mb()
    return result, row


def make_method_config(entry, n: int, settings: dict):
    """The method's config from the command's settings (by field name), with the configs of
    the merges it starts from or compares (``--init``, ``--candidates``) made from the same
    settings."""
    return resolve_merge_configs(entry.make_config(n, **settings), n, settings)


def _same_dtypes(job: SoupJob, state: dict) -> bool:
    own = job.model().state_dict()
    return all(v.dtype == own[k].dtype for k, v in state.items() if k in own)


def _metrics(job: SoupJob, state: dict, *, test: bool = True,
             held_out: dict | None = None) -> dict:
    """Held-out (unless already known) and test metrics of a state dict: accuracy and loss,
    or for a causal LM token loss and perplexity."""
    keys = job.task.metric_names
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
    LM: the lowest token loss), chosen on held-out, never on test, with its test metrics;
    called "best ingredient (i: its file or folder name)"."""
    i = max(range(len(rows)), key=lambda j: (rows[j].get("held_out_accuracy", 0.0),
                                             -rows[j]["held_out_loss"]))
    return {**rows[i], **_metrics(job, job.ingredients[i].state_dict()),
            "method": f"best ingredient ({i + 1}: {job.ingredients[i].path.name})", "index": i}


# -- the whole job: config in, soup + rows + report out ----------------------------------------

@dataclass
class SoupConfig:
    """Everything ``upcycle soup`` does, as one object (:func:`run_soup`)."""
    ingredients: list
    """Checkpoint files, HF folders, peft LoRA adapter folders (with ``base``), folders of
    checkpoints, or globs."""
    method: str = "uniform"
    """A registered soup method (:data:`upcycle.soup.SOUP_METHODS`)."""
    out: str | Path | None = None
    """Where to write the soup: a HF folder or a .safetensors file (None: not written)."""
    overwrite: bool = False
    method_settings: dict = field(default_factory=dict)
    """The method's settings by field name (``{"model_batch": 4, "epochs": 2}``); names its
    config class lacks and None values are ignored (the defaults)."""
    method_config: object | None = None
    """The method's config, ready made (wins over ``method_settings``)."""
    held_out: str | Path | None = None
    data: str | Path | None = None
    held_out_fraction: float | None = None
    test: str | Path | None = None
    model: str | Path | None = None
    """HF folder with the config/tokenizer (default: the first ingredient's)."""
    base: str | Path | None = None
    task: str = "auto"
    max_length: int | None = None
    chunk: bool = False
    batch_size: int = 128
    """Held-out batch size of the fitted soups (learned, MEHL)."""
    eval_batch_size: int | None = None
    """Batch size of scoring and evaluation (None: ``batch_size``)."""
    device: str | torch.device = "auto"
    dtype: str | torch.dtype | None = None
    precision: str | None = None
    seed: int = 0
    """Seeds the held-out split and the method (its ``seed`` setting unless given)."""
    max_shard_bytes: int | None = None
    check_finite: bool = True
    progress: bool = True
    config_from: int | None = None
    """The ingredient (1-based) whose config.json the soup takes when theirs differ."""
    resume: bool = False
    """Resumable methods: continue from the checkpoint an interrupted run left beside ``out``."""
    command: str | None = None
    """The command that made the soup (model card, report)."""
    report_config: dict | None = None
    """The flags of the command (the report's ``config``; settings resolved from the number
    of ingredients, e.g. MEHL's K, are filled in)."""


@dataclass
class SoupRun:
    """What :func:`run_soup` made: the soup, the report rows and the report."""
    soup: SoupResult
    rows: list[dict]
    report: dict
    job: SoupJob
    method_config: object | None = None


def partial_dir(out: Path) -> Path:
    """Where an unfinished soup keeps its checkpoint: a fixed sibling of ``out``, so that a
    rerun with --resume finds it; removed once the soup is written."""
    return out.parent / f".{out.name}.partial"


def _quiet(message: str) -> None:
    pass


def soup_inputs(config: SoupConfig) -> list[tuple[str, object]]:
    """What a soup reads (label, path): ``out`` may be none of them."""
    return [*[("ingredient", spec) for spec in expand_globs(config.ingredients)],
            ("--model", config.model), ("--base", config.base if not isinstance(
                config.base, Ingredient) else None),
            ("--held-out", config.held_out), ("--data", config.data), ("--test", config.test)]


def run_soup(config: SoupConfig, *, say=_quiet, on_round=None, on_saved=None) -> SoupRun:
    """Prepare (every check before any work), soup, score and save: ``upcycle soup`` as a
    function. ``say(message)``: warnings and notes (only one ingredient; resuming; a left-over
    checkpoint). Resumable methods with ``out``: a checkpoint after every round in
    :func:`partial_dir`, ``on_round(record)`` once it is written; ``on_saved(out)`` once the
    soup is written (the checkpoint is removed after). ``out`` may not be, hold or lie inside
    an input; its folder must be writable, and it is locked for the run (a second run on it
    is refused)."""
    if config.out is None:
        return _run_soup(config, say=say, on_round=on_round, on_saved=on_saved)
    out = Path(config.out)
    with guard_output(out, inputs=soup_inputs(config),
                      written=[("checkpoint folder", partial_dir(out))]):
        return _run_soup(config, say=say, on_round=on_round, on_saved=on_saved)


def _run_soup(config: SoupConfig, *, say=_quiet, on_round=None, on_saved=None) -> SoupRun:
    entry = get_method(config.method)
    out = Path(config.out) if config.out is not None else None
    if out is not None:
        check_output(out, config.overwrite)
    partial = partial_dir(out) if out is not None and entry.resumable else None
    if config.resume and not entry.resumable:
        raise UpcycleError(f"--resume applies to --method {_resumable()} (the other methods "
                           f"keep no checkpoint), not {config.method}")
    if config.resume and partial is None:
        raise UpcycleError("--resume needs --out: the checkpoint of an interrupted soup is kept "
                           "beside it")
    if config.resume and not checkpoint_path(partial).is_file():
        raise UpcycleError(f"--resume: no checkpoint of an interrupted soup for {out} (looked "
                           f"for {checkpoint_path(partial)}); run without --resume to start")
    _check_method_early(config, entry)
    _check_paths(config)
    job = prepare_soup_job(
        config.ingredients, model_dir=config.model, held_out=config.held_out, data=config.data,
        held_out_fraction=config.held_out_fraction, test=config.test, seed=config.seed,
        max_length=config.max_length, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, progress=config.progress,
        check_finite=config.check_finite, device=config.device, dtype=config.dtype,
        precision=config.precision, base=config.base, task=config.task, chunk=config.chunk,
        need_base=entry.needs_base or bool(merges_need_base(
            config.method_config or _early_config(config, entry))),
        config_from=config.config_from)
    n = len(job.ingredients)
    if n == 1 and distributed.is_main():
        say(f"warning: only one ingredient ({job.ingredients[0].path}): the soup is a copy "
            f"of it")
    method_config = config.method_config or _early_config(config, entry, n)
    if entry.check is not None:
        entry.check(method_config, n)
    if config.resume and job.task is not None:
        state = check_resume(job, config.method, method_config, partial)
        if distributed.is_main():
            say(f"resuming {config.method} after round {state['rounds_done']}/"
                f"{state['rounds_total']} from {partial}")
    elif partial is not None and checkpoint_path(partial).is_file() and distributed.is_main():
        say(f"note: {partial} holds a checkpoint of an interrupted soup; starting over (pass "
            f"--resume to continue it instead)")
    rows, ing_rows = [], None
    if job.task is not None:
        ing_rows = ingredient_rows(job, progress=job.progress)
        rows.append(best_ingredient_row(job, ing_rows))
    resumable = {} if partial is None else dict(checkpoint_dir=partial, resume=config.resume,
                                                callback=on_round)
    result, row = run_method(job, config.method, method_config, **resumable)
    rows.append(row)
    if (extra := not_kept_row(config.method, result)) is not None:
        rows.append(extra)
    report = {"method": config.method, "ingredients": [str(i.path) for i in job.ingredients],
              "rows": rows, "soup": result.summary(),
              "config": _report_config(config, entry, n), "command": config.command}
    if ing_rows is not None:
        report["ingredient_rows"] = ing_rows
    if out is not None and distributed.is_main():
        if out.suffix != ".safetensors" and job.tokenizer_dir is None and find_tokenizer_dir(
                [job.source_dir]) is None:
            say(f"warning: no tokenizer in any ingredient, --model or --base: {out} will "
                f"have none (save one beside it with tokenizer.save_pretrained)")
        result.save(out, source_dir=job.source_dir, overwrite=config.overwrite,
                    max_shard_bytes=config.max_shard_bytes, rows=rows, command=config.command,
                    card={"task": job.task_name,
                          "base_model": None if job.base is None else str(job.base.path)},
                    extra_files={**tokenizer_files(job), **config_with_dtype(job, result.state),
                                 **mergekit_files(result, job.ingredients, base=job.base,
                                                  dtype=job.dtype, model=job._model),
                                 "report.json": json.dumps(report, indent=2, default=str)})
        row["peak_rss_mb"] = peak_rss_mb()  # the whole run's, saving included
        write_json(out.with_name(out.name + ".report.json") if out.suffix == ".safetensors"
                   else out / "report.json", json.loads(json.dumps(report, default=str)))
        if on_saved is not None:
            on_saved(out)
        if partial is not None and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return SoupRun(result, rows, report, job, method_config)


def _check_paths(config: SoupConfig) -> None:
    """Every input path exists, before any ingredient is opened (a mistyped --held-out is
    reported at once, not after N checkpoints were read)."""
    paths = [("ingredient", p) for p in expand_ingredient_paths(config.ingredients)]
    for label, path in paths + [(label, p) for label, p in soup_inputs(config)
                                if label != "ingredient"]:
        if path is not None and not isinstance(path, Ingredient) and not Path(path).exists():
            raise UpcycleError(f"{label} {path}: no such file or folder")


def _check_method_early(config: SoupConfig, entry) -> None:
    """Before any ingredient is opened: the method's --base, its number of ingredients (from
    the paths alone) and its settings."""
    if entry.needs_base and config.base is None:
        raise UpcycleError(f"method {entry.name!r} needs --base: the model the ingredients were "
                           f"fine-tuned from (their task vectors are theta_i - theta_0)")
    n = len(expand_ingredient_paths(config.ingredients))
    check_count(entry, n)
    method_config = config.method_config or _early_config(config, entry, n)
    if entry.check is not None and config.method_config is None:
        entry.check(method_config, n)
    check_merges(method_config, n, has_base=config.base is not None)


def _early_config(config: SoupConfig, entry, n: int | None = None):
    """The method's config from the job's settings (``n``: the number of ingredients; None:
    counted from the paths)."""
    if n is None:
        n = len(expand_ingredient_paths(config.ingredients))
    return make_method_config(entry, n, {"seed": config.seed, **config.method_settings})


def _report_config(config: SoupConfig, entry, n: int) -> dict | None:
    """The command's flags with the settings resolved from the number of ingredients (the
    value used, e.g. MEHL's K = min(18, N)) where the flag was left unset."""
    if config.report_config is None:
        return None
    flags = dict(config.report_config)
    for name, value in (entry.defaults(n) if entry.defaults is not None else {}).items():
        flag = name.replace("_", "-")
        if flag in flags and flags[flag] is None:
            flags[flag] = value
    return flags
