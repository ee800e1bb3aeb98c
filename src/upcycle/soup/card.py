"""Model cards: the ``README.md`` written beside a soup's weights.

:func:`soup_card` says how the soup was made (method, ingredients, the command), what it
learned (a summary of its coefficients C) and how it scored (held-out and test metrics,
beside the other rows of the same run, e.g. the best single ingredient).
"""

from __future__ import annotations

from collections.abc import Sequence

METHOD_TITLES = {
    "uniform": "Uniform soup",
    "greedy": "Greedy soup",
    "learned": "Learned-Soup",
    "learned+": "Learned-Soup+",
    "mehl": "MEHL-Soup",
    "mehl+": "MEHL-Soup+",
}

METHOD_NOTES = {
    "uniform": "the plain average of all ingredients",
    "greedy": "ingredients added in order of held-out accuracy, each kept only if the "
              "held-out accuracy of the average does not drop",
    "learned": "one mixing coefficient per ingredient, learned by gradient descent on the "
               "held-out split",
    "learned+": "one mixing coefficient per ingredient and parameter tensor, learned by "
                "gradient descent on the held-out split (all ingredients in memory)",
    "mehl": "one mixing coefficient per ingredient, learned on the held-out split a few "
            "ingredients at a time (memory flat in the number of ingredients)",
    "mehl+": "one mixing coefficient per ingredient and parameter tensor, learned on the "
             "held-out split a few ingredients at a time (memory flat in the number of "
             "ingredients)",
}


def method_title(method: str) -> str:
    return METHOD_TITLES.get(method, method)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _num(value, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def soup_card(result, rows: Sequence[dict], command: str, *,
              names: Sequence[str] | None = None) -> str:
    """The model card (Markdown) of ``result`` (a :class:`upcycle.soup.SoupResult`).

    ``rows``: report rows of the run (``method``, ``held_out_accuracy``, ``held_out_loss``,
    ``test_accuracy``, ``test_loss``...); the row whose ``method`` is the soup's is its own,
    the others are shown beside it. ``command``: the command line that made the soup.
    ``names``: short names of the ingredients (default: their paths).
    """
    method = result.method
    title = method_title(method)
    paths = list(result.ingredients)
    names = list(names) if names is not None else paths
    c = result.coefficients
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- model-soup",
        "- upcycle",
        f"- {method}",
        "---",
        "",
        f"# {title} of {len(paths)} fine-tunes",
        "",
        f"Made with upcycle `{method}`: {METHOD_NOTES.get(method, method)}.",
        "Every weight tensor is a weighted sum of the ingredients' tensors, "
        "soup[l] = sum_i C[i, l] * ingredient_i[l], with the coefficients C of the table below "
        "(also in `coefficients.safetensors`, and the full record in `soup.json`).",
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
    if own or others:
        lines += ["", "## Metrics", "",
                  "| | held-out acc | held-out loss | test acc | test loss |",
                  "|---|---|---|---|---|"]
        for r in own + others:
            label = f"**{title} (this model)**" if r in own else str(r.get("method"))
            lines.append(f"| {label} | {_pct(r.get('held_out_accuracy'))} | "
                         f"{_num(r.get('held_out_loss'))} | {_pct(r.get('test_accuracy'))} | "
                         f"{_num(r.get('test_loss'))} |")
        lines += ["", "The soup's coefficients were fitted (or chosen) on the held-out split "
                      "only; the test split was used for nothing but these figures."]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)
