"""Greedy soup (Wortsman et al. 2022): add ingredients best-first while held-out improves.

Candidates (``--candidates``): what greedy sorts and adds, by default every ingredient; a
fixed-weight merge of all ingredients (``ties``, ``task-arithmetic``... with its own settings,
:mod:`upcycle.soup.anchor`) is one more candidate, scored and averaged like an ingredient, so
``--candidates ingredients ties task-arithmetic`` lets greedy compare the merges with the
ingredients and with averages of both, and ``--candidates uniform ties model-stock`` picks
among merges only (each merge is held in memory as one model while greedy runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io.checkpoints import Ingredient
from ..io.source import SourceReads
from .anchor import INGREDIENTS, check_merges, merge_names, run_merge
from .common import SoupResult, ingredient_names, out_dtype
from .registry import SoupContext, SoupMethod, register


@dataclass
class GreedyConfig:
    candidates: list[str] | None = field(default=None, metadata={"metavar": "C"})
    """greedy: what it sorts by held-out score and adds while the average improves:
    "ingredients" (each one) and/or fixed-weight merges of all of them (uniform, linear,
    task-arithmetic, ties, dare-linear, dare-ties, slerp, model-stock, with their settings);
    space- or comma-separated (default: ingredients)"""
    merge_configs: dict | None = field(default=None, metadata={"cli": False})
    """Each merge candidate's config by name (None: its defaults)."""

    def __post_init__(self):
        self.candidates = [c.strip() for item in self.candidates or [INGREDIENTS]
                           for c in item.split(",") if c.strip()]


class MergedSource(SourceReads):
    """A merge's state as a candidate (in memory; the TensorSource protocol)."""

    def __init__(self, result: SoupResult, like: Ingredient, index: int):
        self.state, self.index, self.hf_dir = result.state, index, like.hf_dir
        self.path = Path(f"<{result.method} merge>")

    @property
    def label(self) -> str:
        return f"the {self.path.name[1:-1]}"

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].clone()

ScoreFn = Callable[[dict[str, torch.Tensor]], float]


def _mean_state(sums: dict[str, torch.Tensor], count: int, ref: Ingredient,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: (v / count).to(out_dtype(ref, k, dtype)) if v.is_floating_point() else v
            for k, v in sums.items()}


def greedy_soup(ingredients: Sequence[Ingredient], score: ScoreFn, *, progress: bool = False,
                ingredient_scores: Sequence[float] | None = None,
                dtype: torch.dtype | None = None) -> SoupResult:
    """Greedy soup with a user-supplied held-out ``score(state_dict) -> float`` (higher is better).

    1. Score every ingredient; sort descending. 2. Start from the best. 3. For each next
    ingredient, the candidate is the uniform average of the accepted set plus it; accept
    only if its score is strictly greater than the best so far. Each ingredient is
    considered once. Memory: two states, the soup so far (an fp32 running sum) and one
    candidate; ingredients are read from disk one tensor at a time (an accepted one twice).
    ``ingredient_scores`` (optional) are step 1's scores when the caller already has them.
    ``dtype``: the soup's dtype (None: the ingredients'). The states are CPU tensors; ``score``
    puts them where it evaluates (the soup job loads them into its model on its device).
    """
    n = len(ingredients)
    bar = tqdm(total=2 * n - 1, desc="greedy soup", disable=not progress, leave=False)
    if ingredient_scores is not None:
        scores = [float(s) for s in ingredient_scores]
        bar.update(n)
    else:
        scores = []
        for ing in ingredients:
            scores.append(float(score(ing.state_dict())))
            bar.update(1)
    order = sorted(range(n), key=lambda i: -scores[i])
    ref = ingredients[0]
    best = order[0]
    # Two states: the soup so far (as an fp32 running sum) and one candidate (in the soup's
    # dtype). The candidate is formed tensor by tensor from the sum and the ingredient read
    # from disk; when it is accepted, the ingredient is streamed from disk again into the sum.
    sums = {}
    for k in ref.keys():
        t = ingredients[best].get(k)
        sums[k] = t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()
    accepted = [best]
    best_score = scores[best]
    steps = [{"ingredient": best, "score": best_score, "accepted": True}]
    for i in order[1:]:
        ing = ingredients[i]
        count = len(accepted) + 1
        candidate = {}
        for k, v in sums.items():
            if v.is_floating_point():
                mean = torch.add(v, ing.get(k).to(torch.float32)).div_(count)
                candidate[k] = mean.to(out_dtype(ref, k, None))
                del mean
            else:
                candidate[k] = v
        s = float(score(candidate))
        del candidate
        ok = s > best_score
        steps.append({"ingredient": i, "score": s, "accepted": ok})
        if ok:
            for k, v in sums.items():
                if v.is_floating_point():
                    v += ing.get(k).to(torch.float32)
            best_score = s
            accepted.append(i)
        bar.update(1)
    bar.close()
    coefficients = torch.zeros(n, 1, dtype=torch.float64)
    coefficients[accepted, 0] = 1.0 / len(accepted)
    return SoupResult(
        "greedy", _mean_state(sums, len(accepted), ref, dtype), ingredient_names(ingredients),
        coefficients, ["<model>"],
        info={"ingredient_scores": scores, "order": order, "accepted": sorted(accepted),
              "best_score": best_score, "steps": steps},
    )


def _run(ingredients: Sequence[Ingredient], context: SoupContext,
         config: GreedyConfig | None) -> SoupResult:
    config = config or GreedyConfig()
    merges = merge_names(config)
    if not merges:
        return greedy_soup(ingredients, context.score_fn, progress=context.progress,
                           ingredient_scores=context.ingredient_scores, dtype=context.dtype)
    check_merges(config, len(ingredients), has_base=context.base is not None)
    use_ingredients = INGREDIENTS in config.candidates
    sources = list(ingredients) if use_ingredients else []
    scores = list(context.ingredient_scores) if use_ingredients and \
        context.ingredient_scores is not None else None
    for name in merges:
        sources.append(MergedSource(run_merge(name, ingredients, context, config),
                                    ingredients[0], len(sources) + 1))
        if scores is not None:
            scores.append(context.score_fn(sources[-1].state))
    result = greedy_soup(sources, context.score_fn, progress=context.progress,
                         ingredient_scores=scores, dtype=context.dtype)
    result.info["candidates"] = [str(s.path) for s in sources]
    result.info["coefficient_rows"] = "the candidates: ingredients, then merges"
    return result


register(SoupMethod("greedy", _run, "Greedy soup",
                    "candidates (the ingredients, and any merges asked for) added in order of "
                    "held-out score, each kept only if the held-out score of the average "
                    "improves", config_class=GreedyConfig, needs_data=True,
                    check=lambda config, n: check_merges(config, n)))
