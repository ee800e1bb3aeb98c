"""Model cards: the ``README.md`` written beside a soup's weights.

:func:`soup_card` says how the soup was made (method, ingredients, the command), what it
learned (a summary of its coefficients C) and how it scored (held-out and test metrics,
beside the other rows of the same run, e.g. the best single ingredient).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .registry import SOUP_METHODS


def method_title(method: str) -> str:
    """The registered title of ``method`` (e.g. "MEHL-Soup+"), else the name itself."""
    entry = SOUP_METHODS.get(method)
    return entry.title if entry is not None else method


def method_note(method: str) -> str:
    """The registered one-line note on how ``method`` makes a soup, else the name itself."""
    entry = SOUP_METHODS.get(method)
    return entry.note if entry is not None else method


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _num(value, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def _how(result) -> list[str]:
    """What the soup is in terms of its ingredients: a weighted sum with the coefficients C,
    or (TIES, DARE, SLERP: not linear in the ingredients) the settings it was made with."""
    settings = ", ".join(f"{k} = {v}" for k, v in result.info.items())
    if result.coefficients is not None:
        return ["Every weight tensor is a weighted sum of the ingredients' tensors, "
                "soup[l] = sum_i C[i, l] * ingredient_i[l], with the coefficients C of the table "
                "below (also in `coefficients.safetensors`, and the full record in `soup.json`)"
                + (f"; its settings: {settings}." if settings else ".")]
    return ["It is not a weighted sum of the ingredients (sign election, random masks or "
            "angles), so it has no coefficients; it was made with " + (settings or "no settings")
            + " (also in `soup.json`)."]


def _ppl(value) -> str:
    return _num(value, ".3f")


METRIC_COLUMNS = {
    "classification": [("held-out acc", "held_out_accuracy", _pct),
                       ("held-out loss", "held_out_loss", _num),
                       ("test acc", "test_accuracy", _pct), ("test loss", "test_loss", _num)],
    "causal-lm": [("held-out loss", "held_out_loss", _num),
                  ("held-out ppl", "held_out_perplexity", _ppl),
                  ("test loss", "test_loss", _num), ("test ppl", "test_perplexity", _ppl)],
}
"""The card's metric columns for each kind of task: (header, row key, format)."""
AUTO_CLASS = {"classification": "AutoModelForSequenceClassification",
              "causal-lm": "AutoModelForCausalLM"}
PIPELINE_TAG = {"classification": "text-classification", "causal-lm": "text-generation"}


def _task(task: str | None, rows: Sequence[dict]) -> str:
    """The kind of task: as given, else a causal LM when a row has a perplexity."""
    if task is not None:
        return task
    return "causal-lm" if any("held_out_perplexity" in r for r in rows) else "classification"


def _front_matter(method: str, task: str, models: Sequence[str]) -> list[str]:
    """The card's YAML metadata: the library that loads it, the pipeline, what it was merged
    from (``base_model``, relation ``merge``) and its tags."""
    lines = ["---", "library_name: transformers", f"pipeline_tag: {PIPELINE_TAG[task]}"]
    if models:
        lines += ["base_model:", *[f"- {json.dumps(str(m))}" for m in models],
                  "base_model_relation: merge"]
    return [*lines, "tags:", "- model-soup", "- upcycle", f"- {method}", "---"]


def soup_card(result, rows: Sequence[dict], command: str, *,
              names: Sequence[str] | None = None, task: str | None = None,
              base_model: str | None = None) -> str:
    """The model card (Markdown) of ``result`` (a :class:`upcycle.soup.SoupResult`).

    ``rows``: report rows of the run (``method``, ``held_out_accuracy``, ``held_out_loss``,
    ``test_accuracy``, ``test_loss``, ``held_out_perplexity``...); the row whose ``method``
    is the soup's is its own, the others are shown beside it. ``command``: the command line
    that made the soup. ``names``: short names of the ingredients (default: their paths).
    ``task``: "classification" or "causal-lm" (None: a causal LM when the rows have a
    perplexity): the metric columns and the class that loads it. ``base_model``: the model
    the ingredients were fine-tuned from, when known (``--base``); the card's ``base_model``
    metadata lists it, else the ingredients.
    """
    method = result.method
    title = method_title(method)
    task = _task(task, rows)
    paths = list(result.ingredients)
    names = list(names) if names is not None else paths
    names = [f"{n} (base)" if p == base_model else n for n, p in zip(names, paths)]
    fine_tunes = sum(p != base_model for p in paths)
    c = result.coefficients
    lines = [
        *_front_matter(method, task, [base_model] if base_model else paths),
        "",
        f"# {title} of {fine_tunes} fine-tune{'s' if fine_tunes != 1 else ''}",
        "",
        f"Made with upcycle `{method}`: {method_note(method)}.",
        *_how(result),
        "",
        "Made by:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Ingredients and coefficients",
        "",
    ]
    if c is not None:
        c = c.float()
        lines += [f"C has {c.shape[0]} rows (ingredients) x {c.shape[1]} column(s) "
                  f"({'one per parameter tensor' if c.shape[1] > 1 else 'one for the whole model'})"
                  f"; values from {float(c.min()):.3f} to {float(c.max()):.3f}.", ""]
        lines += ["| # | ingredient | mean C | min C | max C |", "|---|---|---|---|---|"]
        for i, name in enumerate(names):
            row = c[i]
            lines.append(f"| {i + 1} | {name} | {float(row.mean()):.3f} | {float(row.min()):.3f} "
                         f"| {float(row.max()):.3f} |")
    else:
        lines += ["| # | ingredient |", "|---|---|"]
        lines += [f"| {i + 1} | {name} |" for i, name in enumerate(names)]
    if names != paths:
        lines += ["", "Ingredient paths: " + ", ".join(f"`{p}`" for p in paths) + "."]
    own = [r for r in rows if r.get("method") == method]
    others = [r for r in rows if r.get("method") != method]
    columns = METRIC_COLUMNS[task]
    if own or others:
        lines += ["", "## Metrics", "", "| | " + " | ".join(h for h, _, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for r in own + others:
            label = f"**{title} (this model)**" if r in own else str(r.get("method"))
            lines.append(f"| {label} | " + " | ".join(fmt(r.get(key)) for _, key, fmt in columns)
                         + " |")
        lines += ["", "The soup's coefficients were fitted (or chosen) on the held-out split "
                      "only; the test split was used for nothing but these figures."]
        if task == "causal-lm":
            lines += ["Loss: the mean next-token cross-entropy (nats) over the split's tokens; "
                      "ppl = exp(loss)."]
    auto = AUTO_CLASS[task]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        f'model = {auto}.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)
