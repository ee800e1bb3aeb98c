"""Device and precision resolution: what --device/--dtype/--bf16/--fp16 turn into, and the
errors a machine that cannot do it gives."""

import os

import pytest
import torch

from upcycle.errors import UpcycleError
from upcycle.runtime.devices import (
    autocast,
    available_devices,
    check_precision,
    resolve_device,
    resolve_dtype,
)


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == available_devices()[1 if len(available_devices()) > 1 else 0]
    assert resolve_device(None) == auto
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_is_a_clear_error(spec):
    with pytest.raises(UpcycleError, match=r"--device .*CUDA is not available.*use --device cpu"):
        resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range():
    with pytest.raises(UpcycleError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_unknown_device_names_the_choices():
    with pytest.raises(UpcycleError, match="expected one of auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(UpcycleError, match="--model-device 'gpu'"):
        resolve_device("gpu", argument="--model-device")


def test_dtypes():
    assert resolve_dtype(None) is None
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(UpcycleError, match="--dtype 'int8'.*float32, bfloat16, float16"):
        resolve_dtype("int8")


def test_precision_checks():
    cpu = torch.device("cpu")
    assert check_precision(cpu) is None
    assert check_precision(cpu, bf16=True) == "bf16"
    with pytest.raises(UpcycleError, match="--fp16.*GPU"):
        check_precision(cpu, fp16=True)
    with pytest.raises(UpcycleError, match="--bf16 and --fp16"):
        check_precision(cpu, bf16=True, fp16=True)


def test_autocast_bf16_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype is torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert (a @ b).dtype is torch.float32


def test_torchrun_rank_without_a_gpu_is_a_clear_error(monkeypatch):
    """Two processes per node on a one-GPU machine: NCCL needs a GPU per rank, so the second
    rank is told what to do instead of failing inside CUDA."""
    from upcycle.runtime import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(UpcycleError, match=r"local rank 1 needs CUDA device 1.*--device cpu"):
        distributed.init_from_env("cuda")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_torchrun_ranks_destroy_their_process_group_at_exit(tmp_path):
    """A rank that reaches interpreter teardown with gloo's worker threads alive can abort
    ("terminate called without an active exception", seen on CI about 1 run in 15 of a soup
    under torchrun). The group init_from_env opens is destroyed at exit, and destroying it
    really joins gloo's threads: also after the first optimizer has made torch import
    torch.distributed.nn (which, imported late, would keep the group alive for good), and when
    a DDP wrapper that holds the group is left in a reference cycle (as a finished Trainer
    leaves it)."""
    from conftest import torchrun

    # Each rank writes its own file (the ranks share one stdout). The at-exit report is
    # registered before init_from_env registers shutdown, so it runs after it.
    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit, os, sys, threading, torch, torch.distributed as dist\n"
        "from upcycle.runtime import distributed\n"
        "native = lambda: len(os.listdir('/proc/self/task')) - threading.active_count()\n"
        "log = open(os.path.join(sys.argv[1], os.environ['RANK']), 'w')\n"
        "atexit.register(lambda: (log.write(f'at exit: initialized {dist.is_initialized()} '\n"
        "                                   f'native threads {native()}'), log.close()))\n"
        "assert distributed.init_from_env('cpu') and distributed.world_size() == 2\n"
        "torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])  # imports torch._dynamo\n"
        "distributed.all_reduce_sum(torch.ones(2))\n"
        "ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))\n"
        "ddp(torch.ones(1, 2)).sum().backward()\n"
        "cycle = [ddp]; cycle.append(cycle); del ddp, cycle  # as a finished Trainer holds it\n"
        "log.write(f'while up: native threads {native()}; ')\n")
    torchrun([script, tmp_path])
    for rank in "01":
        text = (tmp_path / rank).read_text()
        assert "while up: native threads 0;" not in text, text  # the count sees gloo's threads
        assert text.endswith("at exit: initialized False native threads 0"), text
