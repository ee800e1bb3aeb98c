"""torchrun: a process-group timeout (issue 19, part 8). ``--dist-timeout`` reaches
``init_process_group`` and Trainer's ``ddp_timeout``; a collective that fails because another
rank hung is one error line. No real hang here (a two-rank run with one sleeping rank ends
in about 15 s with ``--dist-timeout 5``: rank 0 prints the line, torchrun stops the other)."""

import datetime

import pytest

import upcycle.cli.grow
from upcycle.cli.main import main
from upcycle.runtime import distributed
from upcycle.training.config import TrainingConfig
from upcycle.training.trainer import training_arguments


def test_dist_timeout_reaches_init_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(distributed, "_destroy_at_exit", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_timeout_s", distributed.DEFAULT_TIMEOUT_S)
    assert distributed.init_from_env("cpu") is True
    assert seen == {"backend": "gloo",
                    "timeout": datetime.timedelta(seconds=distributed.DEFAULT_TIMEOUT_S)}
    distributed.set_timeout(42)
    distributed.init_from_env("cpu")
    assert seen["timeout"] == datetime.timedelta(seconds=42)


@pytest.mark.parametrize("verb", ["soup", "tune", "grow"])
def test_dist_timeout_flag_sets_the_timeout(verb, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distributed, "_timeout_s", distributed.DEFAULT_TIMEOUT_S)
    nowhere = str(tmp_path / "nowhere")
    args = {"soup": ["soup", nowhere], "tune": ["tune", "--method", "snell", "--model", nowhere,
                                                "--data", nowhere + ".jsonl"],
            "grow": ["grow", "--model", nowhere]}[verb]
    assert main([*args, "--out", str(tmp_path / "out"), "--dist-timeout", "42"]) == 2
    assert distributed.timeout_seconds() == 42
    assert main([*args, "--out", str(tmp_path / "out"), "--dist-timeout", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"upcycle {verb}: error: --dist-timeout must be > 0 seconds, got 0.0"


def test_trainer_gets_the_same_timeout(monkeypatch):
    monkeypatch.setattr(distributed, "_timeout_s", 77.0)
    args = training_arguments(TrainingConfig(device="cpu"), output_dir="unused")
    assert args.ddp_timeout == 77


@pytest.mark.parametrize("error", [
    RuntimeError("[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                 "3000ms for recv operation to complete"),
    RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                 "[127.0.0.1]:10671. This is typically caused by a remote worker crashing."),
])
def test_a_hung_rank_is_one_error_line(error, tmp_path, capsys, monkeypatch):
    """What a rank's collective raises when another rank hung past --dist-timeout (gloo's
    messages, as torch 2.x words them) ends the command with one line."""
    def hang(args):
        raise error

    monkeypatch.setattr(distributed, "_timeout_s", distributed.DEFAULT_TIMEOUT_S)
    monkeypatch.setattr(upcycle.cli.grow, "run", hang)
    monkeypatch.setenv("RANK", "1")
    assert main(["grow", "--model", "m", "--out", str(tmp_path / "out"),
                 "--dist-timeout", "30"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("upcycle grow: error: torchrun: rank 1: a collective failed, another "
                          "rank hung or stopped (--dist-timeout 30 s): ")
    assert "third_party" not in err


def test_other_runtime_errors_are_not_hidden(tmp_path, monkeypatch):
    def bug(args):
        raise RuntimeError("a bug, not a hung rank")

    monkeypatch.setattr(upcycle.cli.grow, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["grow", "--model", "m", "--out", str(tmp_path / "out")])
