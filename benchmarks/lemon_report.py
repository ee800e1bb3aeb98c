"""The report over seeds of ``lemon_savings.py``: per family, one table with a row per (seed,
contender): steps run, steps to scratch's final held-out loss, the saving, the loss at step 0
(the lossless check) and the small model's own steps; then mean +- std over seeds, and
whether the paper's target is met on every seed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

TARGET_PCT = {"gpt2": 50.0, "bert": 30.0}
"""The paper's saving, which LEMON must reach on every seed."""
METHODS = (("lemon", "LEMON"), ("net2net", "Net2Net"), ("aki", "bert2BERT-AKI"),
           ("stack", "G_stack"))
NAMES = {"gpt2": "GPT-2 character-level LM", "bert": "BERT masked LM (WordPiece)"}

RUN_FILE = re.compile(r"lemon_savings-(gpt2|bert)-seed(\d+)(-cpu)?(-quick)?\.json$")


def collect(results: Path, quick: bool, size: str = "gpu") -> dict[str, dict[int, list[dict]]]:
    """family -> seed -> rows, from the standard per-seed JSON files of ``size`` (not
    budget/step variants)."""
    found: dict[str, dict[int, list[dict]]] = {}
    for path in sorted(results.glob("lemon_savings-*-seed*.json")):
        m = RUN_FILE.search(path.name)
        if not m or bool(m.group(4)) != quick or bool(m.group(3)) != (size == "cpu"):
            continue
        rows = json.loads(path.read_text())["rows"]
        found.setdefault(m.group(1), {})[int(m.group(2))] = rows
    return found


def _num(value, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def _mean_std(values: list) -> tuple[float | None, float | None]:
    if not values or any(v is None for v in values):
        return None, None
    return float(np.mean(values)), float(np.std(values))


def _family_table(family: str, seeds: dict[int, list[dict]]) -> tuple[str, dict]:
    target = TARGET_PCT[family]
    lines = ["| seed | run | steps run | steps to scratch's final loss | saving | "
             "loss at step 0 | step 0 - small's loss | final held-out loss |",
             "|" + "---|" * 8]
    per: dict[str, list] = {label: [] for _, label in METHODS}
    fam: dict = {"target_pct": target, "seeds": {}}
    for seed, rows in sorted(seeds.items()):
        small = next((r for r in rows if r.get("role") == "small"), {})
        scratch = next((r for r in rows if r.get("role") == "scratch"), {})
        cap = ("final_loss" in small and "final_loss" in scratch
               and small["final_loss"] > scratch["final_loss"])
        record = {"capacity_ok": cap, "small_final": small.get("final_loss"),
                  "small_steps": small.get("steps"), "scratch_final": scratch.get("final_loss")}
        for row, role in ((small, "small"), (scratch, "scratch")):
            if row:
                lines.append(f"| {seed} | {row['name']} | {_num(row.get('steps'), 'd')} | "
                             f"{'(target)' if role == 'scratch' else '–'} | "
                             f"{'0%' if role == 'scratch' else 'not counted'} | "
                             f"{_num(row.get('init_loss'))} | – | "
                             f"{_num(row.get('final_loss'))} |")
        by_method = {r.get("method"): r for r in rows if r.get("role") == "grown"}
        for method, label in METHODS:
            row = by_method.get(method)
            if row is None or "final_loss" not in row:
                per[label].append(None)
                record[label] = None
                continue
            saving = row.get("saving_pct")
            per[label].append(saving)
            record[label] = saving
            record[f"{label}_step0_minus_small"] = row.get("step0_minus_small")
            record[f"{label}_final"] = row.get("final_loss")
            reach = row.get("steps_to_target")
            lines.append(f"| {seed} | {row['name']} | {row['steps']} | "
                         f"{'did not reach' if reach is None else reach} | "
                         f"{'–' if saving is None else f'{saving:.1f}%'} | "
                         f"{_num(row.get('init_loss'))} | "
                         f"{_num(row.get('step0_minus_small'), '+.1e')} | "
                         f"{_num(row.get('final_loss'))} |")
        fam["seeds"][seed] = record
    means = []
    for _, label in METHODS:
        mean, std = _mean_std(per[label])
        fam[f"mean_{label}"], fam[f"std_{label}"] = mean, std
        reached = sum(v is not None for v in per[label])
        means.append(f"{label} {mean:.1f} ± {std:.1f}%" if mean is not None else
                     f"{label} – ({reached}/{len(per[label])} seeds reached)")
    lemon = per["LEMON"]
    met = bool(lemon) and all(v is not None and v >= target for v in lemon)
    caps = all(r["capacity_ok"] for r in fam["seeds"].values())
    fam["target_met_every_seed"], fam["capacity_ok_every_seed"] = met, caps
    worst = min((v for v in lemon if v is not None), default=None)
    verdict = (f"Saving, mean ± std over {len(seeds)} seed(s): " + "; ".join(means) + ".\n\n"
               f"Target (LEMON saving >= {target:.0f}% on every seed): "
               + ("MET" if met else "NOT MET")
               + ("" if met or worst is None else f" (worst seed that reached: {worst:.1f}%)")
               + _misses(fam["seeds"])
               + "." + ("" if caps else " Protocol warning: on some seed the small model's "
                        "final loss is not above the scratch model's."))
    return "\n".join(lines) + f"\n\n{verdict}\n", fam


def _misses(records: dict) -> str:
    """By how much LEMON missed scratch's final loss on the seeds where it did not reach it
    within its budget."""
    gaps = [f"seed {seed}: LEMON's final loss {r['LEMON_final']:.4f} vs scratch's "
            f"{r['scratch_final']:.4f}, {r['LEMON_final'] - r['scratch_final']:+.4f}"
            for seed, r in sorted(records.items())
            if r.get("LEMON") is None and r.get("LEMON_final") is not None
            and r.get("scratch_final") is not None]
    return f"; not reached on {'; '.join(gaps)}" if gaps else ""


def summarize(found: dict[str, dict[int, list[dict]]]) -> tuple[str, dict]:
    """The report: per family a table (seed x contender), the means and the target. Returns
    (markdown, json-able summary)."""
    parts, summary = [], {}
    for family in ("gpt2", "bert"):
        if found.get(family):
            table, summary[family] = _family_table(family, found[family])
            parts.append(f"## {NAMES[family]}\n\n{table}")
    return "\n".join(parts), summary


def plot(rows: list[dict], family: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    target = None
    for row in rows:
        if "curve" not in row:
            continue
        steps, losses = zip(*row["curve"])
        ax.plot(steps, losses, label=row["name"], ls=":" if row["role"] == "small" else "-")
        target = row.get("target") or target
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1, label="scratch final loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (" + ("nats/char" if family == "gpt2" else
                                       "nats/masked token") + ")")
    ax.set_title(title)
    lows = [min(loss for _, loss in r["curve"]) for r in rows if "curve" in r]
    if lows:
        ax.set_ylim(min(lows) - 0.05, min(lows) + 1.2)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
