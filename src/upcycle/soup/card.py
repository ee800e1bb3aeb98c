"""Model cards: the ``README.md`` written beside a soup's weights.

:func:`soup_card` says how the soup was made (method, ingredients, the command), what it
learned (a summary of its coefficients C) and how it scored (held-out and test metrics,
beside the other rows of the same run, e.g. the best single ingredient).
"""

from __future__ import annotations

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
    if result.coefficients is not None:
        return ["Every weight tensor is a weighted sum of the ingredients' tensors, "
                "soup[l] = sum_i C[i, l] * ingredient_i[l], with the coefficients C of the table "
                "below (also in `coefficients.safetensors`, and the full record in `soup.json`)."]
    settings = ", ".join(f"{k} = {v}" for k, v in result.info.items())
    return ["It is not a weighted sum of the ingredients (sign election, random masks or "
            "angles), so it has no coefficients; it was made with " + (settings or "no settings")
            + " (also in `soup.json`)."]


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
