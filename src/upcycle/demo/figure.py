"""Figures of a soup run (matplotlib, optional: ``pip install "upcycle[demo]"``).

matplotlib is imported inside the functions, so ``import upcycle.demo.figure`` costs nothing and
works without it; :func:`have_matplotlib` says whether a figure can be drawn.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence

import torch

from ..io.writing import atomic_file


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def block_groups(blocks: Sequence[str]) -> list[tuple[int, str]]:
    """(first column, label) of each run of blocks in the same layer: "embeddings",
    "layer 0", ..., "pooler", "classifier" for a BERT; used as the heat-map's x ticks."""
    groups: list[tuple[int, str]] = []
    for j, name in enumerate(blocks):
        m = re.search(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.", name)
        if m:
            label = f"layer {m.group(1)}"
        else:
            parts = [p for p in name.split(".") if p not in ("bert", "model", "roberta",
                                                              "transformer", "encoder")]
            label = parts[0] if parts else name
        if not groups or groups[-1][1] != label:
            groups.append((j, label))
    return groups


def results_figure(path: str | os.PathLike, rows: Sequence[dict], *, best_method: str,
                   coefficients: torch.Tensor | None = None,
                   ingredient_names: Sequence[str] = (), blocks: Sequence[str] = (),
                   coefficients_title: str = "learned coefficients C",
                   title: str | None = None) -> None:
    """Save a PNG: test accuracy per row of ``rows`` (``method``, ``test_accuracy``) as bars,
    the row named ``best_method`` (the best single ingredient) marked and its level drawn
    across; beside it, ``coefficients`` (ingredients x blocks) as a heat-map."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    has_c = coefficients is not None
    fig = Figure(figsize=(13 if has_c else 6.5, 4.2))
    axes = fig.subplots(1, 2 if has_c else 1, squeeze=False,
                        gridspec_kw={"width_ratios": [1, 1.6]} if has_c else None)
    ax = axes[0][0]
    shown = [r for r in rows if r.get("test_accuracy") is not None]
    labels = [str(r["method"]) for r in shown]
    values = [100 * r["test_accuracy"] for r in shown]
    colors = ["#9e9e9e" if r["method"] == best_method else "#3b75af" for r in shown]
    bars = ax.barh(range(len(shown)), values, color=colors)
    for bar, r in zip(bars, shown):
        if r["method"] == best_method:
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    best = next((100 * r["test_accuracy"] for r in shown if r["method"] == best_method), None)
    if best is not None:
        ax.axvline(best, color="#d62728", linestyle="--", linewidth=1)
        ax.text(best, -0.45, "best single fine-tune ", color="#d62728", fontsize=7,
                ha="right", va="top", rotation=90)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_yticks(range(len(shown)), labels, fontsize=9)
    ax.set_ylim(len(shown) - 0.5, -0.5)  # first row on top
    low = min(values, default=0.0)
    ax.set_xlim(max(0.0, low - 10), min(100.0, max(values, default=100.0) + 4))
    ax.set_xlabel("test accuracy (%)")
    ax.set_title("test accuracy per method", fontsize=10)
    if has_c:
        ax = axes[0][1]
        c = coefficients.detach().float().cpu()
        # colours centred on 0 and clipped at the 98th percentile of |C|: a few blocks with
        # large opposite coefficients (ingredients almost equal there) would wash out the rest
        limit = float(torch.quantile(c.abs().flatten(), 0.98)) or 1.0
        clipped = bool((c.abs() > limit).any())
        image = ax.imshow(c.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                          interpolation="nearest")
        ax.set_yticks(range(c.shape[0]), list(ingredient_names) or range(1, c.shape[0] + 1),
                      fontsize=8)
        groups = block_groups(blocks) if len(blocks) == c.shape[1] else []
        if groups:
            ax.set_xticks([j for j, _ in groups], [label for _, label in groups], fontsize=7,
                          rotation=90)
        ax.set_xlabel(f"blocks ({c.shape[1]} parameter tensors)")
        ax.set_ylabel("ingredient")
        ax.set_title(coefficients_title, fontsize=10)
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02,
                           extend="both" if clipped else "neither")
        if clipped:
            bar.set_label(f"clipped at ±{limit:.2g} (C from {float(c.min()):.3g} to "
                          f"{float(c.max()):.3g})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
