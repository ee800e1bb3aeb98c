"""MEHL-Soup / MEHL-Soup+ (Li et al. 2024): learned soups by block-coordinate descent on the
affine hull of the ingredients, with memory bounded by a model batch of K ingredients.

Per round, over a model batch S of K ingredients (order shuffled once per pass):
  anchor c (first round: the mean of S; then the current soup),
  directions d_i^l = (theta_i^l - c^l) / n_il with n_il = ||theta_i^l - c^l|| (zero: skipped),
  theta^l(X) = c^l + sum_i X[i, l] d_i^l with X = 0 at the start of the round,
  dL/dX[i, l] = <d_i^l, g^l> from ONE model's weight gradient g, AdamW on X with a fresh
  optimizer and a cosine schedule with 20% warm-up per round.
The implied coefficients C (N x L) always sum to 1 per block and are tracked exactly.

The start (``init``): the first anchor c is a fixed-weight merge of ALL N ingredients,
streamed: the uniform soup by default (C = 1/N), or any merge (``--init ties``,
``task-arithmetic``, ``model-stock``... with that merge's own settings, see
:mod:`upcycle.soup.anchor`). The reference centres the first round on the mean of its K
ingredients instead: the soup then starts from a model that weighs K of the N and is not the
uniform soup it is compared with, and a K = 1 batch has no direction at all. The directions
are always relative to the current anchor, so a merge that is not linear in the ingredients
(TIES, DARE, SLERP) is simply where the search starts: soup^l = a_l A^l + sum_i C[i, l]
theta_i^l with A the merge (a = 1, C = 0 at the start; each round scales both by
(1 - sum_i X_i/n_i) and adds X_i/n_i to its K rows). A merge that is linear in the ingredients
(and the base) is folded into C, whose rows are then the merge's.

Keep-best (:mod:`upcycle.soup.keep_best`): the held-out loss is measured at the start and
after every round; the soup is the best of those states, the start included, and a fit that
never beat its start says so (one warning line, ``info["keep_best"]``). Rounds of fewer than
:data:`~upcycle.soup.keep_best.MIN_ROUND_STEPS` coefficient steps get a warning first.

Where the directions live (``directions``, see :mod:`upcycle.soup.mehl_round`):
``resident`` builds the K directions once per round and keeps them, with the anchor, on the
model's device (fp32; ``compact_directions``: the ingredients' dtype, half for bf16);
``out-of-core`` keeps none: each step re-reads every tensor's K slices from the ingredients'
files as the combine and the gradient fold touch it (read ahead by one; a tensor over 16M
elements in pieces), and the anchor is a file, so memory is the model + its activations + two
pieces in flight, whatever K and N; keep-best's snapshot is a file too. ``auto`` (the
default, :func:`resolve_directions`): on the CPU out of core once the anchor and K
directions pass 1 GiB (there it costs ~1.1x the resident time) or half the available memory;
on a GPU resident when they fit in 90% of its free memory, else out of core. X, its
optimizer and the soup's accumulation stay fp32; the forward/backward may run under bf16/fp16
autocast.

Resume: with ``checkpoint_dir`` a small checkpoint is written after every round (see
``resume.py``); ``resume=True`` continues from the last finished round and produces the same
soup as an uninterrupted run with the same seed.

Memory: the model (holding theta), the anchor c, K directions (none out of core) and X. The
weight gradient is
consumed parameter by parameter as backward produces it (a post-accumulate-grad hook folds
it into dL/dX and frees it), so not even one full gradient is resident. Nothing grows with N
(out of core, nothing grows with K either).

Data parallel: under torch.distributed every rank evaluates its shard of each held-out batch
and only the K x L coefficient gradient (and the loss) is all-reduced. With gradient
clipping the global weight-gradient norm is needed, so the weight gradient is all-reduced
per parameter as well (documented cost).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import UpcycleError
from ..io.checkpoints import Ingredient
from ..io.source import TensorSource
from ..runtime import distributed
from ..training.schedules import cosine_with_warmup
from . import resume as ckpt
from .anchor import INIT_DEFAULT, check_merges, compose_coefficients, run_merge
from .common import (
    SoupResult,
    accumulator_dtype,
    check_precision_name,
    ingredient_names,
    make_blocks,
    model_loss,
    out_dtype,
)
from .fit_loop import finish_state, grad_scaler, held_out_epoch, progress_bar, ready_model
from .keep_best import KeepBest, held_out_loss, warn_few_steps
from .mehl_offload import Spill, check_readable_per_tensor
from .mehl_round import OUT_OF_CORE, RESIDENT, MehlRound
from .registry import SoupContext, SoupMethod, register

AUTO = "auto"
DIRECTIONS = (AUTO, RESIDENT, OUT_OF_CORE)


@dataclass
class MehlConfig:
    # ``metadata``: the CLI's flag for the field (help text, aliases, how its default reads;
    # ``cli: False`` keeps it off the command line), see upcycle.cli.soup.
    model_batch: int = field(default=18, metadata={
        "help": "MEHL: ingredients loaded per round (K)", "aliases": ("-K",),
        "default_help": "min({default}, the number of ingredients)"})
    """K: ingredients loaded and trained per round (reference: 18 for 72 CLIP ViT-B/32)."""
    blockwise: bool = True
    """One coefficient per ingredient and parameter tensor (MEHL-Soup+); False: per model."""
    epochs: int = field(default=5, metadata={"help": "epochs over held-out (per MEHL round)"})
    """E: passes over the held-out batches in each round (reference: 5)."""
    models_epochs: int = field(default=1,
                               metadata={"help": "MEHL: passes over all ingredients"})
    """Outer passes over all ingredients (reference: 1)."""
    lr: float = field(default=0.01, metadata={"help": "coefficient learning rate"})
    """AdamW learning rate on the coefficients (reference: 0.01)."""
    weight_decay: float = field(default=0.0, metadata={"cli": False})
    warmup_ratio: float = field(default=0.2, metadata={"cli": False})
    """Linear warm-up fraction of each round's steps before the cosine decay."""
    grad_clip: float | None = field(default=None, metadata={
        "help": "MEHL: clip the weight-gradient norm (reference: 1.0 for ViTs)"})
    """Clip the weight-gradient norm to this (the reference uses 1.0 for ViTs)."""
    seed: int = 0
    """Seeds the ingredient order and the order of held-out batches."""
    init: str = field(default=INIT_DEFAULT, metadata={"metavar": "MERGE"})
    """The start of the fit (its anchor): a fixed-weight merge of all ingredients, with that
    merge's settings (as :attr:`LearnedConfig.init`)."""
    merge_configs: dict | None = field(default=None, metadata={"cli": False})
    """The ``init`` merge's config by name (None: made from its defaults; the job fills it
    from the command's settings, :func:`upcycle.soup.anchor.resolve_merge_configs`)."""
    directions: str = field(default=AUTO, metadata={
        "help": "MEHL: where the K directions live: resident (built once per round, on the "
                "device: K model copies, fastest on a GPU), out-of-core (none kept: every step "
                "re-reads each tensor's K slices from the ingredients' files, and the anchor "
                "is a file: memory = the model + activations, whatever K), or auto (CPU: "
                "out-of-core once the anchor and K directions pass 1 GiB or half the "
                "available memory; GPU: resident where they fit in its free memory)",
        "choices": DIRECTIONS})
    """Where the K directions live: ``resident``, ``out-of-core`` or ``auto`` (see the module
    docstring)."""
    compact_directions: bool = field(default=False, metadata={
        "help": "MEHL: keep the K directions in the ingredients' dtype (half the memory for "
                "bf16/fp16 checkpoints); coefficients stay fp32"})
    """Keep the K directions in the ingredients' dtype (half the memory for bf16/fp16
    checkpoints) instead of fp32; X, its optimizer and the soup's accumulation stay fp32. The
    coefficients C then reproduce the soup up to that dtype's rounding of theta_i - c."""
    shard_directions: bool = field(default=False, metadata={
        "help": "MEHL under torchrun with W processes: each keeps K/W of the round's "
                "directions (for K larger than one device holds); per step the combined "
                "weights and the weight gradient are all-reduced. Needs K >= W"})
    """Under torch.distributed with W ranks: each rank keeps only its K/W directions of the
    round (contiguous rows). Per step the combined weights and the weight gradient are
    all-reduced (2 x D numbers) and each rank folds the gradient into its own directions'
    coefficients; the K x L coefficient gradient is then all-reduced so every rank steps the
    same X. The soup is the unsharded one up to summation order. Needs K >= W."""
    progress: bool = False

    def settings(self) -> dict:
        """What the soup depends on (for resume fingerprints): everything but ``progress`` and
        ``directions`` (where the directions live: a run may resume with another choice)."""
        return {k: v for k, v in asdict(self).items() if k not in ("progress", "directions")}


def _check(ingredients: Sequence[Ingredient], held_out: Sequence[dict], config: MehlConfig) -> None:
    n = len(ingredients)
    if n < 2:
        raise UpcycleError(f"MEHL-Soup needs at least 2 ingredients, got {n}")
    if not 1 <= config.model_batch <= n:
        raise UpcycleError(f"model_batch (K) must be between 1 and the number of ingredients "
                           f"({n}), got {config.model_batch}")
    if config.epochs < 1 or config.models_epochs < 1:
        raise UpcycleError(f"epochs and models_epochs must be >= 1, got {config.epochs} and "
                           f"{config.models_epochs}")
    if not held_out:
        raise UpcycleError("the held-out set is empty: MEHL-Soup needs data to fit on")
    check_shard_directions(config.shard_directions, config.model_batch)
    check_directions(config)


def check_directions(config: MehlConfig) -> None:
    if config.directions not in DIRECTIONS:
        raise UpcycleError(f"directions must be one of {', '.join(DIRECTIONS)}, got "
                           f"{config.directions!r}")
    if config.directions == OUT_OF_CORE and config.compact_directions:
        raise UpcycleError("--compact-directions stores the directions, --directions "
                           "out-of-core stores none: use one of them")


CPU_RESIDENT_UP_TO = 1 << 30
"""On the CPU, ``auto`` keeps the anchor and K directions resident up to this many bytes and
goes out of core above it. Out of core reads every slice again at each step: for a model
of BERT-base's size and up that costs 1.09x the resident time per held-out epoch on an idle
CPU (K = 2, 1.3 GB of directions), for a tiny model the per-tensor reads dominate (several
times the resident time) while its directions cost nothing to keep."""


def resolve_directions(config: MehlConfig, device: torch.device, ingredients,
                       names: Sequence[str]) -> str:
    """``config.directions`` with ``auto`` decided. On the CPU: out of core when the anchor
    and K fp32 directions take more than :data:`CPU_RESIDENT_UP_TO` (about as fast there,
    and flat in K) or more than half the memory the OS reports available, else resident. On
    CUDA: resident (the fastest: no host reads) when they fit in 90% of the free memory,
    else out of core. Resident with ``compact_directions`` or when an ingredient is a legacy
    pickle (held whole anyway)."""
    if config.directions != AUTO:
        return config.directions
    if config.compact_directions or any(getattr(i, "whole_files", []) for i in ingredients):
        return RESIDENT  # asked to store them, or an ingredient is in memory anyway (a pickle)
    numel = sum(math.prod(ingredients[0].shape(name)) for name in names)
    k = config.model_batch
    if config.shard_directions:
        k = math.ceil(k / distributed.world_size())
    need = 4 * numel * (k + 1)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return RESIDENT if need <= 0.9 * free else OUT_OF_CORE
    if device.type == "cpu":
        fits = min(CPU_RESIDENT_UP_TO, 0.5 * available_memory())
        return RESIDENT if need <= fits else OUT_OF_CORE
    return RESIDENT


def available_memory() -> float:
    """Bytes of memory the OS reports available (Linux: MemAvailable, which counts the page
    cache it can drop; elsewhere the free pages; inf where it does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return math.inf


def check_shard_directions(shard: bool, model_batch: int | None) -> None:
    """``shard_directions`` needs torch.distributed (torchrun) and at least one direction per
    rank (K >= W; not checked while K is None, i.e. not resolved yet)."""
    if not shard:
        return
    if not distributed.is_distributed():
        raise UpcycleError("--shard-directions splits the K directions across the processes of "
                           "a torchrun launch (WORLD_SIZE > 1); this is a single process: launch "
                           "with torchrun --nproc_per_node W, or drop --shard-directions")
    world = distributed.world_size()
    if model_batch is not None and model_batch < world:
        raise UpcycleError(f"--shard-directions needs --model-batch (K) >= the number of "
                           f"processes (W = {world}) so every rank holds a direction, got "
                           f"K = {model_batch}")


@torch.no_grad()
def _start(ingredients, params, names, device, config: MehlConfig,
           base: TensorSource | None, spill: Spill | None) -> tuple[Mapping, SoupResult]:
    """The first anchor: the ``init`` merge of all ingredients (fp32, flat per parameter, on
    ``device``; a file of ``spill`` out of core) and the merge's result (for its
    coefficients). The merge hands each tensor over as it is made: out of core it goes
    straight into the anchor's file, so the merge never holds a model."""
    wanted = set(names)
    context = SoupContext(base=base)
    if spill is None:
        anchor: dict[str, torch.Tensor] = {}

        def keep(name: str, t: torch.Tensor) -> None:
            if name in wanted:
                anchor[name] = t.reshape(-1).to(device, torch.float32, copy=True)

        return anchor, run_merge(config.init, ingredients, context, config, sink=keep)
    anchor = spill.anchor()
    with anchor.replacing() as put:
        merged = run_merge(config.init, ingredients, context, config,
                           sink=lambda name, t: put(name, t) if name in wanted else None)
    return anchor, merged


def _anchor_of(params, names, tensors, spill: Spill | None) -> Mapping:
    """The anchor made of ``tensors`` ((name, flat fp32) pairs): a dict, or out of core a
    file in ``spill``'s folder."""
    if spill is None:
        return dict(tensors)
    anchor = spill.anchor()
    anchor.replace(tensors)
    return anchor


@torch.no_grad()
def _load_anchor(params: dict[str, torch.Tensor], names, anchor) -> None:
    for name in names:
        params[name].copy_(anchor[name].view_as(params[name]))


def mehl_soup(
    ingredients: Sequence[Ingredient],
    model: nn.Module,
    held_out: Sequence[dict],
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = model_loss,
    config: MehlConfig | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    dtype: torch.dtype | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    base: TensorSource | None = None,
) -> SoupResult:
    """Fit a MEHL-Soup(+) of ``ingredients`` for ``model`` on ``held_out`` batches.

    ``held_out`` holds global batches (dicts with ``labels``, on any device); under
    torch.distributed each rank uses its slice of every batch (:func:`local_share`: its share
    of the loss targets). ``eval_fn(model)`` (optional) is called at the start and after each
    round on the current soup, its metrics are kept in the history and its ``loss`` decides
    which state is kept (else the held-out mean of ``loss_fn``).

    ``device``: where to run (None: where ``model`` is; else the model is moved there).
    ``precision``: "bf16"/"fp16" autocast for the forward/backward (fp16 with loss scaling).
    ``dtype``: the soup's dtype (None: the ingredients'). ``checkpoint_dir``: write a
    checkpoint after every round there; ``resume``: continue from it (it must match these
    ingredients, method, settings and held-out data). ``callback(record)`` runs after each
    round's checkpoint with the round's history record. ``base``: the base model, for an
    ``init`` merge that reads it (task arithmetic, TIES, DARE, Model Stock).
    """
    config = config or MehlConfig()
    check_precision_name(precision)
    _check(ingredients, held_out, config)
    check_merges(config, len(ingredients), has_base=base is not None)
    if resume and checkpoint_dir is None:
        raise UpcycleError("resume=True needs checkpoint_dir (where the checkpoint is)")
    method = "mehl+" if config.blockwise else "mehl"
    names, others, device, params = ready_model(model, ingredients, device)
    fingerprint = None
    saved = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        fingerprint = _fingerprint(ingredients, held_out, method, config, precision,
                                   params[names[0]].dtype)
        if resume:
            saved = ckpt.load_checkpoint(checkpoint_dir)
            ckpt.check_fingerprint(saved.state["fingerprint"], fingerprint,
                                   ckpt.checkpoint_path(checkpoint_dir))
    block_names, block_of = make_blocks(names, config.blockwise)
    n, n_blocks, k = len(ingredients), len(block_names), config.model_batch
    gen = torch.Generator().manual_seed(config.seed)
    rounds_per_pass = math.ceil(n / k)
    total_rounds = config.models_epochs * rounds_per_pass
    steps_per_round = config.epochs * len(held_out)
    warn_few_steps(method, steps_per_round, config.epochs, len(held_out), config.lr)

    def measure() -> dict:  # the held-out metrics of the model's current weights
        if eval_fn is not None:
            return dict(eval_fn(model))
        return {"loss": held_out_loss(model, held_out, loss_fn, device, precision)}

    store = resolve_directions(config, device, ingredients, names)
    if store == OUT_OF_CORE:
        check_readable_per_tensor(ingredients)
    # Out of core the anchor and keep-best's snapshots are files in a scratch folder.
    host = torch.device("cpu") if store == OUT_OF_CORE else device
    # (beside the checkpoint folder, which exists only once a round is saved: usually beside
    # the output, so on its disk; else in the system's temporary folder)
    spill = Spill(None if checkpoint_dir is None else Path(checkpoint_dir).parent,
                  {name: params[name].numel() for name in names}) \
        if store == OUT_OF_CORE else None
    try:
        # The start: the init merge; row 0 of ``coefficients`` is its weight a, rows 1..N the
        # ingredients' C (composed with the merge's own coefficients at the end).
        anchor, merged = _start(ingredients, params, names, host, config, base, spill)
        coefficients = torch.zeros(n + 1, n_blocks, dtype=torch.float64)
        coefficients[0] = 1.0
        _load_anchor(params, names, anchor)

        def snapshot() -> tuple[dict, torch.Tensor]:
            if spill is not None:
                return spill.keep(anchor), coefficients.clone()
            return ({name: t.detach().cpu().clone() for name, t in anchor.items()},
                    coefficients.clone())

        best = KeepBest(method, config.init, measure(), snapshot)
        if saved is not None:
            coefficients = saved.coefficients.to(torch.float64)
            start_state = best.best_state
            anchor.clear()
            anchor = _anchor_of(params, names, ((name, saved.anchor[name].to(host))
                                                for name in names), spill)
            gen.set_state(saved.rng_state)
            history = list(saved.state["history"])
            next_pass, next_round = saved.state["next_pass"], saved.state["next_round"]
            order = saved.state["order"]
            kept = saved.state["keep_best"]
            if kept["kept"] != "start":
                stored = saved.extra["best"]  # read a tensor at a time
                start_state = ({name: stored[name] for name in names} if spill is None
                               else spill.keep(stored), saved.extra["best_coefficients"])
            best.restore(kept, start_state)
            del saved
        else:
            history = []
            next_pass, next_round, order = 0, 0, None
        for name in names:
            params[name].requires_grad_(True)
        done = len(history)
        bar = progress_bar(total_rounds * steps_per_round, "MEHL soup", config.progress,
                           initial=done * steps_per_round)
        fit = dict(model=model, loss_fn=loss_fn, device=device, precision=precision,
                   scaler=grad_scaler(device, precision), bar=bar,
                   loss_sum=torch.zeros((), dtype=accumulator_dtype(device), device=device))
        offset = history[-1]["seconds"] if history else 0.0
        start = time.perf_counter()
        for outer in range(next_pass, config.models_epochs):
            if outer != next_pass or next_round == 0:
                order = torch.randperm(n, generator=gen).tolist()
            for r in range(next_round if outer == next_pass else 0, rounds_per_pass):
                members = order[r * k:(r + 1) * k]
                rnd = MehlRound(names, block_of, n_blocks, params, anchor, members,
                                ingredients, config.grad_clip, config.compact_directions,
                                config.shard_directions, store)
                optimizer = torch.optim.AdamW([rnd.x], lr=config.lr, weight_decay=config.weight_decay)
                scheduler = cosine_with_warmup(optimizer, int(config.warmup_ratio * steps_per_round),
                                               steps_per_round)

                def gradient(loss_scale: float, rnd: MehlRound = rnd) -> None:
                    # dL/dX still carries the loss scale: the scaler unscales it, checks it for
                    # inf/NaN and skips the step (lowering the scale) if needed.
                    rnd.x.grad, _ = rnd.take_grad(loss_scale)

                steps = 0
                try:
                    for _ in range(config.epochs):
                        steps = held_out_epoch(held_out, gen, optimizer=optimizer,
                                               scheduler=scheduler, prepare=rnd.apply,
                                               gradient=gradient, **fit)
                    rnd.apply()
                    rnd.move_anchor()
                finally:
                    rnd.close()
                # Book-keeping: theta = (1 - sum_i X_i/n_i) c + sum_i (X_i/n_i) theta_i.
                ratio = rnd.x.detach().cpu().double() * rnd.inv_norms.cpu().double()  # (K, L)
                coefficients *= 1 - ratio.sum(dim=0, keepdim=True)
                coefficients[[1 + i for i in members]] += ratio
                skipped = int((~rnd.valid).sum())
                rows = rnd.hi - rnd.lo  # this rank's directions: stored, or read as needed
                resident = 0 if rnd.out_of_core else rows
                del rnd, optimizer, gradient
                record = {"pass": outer + 1, "round": r + 1, "ingredients": [i + 1 for i in members],
                          "held_out_loss_train": float(fit["loss_sum"]) / max(1, steps),
                          "skipped_blocks": skipped, "direction_rows": rows,
                          "resident_directions": resident,
                          "seconds": offset + time.perf_counter() - start}
                metrics = measure()
                record.update({f"held_out_{key}": v for key, v in metrics.items()})
                history.append(record)
                best.offer(f"round {len(history)}", metrics, snapshot)
                if checkpoint_dir is not None and distributed.is_main():
                    nxt = (outer, r + 1) if r + 1 < rounds_per_pass else (outer + 1, 0)
                    extra = {} if not best.improved else {
                        "best": best.best_state[0], "best_coefficients": best.best_state[1]}
                    path = ckpt.save_checkpoint(
                        checkpoint_dir, anchor, coefficients, gen.get_state(),
                        {"fingerprint": fingerprint, "next_pass": nxt[0], "next_round": nxt[1],
                         "order": order, "history": history, "rounds_done": len(history),
                         "rounds_total": total_rounds, "keep_best": best.summary()}, extra)
                    record = {**record, "checkpoint": str(path)}
                if callback is not None:
                    callback({**record, "rounds_done": len(history), "rounds_total": total_rounds})
        bar.close()
        kept_anchor, kept_coefficients = best.best_state
        anchor.clear()  # the kept state is a snapshot (a file, out of core): free the anchor
        ref = ingredients[0]
        state = {name: kept_anchor[name].view(ref.shape(name)).to(out_dtype(ref, name, dtype)).cpu()
                 for name in names}
        state = finish_state(state, ingredients, others, model, dtype)
        c, rows, blocks = compose_coefficients(merged, kept_coefficients[0], kept_coefficients[1:],
                                               block_names, names, block_of,
                                               ingredient_names(ingredients))
        return SoupResult(method, state, rows, c, blocks, history,
                          info={"model_batch": k, "rounds": len(history), "init": config.init,
                                "keep_best": best.finish(),
                                "device": str(device), "precision": precision,
                                "directions": store,
                                "compact_directions": config.compact_directions})
    finally:
        if spill is not None:
            spill.close()


def _fingerprint(ingredients: Sequence[Ingredient], held_out: Sequence[dict], method: str,
                 config: MehlConfig, precision: str | None, model_dtype: torch.dtype) -> dict:
    """What a checkpoint must match to be resumed: the ingredients, the held-out batches, the
    method and its settings (with the precision and the model's dtype)."""
    settings = {**config.settings(), "precision": precision, "model_dtype": str(model_dtype)}
    return ckpt.fingerprint(ingredients, held_out, method, settings)


def _check_resume(ingredients: Sequence[Ingredient], context: SoupContext,
                  config: MehlConfig) -> dict:
    """Before any work: the checkpoint in ``context.checkpoint_dir`` exists and was made from
    these ingredients, this method, these settings and this held-out data (raises saying
    which differs). Returns the checkpoint's state (rounds done, history...)."""
    saved = ckpt.load_checkpoint(context.checkpoint_dir)
    method = "mehl+" if config.blockwise else "mehl"
    model_dtype = next(p for _, p in context.model.named_parameters()).dtype
    current = _fingerprint(ingredients, context.held_out, method, config, context.precision,
                           model_dtype)
    ckpt.check_fingerprint(saved.state["fingerprint"], current,
                           ckpt.checkpoint_path(context.checkpoint_dir))
    return saved.state


def _check_settings(config: MehlConfig, n: int) -> None:
    """K against the number of ingredients (and the processes, with ``shard_directions``),
    before any work."""
    if config.model_batch < 1:
        raise UpcycleError(f"--model-batch must be >= 1, got {config.model_batch}")
    check_shard_directions(config.shard_directions, config.model_batch)
    check_directions(config)
    if config.model_batch > n:
        raise UpcycleError(f"--model-batch {config.model_batch} exceeds the number of "
                           f"ingredients ({n})")


def _run(ingredients: Sequence[Ingredient], context: SoupContext,
         config: MehlConfig) -> SoupResult:
    return mehl_soup(ingredients, context.model, context.held_out,
                     loss_fn=context.loss_fn or model_loss,
                     config=replace(config, progress=context.progress), eval_fn=context.eval_fn,
                     device=context.device, precision=context.precision, dtype=context.dtype,
                     checkpoint_dir=context.checkpoint_dir, resume=context.resume,
                     callback=context.callback, base=context.base)


_FLAT = "(memory flat in the number of ingredients)"
for _name, _blockwise, _title, _note in (
    ("mehl", False, "MEHL-Soup", "one mixing coefficient per ingredient, learned on the "
     f"held-out split a few ingredients at a time {_FLAT}"),
    ("mehl+", True, "MEHL-Soup+", "one mixing coefficient per ingredient and parameter tensor, "
     f"learned on the held-out split a few ingredients at a time {_FLAT}"),
):
    register(SoupMethod(_name, _run, _title, _note, config_class=MehlConfig,
                        preset={"blockwise": _blockwise}, needs_data=True, min_ingredients=2,
                        defaults=lambda n: {"model_batch": min(MehlConfig.model_batch, n)},
                        check=_check_settings, check_resume=_check_resume))
