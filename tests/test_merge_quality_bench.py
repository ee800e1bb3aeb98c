"""benchmarks/merge_quality.py on tiny LMs: every kind of contender runs through the soup job
and the summary gives bootstrap intervals (the BBC setup itself is lm_soup's)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
from lm_models import CORPUS
from test_soup_init import lm_ingredients

from upcycle.errors import UpcycleWarning

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("merge_quality",
                                                  ROOT / "benchmarks" / "merge_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("mq")
    base, folders = lm_ingredients(root)
    files = {}
    for split, lines in (("held_out", CORPUS[:6]), ("test", CORPUS[6:] or CORPUS)):
        files[split] = str(root / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return {"base": str(base), "ingredients": folders, **files}


def test_every_kind_of_contender_and_the_summary(bench, paths, monkeypatch):
    monkeypatch.setattr(bench, "GRIDS", {"ties": {"density": (0.5,), "lambda_": (0.5, 1.0)}})
    common = {"paths": paths, "seq": 16, "batch": 4, "threads": 1}
    specs = [
        {"name": "base", "kind": "base", "method": "base"},
        {"name": "best ingredient", "kind": "best", "method": "best"},
        {"name": "ties", "kind": "merge", "method": "ties"},
        {"name": "slerp", "kind": "merge", "method": "slerp"},
        {"name": "greedy (ingredients + merges)", "kind": "fit", "method": "greedy",
         "settings": {"candidates": ["ingredients", "ties"], "density": 0.5}},
        {"name": "mehl+ (init ties)", "kind": "fit", "method": "mehl+",
         "settings": {"init": "ties", "epochs": 1, "model_batch": 2}},
    ]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpcycleWarning)
        for spec in specs:
            rows.append({**spec, **common, **bench.run_worker({**spec, **common})})
    by = {r["name"]: r for r in rows}
    assert by["ties"]["picked"] in ("density=0.5, lambda=0.5", "density=0.5, lambda=1.0")
    assert len(by["ties"]["grid"]) == 2
    assert by["slerp"]["picked"].count("+") == 1  # the two best ingredients
    assert "keep_best" in by["mehl+ (init ties)"]
    for r in rows:
        assert r["test_ppl"] > 1 and r["held_out_ppl"] > 1
    from lm_soup import summarize

    text = summarize(rows)
    assert "mehl+ (init ties)" in text and all("test_ppl_ci95" in r for r in rows)
