"""benchmarks/tune_llm.py: its --quick run (a fresh process per contender, error rows for
contenders that fail), the ratios and targets of its table, the saved-for-backward count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tune_llm.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("tune_llm")


def test_quick_run_prints_one_table_and_writes_json(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "quick.json"
    # two contenders keep it short: LoRA (the reference) and SHERL on a causal LM (a row,
    # whether it trains or fails with an error)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "peft LoRA|SHERL", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| contender |") == 1
    data = json.loads(out.read_text())
    assert data["complete"] and out.with_suffix(".md").is_file()
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"peft LoRA r=8", "SHERL M=1"}
    lora = rows["peft LoRA r=8"]
    assert "error" not in lora, lora.get("error")
    assert lora["peak_rss_mb"] > 0 and lora["saved_mb"] > 0 and lora["s_per_step"] > 0
    assert lora["trainable"] > 0 and lora["tokens_per_step"] == 2 * 32
    sherl = rows["SHERL M=1"]
    assert ("error" in sherl) != ("s_per_step" in sherl)
    assert "random" in data["setting"]


def test_ratios_targets_and_error_rows(bench, tmp_path):
    def row(name, ref, targets, **figures):
        return {"name": name, "ref": ref, "targets": targets, "base": "fp32", **figures}

    rows = [row("L", "L", None, peak_rss_mb=100.0, train_extra_mb=10.0, saved_mb=4.0,
                s_per_step=1.0),
            row("S", "L", [1.05, 1.8], peak_rss_mb=104.0, train_extra_mb=12.0, saved_mb=4.0,
                s_per_step=2.0),
            row("H", "L", [0.6, None], error="exit 1: Traceback ...\n  File x\n"
                                              "upcycle.errors.UpcycleError: no | causal LM\n")]
    args = SimpleNamespace(quick=True, dropout=0.0, warmup=1, steps=1,
                           out=str(tmp_path / "r.json"), md=str(tmp_path / "r.md"))
    text = bench.report(rows, args, done=True)
    by = {r["name"]: r for r in rows}
    assert by["L"]["vs_ref"] == "(reference)"
    assert by["S"]["vs_ref"] == "1.04x / 1.20x / 1.00x / 2.00x"
    assert by["S"]["target"] == "peak <= 1.05x: met; time <= 1.8x: MISSED"
    assert by["S"]["target_met"] is False
    assert by["H"]["error_short"] == "upcycle.errors.UpcycleError: no / causal LM"
    assert by["H"]["target"] == "peak <= 0.6x"
    assert "Failed contenders (error rows): H" in text
    bench.report(rows, args, done=True)  # idempotent: the report is rewritten per contender
    assert by["S"]["target"] == "peak <= 1.05x: met; time <= 1.8x: MISSED"


def test_saved_bytes_counts_activations_not_parameters(bench):
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    with bench.SavedBytes(layer.parameters()) as saved:
        y = torch.tanh(layer(x))  # saves x (input of the matmul) and tanh's output
    y.sum().backward()
    assert saved.total == x.numel() * 4 + y.numel() * 4
