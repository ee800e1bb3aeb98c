"""upcycle's uniform/linear and task-arithmetic soups against mergekit's, on the same inputs.

    PYTHONPATH=/path/to/mergekit:src .venv/bin/python benchmarks/merge_speed.py [--n 12]

Inputs: N synthetic fine-tunes of a Llama-shaped model (LlamaConfig, hidden 1024, 2 layers,
MLP 2816, vocabulary 4096, untied head: 34M parameters, ~130 MiB in fp32): a random base and
N ingredients base + 0.01 * noise, each an HF folder (config.json + model.safetensors, no
tokenizer). They are made once, in a subprocess, and cached under ``--cache`` (synthetic
weights: this measures speed and memory, not quality; see merge_quality.py for that).

Every run is a fresh process of the command a user types, with the same environment:
``python -m upcycle.cli.main soup ...`` and mergekit's ``mergekit-yaml CONFIG OUT
--no-copy-tokenizer`` (its python entry ``-m mergekit.scripts.run_yaml``), fp32 out, same
thread count. Measured from outside the process: wall time (start to exit), time to its first
line of output (stdout and stderr together, into a pipe as into a log: a progress bar's first
``\\r`` counts; with ``--terminal`` on a pseudo-terminal, where the first byte shown counts)
and the CPU time it had used by then (/proc: what the first line costs on an idle machine, less I/O), and
its peak RSS (``ru_maxrss`` from ``os.wait4``: the process's own high-water mark; this driver
imports neither torch nor upcycle, so what Linux carries across ``exec`` is the driver's small
RSS, shown as ``driver RSS``). Where mergekit is not importable it says so and runs upcycle only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MAKE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
root, n = Path(sys.argv[1]), int(sys.argv[2])
cfg = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
                  max_position_embeddings=512, tie_word_embeddings=False,
                  architectures=["LlamaForCausalLM"])
with torch.device("meta"):
    shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
g = torch.Generator().manual_seed(0)
base = {k: (torch.ones(s) if k.endswith("norm.weight") else 0.02 * torch.randn(s, generator=g))
        for k, s in shapes.items()}
def save(folder, state):
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
save(root / "base", base)
for i in range(n):
    save(root / f"ft{i:02d}", {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                for k, v in base.items()})
(root / "done.json").write_text(json.dumps({"n": n}))
"""


def make_inputs(cache: Path, n: int) -> tuple[Path, list[Path]]:
    """The base and N ingredient folders (made once, in a subprocess, so that this driver stays
    small)."""
    done = cache / "done.json"
    if not (done.is_file() and json.loads(done.read_text()).get("n", 0) >= n):
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", MAKE, str(cache), str(n)], check=True)
    return cache / "base", [cache / f"ft{i:02d}" for i in range(n)]


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) the process has used so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def measure(cmd: list[str], env: dict, terminal: bool = False) -> dict:
    """Run ``cmd`` in a fresh process: wall time, time to its first line of output, peak RSS.
    ``terminal``: its output goes to a pseudo-terminal (120 columns), as a user at a terminal
    sees it, and the first byte shown counts as its first line; else to a pipe (a log), where
    a line counts once ended by ``\n`` or a progress bar's ``\r``."""
    start = time.perf_counter()
    if terminal:
        import fcntl
        import pty
        import struct
        import termios

        fd, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        proc = subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child, env=env)
        os.close(child)
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        fd = proc.stdout.fileno()
    first, first_cpu, tail = None, None, b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pseudo-terminal whose process has exited
            chunk = b""
        if not chunk:
            break
        if first is None and (terminal or b"\n" in chunk or b"\r" in chunk):
            first = time.perf_counter() - start
            first_cpu = _cpu_seconds(proc.pid)
        tail = (tail + chunk)[-4000:]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if terminal:
        os.close(fd)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"wall_s": wall, "first_line_s": first, "first_line_cpu_s": first_cpu,
           "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}
    if proc.returncode != 0:
        row["error"] = f"exit {proc.returncode}: {tail.decode(errors='replace')[-1500:]}"
    return row


def commands(tool: str, method: str, base: Path, ings: list[Path], out: Path,
             weights: list[float], lam: float) -> list[str]:
    """The command line of one run (mergekit: its YAML is written beside ``out``)."""
    py = sys.executable
    if tool == "upcycle":
        cmd = [py, "-m", "upcycle.cli.main", "soup", *map(str, ings), "--out", str(out),
               "--overwrite", "--dtype", "float32"]
        if method == "linear":
            cmd += ["--method", "linear", "--weights", *map(str, weights)]
        elif method == "task-arithmetic":
            cmd += ["--method", "task-arithmetic", "--base", str(base), "--lambda", str(lam)]
        return cmd
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(ings, weights)]
    if method == "uniform":
        config = {"merge_method": "linear", "models": [
            {"model": str(p), "parameters": {"weight": 1.0}} for p in ings]}
    elif method == "linear":
        config = {"merge_method": "linear", "models": models}
    else:
        config = {"merge_method": "task_arithmetic", "base_model": str(base),
                  "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in ings],
                  "parameters": {"lambda": lam}}
    config["dtype"] = "float32"
    yml = out.parent / f"{out.name}.yml"
    yml.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return [py, "-m", "mergekit.scripts.run_yaml", str(yml), str(out), "--no-copy-tokenizer"]


def _cell(row: dict, key: str, fmt: str) -> str:
    return "–" if row.get(key) is None else format(row[key], fmt)


def table(rows: list[dict]) -> str:
    lines = ["| method | tool | wall (s) | first line (s) | CPU to first line (s) | "
             "peak RSS (MiB) | CPU (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['tool']} | {_cell(r, 'wall_s', '.2f')} | "
                     f"{_cell(r, 'first_line_s', '.2f')} | {_cell(r, 'first_line_cpu_s', '.2f')} "
                     f"| {_cell(r, 'peak_rss_mb', '.0f')} | {_cell(r, 'cpu_s', '.1f')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12, help="ingredients")
    parser.add_argument("--methods", default="uniform,linear,task-arithmetic")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each (the table shows the median)")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.5)
    parser.add_argument("--terminal", action="store_true",
                        help="run each command on a pseudo-terminal (as at a terminal) instead "
                             "of a pipe (as into a log)")
    parser.add_argument("--cache", default=os.path.join(
        os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" / "upcycle"), "merge_speed"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" /
                                             "merge_speed.json"))
    args = parser.parse_args()
    base, ings = make_inputs(Path(args.cache), args.n)
    ings = ings[: args.n]
    weights = [1.0 + 0.1 * i for i in range(args.n)]
    tools = ["upcycle"]
    if importlib.util.find_spec("mergekit") is None:
        print("mergekit is not importable (put it on PYTHONPATH): running upcycle only",
              file=sys.stderr)
    else:
        tools.append("mergekit")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = Path(args.cache) / "out"
    work.mkdir(exist_ok=True)
    load = os.getloadavg()
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = []
    for method in args.methods.split(","):
        for tool in tools:
            runs = []
            for _ in range(args.repeats):
                out = work / f"{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                runs.append(measure(commands(tool, method, base, ings, out, weights, args.lam),
                                    env, terminal=args.terminal))
                print(f"[speed] {method} / {tool}: {json.dumps(runs[-1])}", file=sys.stderr,
                      flush=True)
            ok = [r for r in runs if "error" not in r]
            row = {"method": method, "tool": tool, "runs": runs}
            if ok:
                for key in ("wall_s", "first_line_s", "first_line_cpu_s", "peak_rss_mb",
                            "cpu_s"):
                    values = [r[key] for r in ok if r[key] is not None]
                    row[key] = statistics.median(values) if values else None
            rows.append(row)
    text = table(rows)
    print(text)
    print(f"\n{args.n} ingredients, {args.repeats} runs each (median), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at start "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, at end "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}, driver RSS {driver:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "table": text, "argv": sys.argv,
                                          "load_start": load, "load_end": os.getloadavg(),
                                          "driver_rss_mb": driver}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
