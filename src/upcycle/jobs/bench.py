"""The benchmark harness: every contender in a fresh subprocess, one table, one JSON.

A benchmark script defines ``run_worker(spec: dict) -> dict`` (the measured figures of one
contender) and calls :func:`main` with its list of contender specs. The harness re-runs the
script once per contender as ``python SCRIPT --worker JSON``, so each contender starts from
a clean process: its peak RSS (``ru_maxrss``) is its own, not the previous contender's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..io.writing import write_json
from ..runtime.memory import current_rss_mb, peak_cuda_mb, peak_rss_mb

RESULT_PREFIX = "UPCYCLE_RESULT "


def worker_entry(run_worker: Callable[[dict], dict], spec_json: str) -> None:
    """Run one contender in this (fresh) process and print its result line."""
    spec = json.loads(spec_json)
    baseline = current_rss_mb()
    start = time.perf_counter()
    result = run_worker(spec)
    result.setdefault("wall_s", time.perf_counter() - start)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    result.setdefault("rss_at_start_mb", baseline)
    cuda = peak_cuda_mb()
    if cuda is not None:
        result.setdefault("peak_cuda_mb", cuda)
    print(RESULT_PREFIX + json.dumps({"spec": spec, **result}, default=float), flush=True)


def run_contender(script: str | Path, spec: dict, *, env: dict | None = None,
                  timeout: float | None = None) -> dict:
    """Run ``script --worker SPEC`` in a fresh Python process and return its result dict."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout)[-3000:]
    return {"spec": spec, "error": f"exit {proc.returncode}: {tail}"}


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table. ``columns`` = (key, header, format spec such as '.1f')."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, sep]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append("–")
            elif fmt and isinstance(value, (int, float)):
                cells.append(format(value, fmt))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(
    script: str | Path,
    contenders: Sequence[dict] | Callable[[argparse.Namespace], Sequence[dict]],
    run_worker: Callable[[dict], dict],
    columns: Sequence[tuple[str, str, str]],
    *,
    description: str = "",
    out_json: str | Path | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    summarize: Callable[[list[dict]], str] | None = None,
) -> list[dict]:
    """Parse ``--worker`` / ``--out``, run every contender in its own process, print a table.

    ``contenders`` may be a function of the parsed arguments (to offer ``--quick`` etc.).
    ``--out`` is rewritten after every contender (marked ``partial`` until the last), so a
    run cut short keeps the contenders it measured.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=out_json, help="where to write the JSON results")
    parser.add_argument("--only", default=None, help="run only contenders whose name contains this")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        worker_entry(run_worker, args.worker)
        return []
    specs = list(contenders(args) if callable(contenders) else contenders)
    if args.only:
        specs = [s for s in specs if args.only in s.get("name", "")]
    rows = []
    for spec in specs:
        print(f"[bench] {spec.get('name', spec)} ...", file=sys.stderr, flush=True)
        result = run_contender(script, spec)
        if "error" in result:
            print(f"[bench]   failed: {result['error']}", file=sys.stderr, flush=True)
        row = {**spec, **{k: v for k, v in result.items() if k != "spec"}}
        rows.append(row)
        if args.out and len(rows) < len(specs):  # a run cut short keeps what it measured
            write_json(args.out, {"rows": rows, "partial": f"{len(rows)} of {len(specs)} "
                                                           f"contenders", "argv": sys.argv})
    table = format_table(rows, columns)
    print(table)
    if summarize is not None:
        print()
        print(summarize(rows))
    if args.out:
        write_json(args.out, {"rows": rows, "table": table, "argv": sys.argv})
        print(f"results written to {args.out}", file=sys.stderr)
    return rows
