"""Greedy soup (Wortsman et al. 2022): add ingredients best-first while held-out improves."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..io.checkpoints import Ingredient
from .common import SoupResult, ingredient_names, out_dtype
from .registry import SoupContext, SoupMethod, register

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


def _run(ingredients: Sequence[Ingredient], context: SoupContext, config: None) -> SoupResult:
    return greedy_soup(ingredients, context.score_fn, progress=context.progress,
                       ingredient_scores=context.ingredient_scores, dtype=context.dtype)


register(SoupMethod("greedy", _run, "Greedy soup",
                    "ingredients added in order of held-out accuracy, each kept only if the "
                    "held-out accuracy of the average does not drop", needs_data=True))
