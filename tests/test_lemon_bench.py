"""benchmarks/lemon_savings.py: masking, batches, file naming, the report over seeds, and the
CPU protocol's quick mode end to end (every contender, in process)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("lemon_savings")


def test_masking_is_bert_80_10_10(bench):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(200, 500))
    inputs, labels = bench.mask_tokens(ids, np.random.default_rng(1), mask_id=4, vocab=1000,
                                       n_special=5)
    selected = labels != -100
    assert abs(selected.mean() - 0.15) < 0.005
    assert np.array_equal(labels[selected], ids[selected])
    assert np.array_equal(inputs[~selected], ids[~selected])  # unselected: untouched
    masked = inputs[selected] == 4
    kept = inputs[selected] == ids[selected]
    swapped = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(kept.mean() - 0.1) < 0.01  # (a random token equal to the original counts here)
    assert abs(swapped.mean() - 0.1) < 0.01
    assert inputs[selected][swapped].min() >= 5  # random tokens are never special


def test_masking_selects_at_least_one(bench):
    ids = np.full((1, 2), 7)
    for seed in range(20):
        _, labels = bench.mask_tokens(ids, np.random.default_rng(seed), mask_id=4, vocab=10,
                                      n_special=5)
        assert (labels != -100).sum() >= 1


def test_batches_depend_only_on_seed_and_index(bench):
    data = {"mask_id": 4, "vocab": 50, "n_special": 5}
    stream = np.random.default_rng(0).integers(5, 50, size=5000)
    st = {"context": 16, "batch": 4}
    a = bench.Batches(data, stream, 10, st, seed=3, mlm=True)
    b = bench.Batches(data, stream, 10, st, seed=3, mlm=True)
    c = bench.Batches(data, stream, 10, st, seed=4, mlm=True)
    assert a[7]["input_ids"].shape == (4, 16)
    assert all((a[7][k] == b[7][k]).all() for k in ("input_ids", "labels"))
    assert not (a[7]["input_ids"] == c[7]["input_ids"]).all()
    lm = bench.Batches(data, stream, 10, st, seed=3, mlm=False)[0]
    assert (lm["labels"][:, 0] == -100).all()
    assert (lm["labels"][:, 1:] == lm["input_ids"][:, 1:]).all()


def test_run_tags_keep_runs_apart(bench):
    st = bench.settings("bert", False)
    assert bench.run_tag("bert", 2, False, 0.5, st) == "bert-seed2"
    cpu = bench.settings("bert", False, size="cpu")
    assert bench.run_tag("bert", 2, False, None, cpu, "cpu") == "bert-seed2-cpu"
    assert bench.run_tag("gpt2", 1, True, 0.7, bench.settings("gpt2", True, size="cpu"),
                         "cpu") == "gpt2-seed1-cpu-quick"
    assert bench.RUN_FILE.search("lemon_savings-bert-seed2-cpu.json")
    assert bench.run_tag("gpt2", 0, True, 0.5, bench.settings("gpt2", True)) == \
        "gpt2-seed0-quick"
    reduced = bench.settings("bert", False, scratch_steps=400, small_steps=300)
    assert bench.run_tag("bert", 0, False, 0.65, reduced) == "bert-seed0-budget0.65-S400-small300"
    assert bench.RUN_FILE.search("lemon_savings-bert-seed2.json")
    assert not bench.RUN_FILE.search("lemon_savings-bert-seed0-S400.json")
    assert not bench.RUN_FILE.search("lemon_savings-seed1.json")  # the old single-family files


METHODS = (("lemon", "LEMON"), ("net2net", "Net2Net"), ("aki", "bert2BERT-AKI"),
           ("stack", "G_stack"))


def _rows(small, scratch, savings, step0=1e-7):
    rows = [{"name": "small (2L/64H)", "role": "small", "final_loss": small, "steps": 100},
            {"name": "scratch (4L/128H)", "role": "scratch", "final_loss": scratch,
             "steps": 100}]
    for (method, label), saving in zip(METHODS, savings):
        rows.append({"name": f"{label} grown", "role": "grown", "method": method,
                     "final_loss": scratch, "saving_pct": saving, "steps": 50,
                     "steps_to_target": None if saving is None else round(100 - saving),
                     "init_loss": small, "step0_minus_small": step0})
    return rows


def test_report_means_and_target(bench, tmp_path):
    for seed, savings in ((0, [55.0, 40.0, None, 20.0]), (1, [60.0, 45.0, 30.0, 30.0])):
        (tmp_path / f"lemon_savings-gpt2-seed{seed}.json").write_text(
            json.dumps({"rows": _rows(2.0, 1.8, savings)}))
    for seed, savings in ((0, [35.0, 20.0, 10.0, 5.0]), (1, [25.0, 20.0, 10.0, 5.0])):
        (tmp_path / f"lemon_savings-bert-seed{seed}.json").write_text(
            json.dumps({"rows": _rows(5.0, 4.5, savings)}))
    (tmp_path / "lemon_savings-bert-seed3-quick.json").write_text(
        json.dumps({"rows": _rows(5.0, 4.5, [99.0, 99.0, 99.0, 99.0])}))
    (tmp_path / "lemon_savings-bert-seed0-cpu.json").write_text(
        json.dumps({"rows": _rows(5.0, 4.5, [1.0, 1.0, 1.0, 1.0])}))
    found = bench.collect(tmp_path, quick=False)
    assert sorted(found) == ["bert", "gpt2"] and sorted(found["bert"]) == [0, 1]
    text, summary = bench.summarize(found)
    gpt2, bert = summary["gpt2"], summary["bert"]
    assert gpt2["mean_LEMON"] == pytest.approx(57.5)
    assert gpt2["std_LEMON"] == pytest.approx(2.5) and gpt2["mean_G_stack"] == pytest.approx(25)
    assert "57.5 ± 2.5%" in text and "(worst seed that reached: 25.0%)" in text
    assert gpt2["mean_bert2BERT-AKI"] is None  # one seed did not reach the target
    assert "did not reach" in text and "(1/2 seeds reached)" in text
    assert gpt2["target_met_every_seed"] is True
    assert bert["mean_LEMON"] == pytest.approx(30.0)
    assert bert["target_met_every_seed"] is False  # seed 1 has 25% < 30%
    assert bert["capacity_ok_every_seed"] is True
    assert bench.collect(tmp_path, quick=True)["bert"][3][2]["saving_pct"] == 99.0
    assert list(bench.collect(tmp_path, quick=False, size="cpu")["bert"]) == [0]


def test_report_flags_a_small_model_below_the_target(bench, tmp_path):
    (tmp_path / "lemon_savings-gpt2-seed0.json").write_text(
        json.dumps({"rows": _rows(1.7, 1.8, [100.0, 100.0, 100.0, 100.0])}))
    text, summary = bench.summarize(bench.collect(tmp_path, quick=False))
    assert summary["gpt2"]["capacity_ok_every_seed"] is False
    assert "Protocol warning" in text


def test_report_says_by_how_much_a_seed_missed(bench, tmp_path):
    rows = _rows(2.0, 1.8, [None, None, 10.0, None])
    rows[2]["final_loss"] = 1.85  # LEMON ended 0.05 above scratch's final loss
    (tmp_path / "lemon_savings-gpt2-seed1.json").write_text(json.dumps({"rows": rows}))
    text, summary = bench.summarize(bench.collect(tmp_path, quick=False))
    assert summary["gpt2"]["target_met_every_seed"] is False
    assert "not reached on seed 1: LEMON's final loss 1.8500 vs scratch's 1.8000, +0.0500" in text


def test_steps_to(bench):
    curve = [(0, 3.0), (50, 2.5), (100, 2.0), (150, 1.9)]
    assert bench.steps_to(curve, 2.0) == 100
    assert bench.steps_to(curve, 1.0) is None


def test_cpu_protocol_quick_end_to_end(bench, tmp_path, monkeypatch):
    """Every contender of ``--size cpu --quick`` (GPT-2), in process: the lossless check,
    G_stack's repeated layers, the cache, the per-family table."""
    monkeypatch.setattr(bench, "CACHE_ROOT", tmp_path)
    args = argparse.Namespace(family="gpt2", seed=0, device="cpu", quick=True, budget=None,
                              scratch_steps=20, small_steps=30, size="cpu")
    specs = bench.contenders(args)
    assert [s.get("method") for s in specs] == [None, None, "lemon", "net2net", "aki", "stack"]
    assert specs[0]["name"] == "small (2L/48H)" and specs[1]["name"] == "scratch (4L/64H)"
    bert = bench.contenders(argparse.Namespace(**{**vars(args), "family": "bert"}))
    assert bert[0]["name"] == "small (2L/32H)"  # post-LN: 32 -> 64, a multiple of its width
    assert bert[0]["dims"]["small"]["hidden"] == 32 and specs[0]["dims"]["small"]["hidden"] == 48
    rows = [{**spec, **bench.run_worker(spec)} for spec in specs]
    by = {r.get("method", r["role"]): r for r in rows}
    assert by["small"]["steps"] == 30 and by["scratch"]["params"] == by["stack"]["params"]
    for method in ("lemon", "net2net"):
        assert abs(by[method]["step0_minus_small"]) < 1e-5  # lossless
        assert by[method]["steps"] == 14  # 0.7 x S
    assert by["stack"]["max_abs_diff_vs_small"] > 1e-3  # G_stack is lossy
    assert all("curve" in r and r["target"] == by["scratch"]["final_loss"]
               for r in rows if r["role"] == "grown")
    again = bench.run_worker(specs[2])
    assert again["cached"] and again["init_loss"] == by["lemon"]["init_loss"]
    text, summary = bench.summarize({"gpt2": {0: rows}})
    assert "G_stack grown (LEMON width)" in text and "small (2L/48H)" in text
    assert set(summary["gpt2"]["seeds"][0]) >= {"LEMON", "G_stack", "small_steps"}
