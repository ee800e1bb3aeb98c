"""Issue 19, inputs are never destroyed and no litter: ``--out`` may not be an input, a config
file never replaces a folder, one run at a time on an ``--out``, temporary folders removed on
every exit path (and swept when a killed run left them), write errors are one line."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_sentiment_jsonl

from upcycle.cli.main import main
from upcycle.errors import UpcycleError
from upcycle.io import writing
from upcycle.io.outputs import check_not_input, lock_path, output_lock
from upcycle.io.writing import atomic_dir, atomic_file, sweep_stale

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film", "was"]




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT classifier (``base``), two perturbed copies in ``runs/`` (soup
    ingredients), train / held-out JSONL files and a tiny GPT-2 (to grow)."""
    T = transformers
    root = tmp_path_factory.mktemp("safety")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = T.BertTokenizerFast(vocab_file=str(vocab))
    cfg = T.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                       num_labels=2)
    torch.manual_seed(0)
    folders = []
    for name in ["base", "runs/run0", "runs/run1"]:
        model = T.BertForSequenceClassification(cfg)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders.append(root / name)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4,
                                          n_positions=32))
    gpt2.save_pretrained(root / "gpt2")
    return {"root": root, "base": folders[0], "runs": folders[1:], "gpt2": root / "gpt2",
            "train": write_sentiment_jsonl(root / "train.jsonl", 24, 0),
            "held_out": write_sentiment_jsonl(root / "held_out.jsonl", 8, 1)}


def _digest(folder: Path) -> dict:
    """Every file under ``folder`` (or the file) -> its sha256: to show an input is intact."""
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and ": note:" not in line]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _litter(folder: Path) -> list[str]:
    """Temporary folders and lock files of upcycle (not pytest's own ``.lock`` in its base
    folder, which a serial run's tmp_path.parent holds)."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name
                  or (p.name.endswith(".lock") and p.name != ".lock"))


def _soup(tiny, out, *extra):
    return ["soup", *map(str, tiny["runs"]), "--method", "uniform", "--quiet", "--out", str(out),
            *extra]


# -- --out is never an input ------------------------------------------------------------------

@pytest.mark.parametrize("which,relation", [("ingredient", "is ingredient"),
                                            ("folder", "holds ingredient"),
                                            ("inside", "lies inside ingredient")])
def test_soup_out_on_an_ingredient_is_refused_and_it_is_intact(tiny, capsys, which, relation):
    out = {"ingredient": tiny["runs"][0], "folder": tiny["runs"][0].parent,
           "inside": tiny["runs"][0] / "soup"}[which]
    before = _digest(tiny["root"])
    assert main(_soup(tiny, out, "--overwrite")) == 2
    line = _one_error(capsys)
    assert line.startswith("upcycle soup: error: --out ") and relation in line
    assert str(tiny["runs"][0]) in line
    assert _digest(tiny["root"]) == before
    assert not _litter(tiny["runs"][0].parent) and not _litter(tiny["runs"][0])


@pytest.mark.parametrize("flag", ["--held-out", "--base"])
def test_soup_out_on_data_or_base_is_refused(tiny, capsys, flag):
    target = tiny["held_out"] if flag == "--held-out" else tiny["base"]
    before = _digest(target)
    argv = _soup(tiny, target, "--overwrite", flag, str(target))
    assert main(argv) == 2
    assert f"is {flag} {target}" in _one_error(capsys)
    assert _digest(target) == before


def test_tune_out_inside_or_on_its_inputs_is_refused(tiny, capsys):
    model = tiny["base"]
    before = _digest(tiny["root"])
    for out, relation in [(model / "tuned", f"lies inside --model {model}"),
                          (model, f"is --model {model}"),
                          (tiny["train"], f"is --data {tiny['train']}"),
                          (tiny["root"], f"holds --model {model}")]:
        assert main(["tune", "--method", "snell", "--model", str(model), "--data",
                     str(tiny["train"]), "--out", str(out), "--overwrite", "--quiet"]) == 2
        assert relation in _one_error(capsys)
    assert _digest(tiny["root"]) == before


def test_grow_out_inside_or_on_its_model_is_refused(tiny, capsys):
    model = tiny["gpt2"]
    before = _digest(model)
    for out, relation in [(model, "is --model"), (model / "big", "lies inside --model")]:
        assert main(["grow", "--model", str(model), "--hidden-size", "64", "--out", str(out),
                     "--overwrite"]) == 2
        assert relation in _one_error(capsys)
    assert _digest(model) == before
    assert not (model / "big").exists() and not _litter(model.parent)


def test_check_not_input_sees_through_symlinks_and_checkpoint_folders(tmp_path):
    real = tmp_path / "models" / "a"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UpcycleError, match="is --model"):
        check_not_input(tmp_path / "link", [("--model", real)])
    with pytest.raises(UpcycleError, match="checkpoint folder .* holds --model"):
        check_not_input(tmp_path / "out", [("--model", tmp_path / "out.checkpoints" / "m")],
                        [("checkpoint folder", tmp_path / "out.checkpoints")])
    check_not_input(tmp_path / "models" / "b", [("--model", real)])  # a sibling is fine
    check_not_input(tmp_path / "a", [("--model", real)])


def test_out_dot_is_refused_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert main(_soup(tiny, ".", "--overwrite")) == 2
    assert "is the current folder" in _one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert not _litter(tmp_path.parent)
    assert main(_soup(tiny, tmp_path.parent, "--overwrite")) == 2  # a folder holding it
    assert "holds it" in _one_error(capsys)


# -- a config file never replaces a folder ----------------------------------------------------

def test_config_with_overwrite_true_does_not_delete_a_folder(tiny, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    config = tmp_path / "soup.yaml"
    config.write_text(f"ingredients: [{tiny['runs'][0]}, {tiny['runs'][1]}]\nmethod: uniform\n"
                      f"quiet: true\nout: {precious}\noverwrite: true\n")
    with pytest.raises(SystemExit) as exit_:
        main(["soup", "--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "overwrite: true in" in err and "is ignored" in err
    assert f"out {precious} already exists" in err
    # --overwrite typed does not make the file's out replaceable either
    with pytest.raises(SystemExit):
        main(["soup", "--config", str(config), "--overwrite"])
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "soup.yaml"]


def test_replayed_report_with_overwrite_true_does_not_replace(tiny, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_soup(tiny, first)) == 0
    assert main(_soup(tiny, first, "--overwrite")) == 0  # typed: replaces
    report = first / "report.json"
    assert json.loads(report.read_text())["config"]["overwrite"] is True
    other = tmp_path / "other"
    assert main(_soup(tiny, other)) == 0
    before = _digest(other)
    capsys.readouterr()
    assert main(["soup", "--config", str(report), "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is ignored" in err and "already holds a model" in err
    assert _digest(other) == before
    with pytest.raises(SystemExit):  # the report's own out, which exists
        main(["soup", "--config", str(report)])
    assert (first / "model.safetensors").is_file()


# -- one run at a time ------------------------------------------------------------------------

def test_a_second_run_on_a_locked_out_is_refused_at_once(tiny, tmp_path, capsys):
    out = tmp_path / "soup"
    with output_lock(out) as lock:
        assert lock == lock_path(out) and lock.is_file()
        assert main(_soup(tiny, out)) == 2
        line = _one_error(capsys)
        assert "is being written by another upcycle run" in line and f"(pid {os.getpid()})" in line
        assert main(["grow", "--model", str(tiny["gpt2"]), "--hidden-size", "64", "--out",
                     str(out)]) == 2
        assert "another upcycle run" in _one_error(capsys)
        assert not out.exists()
    assert not lock_path(out).exists()
    assert main(_soup(tiny, out)) == 0  # released: the next run goes
    assert not _litter(tmp_path)


def test_lock_from_another_process_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "soup"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from upcycle.io.outputs import output_lock\n"
            "with output_lock(sys.argv[2]):\n    print('held', flush=True); time.sleep(600)")
    src = str(Path(writing.__file__).parents[2])
    holder = subprocess.Popen([sys.executable, "-c", code, src, str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_soup(tiny, out)) == 2
        assert f"(pid {holder.pid})" in _one_error(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert main(_soup(tiny, out)) == 0  # the dead holder's lock is gone with it


def test_out_that_appears_before_the_final_rename_is_kept(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(UpcycleError, match="appeared while this run was writing"):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    single = tmp_path / "w.safetensors"
    with pytest.raises(UpcycleError, match="appeared"):
        with atomic_file(single, overwrite=False) as tmp:
            tmp.write_text("ours")
            single.write_text("theirs")
    assert single.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "w.safetensors"]


# -- no litter --------------------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_temp_folder_is_swept_at_the_next_start(tiny, tmp_path, capsys):
    out = tmp_path / "big"
    host = writing._HOST
    stale = tmp_path / f".big.tmp-{host}-{_dead_pid()}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    stale_old = tmp_path / f".big.old-{host}-{_dead_pid()}-def456"
    stale_old.mkdir()
    live = tmp_path / f".big.tmp-{host}-1-ghi789"  # pid 1 runs: not ours to remove
    live.mkdir()
    other = tmp_path / f".bigger.tmp-{host}-{_dead_pid()}-jkl"  # another output's
    other.mkdir()
    assert main(["grow", "--model", str(tiny["gpt2"]), "--hidden-size", "64",
                 "--out", str(out)]) == 0
    assert not stale.exists() and not stale_old.exists()
    assert live.exists() and other.exists()
    assert sweep_stale(tmp_path / "bigger") == [other]


def test_sigterm_during_the_write_leaves_no_temp_folder(tiny, tmp_path, capsys, monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)
    real = writing.save_file

    def killed(*args, **kwargs):
        real(*args, **kwargs)  # a weight file is half the folder when the signal comes
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the write")

    monkeypatch.setattr(writing, "save_file", killed)
    out = tmp_path / "soup"
    assert main(_soup(tiny, out)) == 143
    assert "upcycle soup: terminated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == previous


def test_disk_full_during_the_final_save_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writing, "save_file", full)
    out = tmp_path / "soup"
    assert main(_soup(tiny, out)) == 2
    line = _one_error(capsys)
    named = str(out) in line or os.path.relpath(out) in line  # paths are shown relative to cwd
    assert "cannot write" in line and named and "no space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_safetensors_io_error_is_one_line(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(writing, "save_file", full)
    with pytest.raises(UpcycleError, match="cannot write .*no space left on device"):
        writing.save_model(tmp_path / "m", {"w": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []


def _read_only(folder: Path, monkeypatch):
    """Make ``folder`` refuse new files: chmod, or where that does not bind (root), a refusal
    of every open under it."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        real = os.open

        def refuse(path, flags, *args, **kwargs):
            if Path(path).parent == folder and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)


def test_read_only_out_parent_is_refused_before_fitting(tiny, tmp_path, capsys, monkeypatch):
    from upcycle.jobs import soup as soup_job

    parent = tmp_path / "ro"
    parent.mkdir()
    fitted = []
    monkeypatch.setattr(soup_job, "prepare_soup_job", lambda *a, **k: fitted.append(1))
    _read_only(parent, monkeypatch)
    try:
        assert main(["soup", *map(str, tiny["runs"]), "--method", "greedy", "--held-out",
                     str(tiny["held_out"]), "--quiet", "--out", str(parent / "soup")]) == 2
        line = _one_error(capsys)
        assert f"cannot write in {parent}" in line and "permission denied" in line
        assert not fitted
        assert main(["grow", "--model", str(tiny["gpt2"]), "--hidden-size", "64", "--out",
                     str(parent / "big")]) == 2
        assert "cannot write in" in _one_error(capsys)
    finally:
        parent.chmod(0o755)
    assert list(parent.iterdir()) == []


def test_failed_run_removes_the_folders_it_made_for_out(tiny, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "soup"
    assert main(["soup", *map(str, tiny["runs"]), "--method", "greedy", "--quiet",
                 "--out", str(out)]) == 2  # greedy needs held-out data: refused
    _one_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_grow_train_runs_beside_out_and_a_killed_run_leaves_no_temp(tiny, tmp_path, capsys,
                                                                   monkeypatch):
    from upcycle.training.trainer import UpcycleTrainer

    T = transformers
    small = tmp_path / "small"
    T.ViTForImageClassification(T.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        image_size=8, patch_size=4, num_channels=1, num_labels=3)).save_pretrained(small)
    rng = np.random.default_rng(0)
    data = tmp_path / "train.npz"
    np.savez(data, images=rng.integers(0, 255, size=(16, 8, 8)).astype(np.uint8),
             labels=rng.integers(0, 3, size=16))
    out = tmp_path / "big"
    argv = ["grow", "--model", str(small), "--hidden-size", "64", "--out", str(out), "--train",
            str(data), "--steps", "3", "--batch-size", "8", "--save-steps", "1",
            "--scratch-lr", "1e-4", "--scratch-warmup", "1", "--device", "cpu", "--quiet"]
    step = UpcycleTrainer.training_step
    seen = {}

    def interrupted(self, *args, **kwargs):
        seen["litter"] = _litter(tmp_path)  # while training: no temporary folder
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(UpcycleTrainer, "training_step", interrupted)
    assert main(argv) == 130
    assert seen["litter"] == [".big.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.checkpoints", "small",
                                                          "train.npz"]
    assert (out.parent / "big.checkpoints" / "grown" / "config.json").is_file()
    monkeypatch.setattr(UpcycleTrainer, "training_step", step)
    assert main([*argv, "--resume"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "small", "train.npz"]
    assert T.ViTForImageClassification.from_pretrained(out).config.hidden_size == 64
