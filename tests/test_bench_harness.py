"""The benchmark harness (upcycle.jobs.bench.main): a run cut short keeps what it measured."""

import json
import sys

import pytest

from upcycle.jobs import bench


def test_a_run_cut_short_keeps_the_contenders_it_measured(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    specs = [{"name": "a"}, {"name": "b"}, {"name": "c"}]

    def run_contender(script, spec):
        if spec["name"] == "c":
            raise KeyboardInterrupt  # the run is stopped during the third contender
        return {"spec": spec, "seconds": 1.0}

    monkeypatch.setattr(bench, "run_contender", run_contender)
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        bench.main("script.py", specs, lambda spec: {}, [("name", "name", "s")])
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["rows"]] == ["a", "b"]
    assert saved["partial"] == "2 of 3 contenders"
    monkeypatch.setattr(bench, "run_contender", lambda script, spec: {"spec": spec})
    bench.main("script.py", specs, lambda spec: {}, [("name", "name", "s")])
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["rows"]] == ["a", "b", "c"] and "partial" not in saved
