"""Issue 19, parts 1 and 2: outputs hold only model, tokenizer and generation files (no file
reached through a link out of the input folder, no custom code, no notes or training state),
and no code from a model folder ever runs (``auto_map`` refused, ``trust_remote_code=False``)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_decoded, shown

import upcycle
from upcycle.cli.main import main
from upcycle.errors import UpcycleError
from upcycle.io.model_files import MODEL_FILES, check_no_custom_code, model_files
from upcycle.io.writing import copy_model_files
from upcycle.jobs.soup_files import tokenizer_files

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film"]
SECRET = "PRIVATE-KEY-do-not-upload"
LEFT_OUT = {"notes.txt": "not a model, tokenizer or generation file",
            "merges.txt": "a link out of the folder",
            "modeling_custom.py": "custom code",
            "trainer_state.json": "not a model, tokenizer or generation file"}
KEPT = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "vocab.txt"}


@pytest.fixture
def umask_027():
    """Run under umask 027 (so the outputs' 0640 shows the user's umask, not a copied mode)."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _data(path: Path, n: int = 16) -> Path:
    rows = [{"text": f"the film {WORDS[i % 8]}", "label": int(i % 8 < 4)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bert(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=2,
                        max_position_embeddings=32)
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    # transformers 5 writes tokenizer.json and tokenizer_config.json only; a BERT folder from
    # the hub (or from transformers 4) also has these
    os.replace(vocab, folder / "vocab.txt")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
         "sep_token": "[SEP]", "mask_token": "[MASK]"}))
    return folder


def _with_extras(folder: Path, private: Path) -> Path:
    """``folder`` plus what must never reach an output: links to a private file outside it
    (one under a name on the allow-list), custom code, notes and a trainer state; and
    vocab.txt as a link that stays inside the folder (copied as a regular file)."""
    (folder / "notes.txt").symlink_to(private)
    (folder / "merges.txt").symlink_to(private)
    (folder / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    (folder / "trainer_state.json").write_text(json.dumps({"note": SECRET}))
    (folder / "sub").mkdir()
    os.replace(folder / "vocab.txt", folder / "sub" / "vocab-real.txt")
    (folder / "vocab.txt").symlink_to(Path("sub") / "vocab-real.txt")
    return folder


@pytest.fixture
def private(tmp_path):
    secret = tmp_path / "private" / "id_secret"
    secret.parent.mkdir()
    secret.write_text(SECRET + "\n")
    return secret


def _check_output(out: Path, source: Path, mode: int) -> None:
    names = {p.name for p in out.iterdir()}
    assert KEPT <= names, sorted(names)
    assert not names & set(LEFT_OUT), sorted(names)
    for path in out.rglob("*"):
        assert not path.is_symlink(), path
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
            assert not path.name.endswith(".py"), path
    assert (out / "vocab.txt").read_bytes() == (source / "vocab.txt").read_bytes()
    for name in KEPT:
        assert (out / name).stat().st_mode & 0o777 == mode, name


def _one_warning(err: str, source: Path) -> None:
    lines = [line for line in err.splitlines() if "not copied from" in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("upcycle: warning: not copied from ") and source.name in line
    for name, why in LEFT_OUT.items():
        assert f"{name} ({why})" in line, line
    assert "vocab.txt" not in line and "safetensors" not in line and "sub" not in line


# -- deliverable 1: outputs ------------------------------------------------------------------

def test_soup_output_holds_only_model_files(tmp_path, private, umask_027, capsys):
    a = _with_extras(_bert(tmp_path / "a", 0), private)
    b = _bert(tmp_path / "b", 1)
    out = tmp_path / "soup"
    assert main(["soup", "--method", "uniform", str(a), str(b), "--out", str(out),
                 "--quiet"]) == 0
    _one_warning(capsys.readouterr().err, a)
    _check_output(out, a, umask_027)
    transformers.AutoTokenizer.from_pretrained(out)
    transformers.AutoModelForSequenceClassification.from_pretrained(out)


def test_merged_tune_holds_only_model_files(tmp_path, private, umask_027, capsys):
    model = _with_extras(_bert(tmp_path / "base"), private)
    out = tmp_path / "run"
    assert main(["tune", "--method", "snell", "--model", str(model), "--data",
                 str(_data(tmp_path / "train.jsonl")), "--max-steps", "1", "--batch-size", "8",
                 "--r", "2", "--out", str(out), "--merge", "--quiet", "--device", "cpu"]) == 0
    _one_warning(capsys.readouterr().err, model)
    _check_output(out / "merged", model, umask_027)
    transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged")


def test_grown_model_holds_only_model_files(tmp_path, private, umask_027, capsys):
    model = _with_extras(_bert(tmp_path / "small"), private)
    out = tmp_path / "big"
    assert main(["grow", "--model", str(model), "--hidden-size", "64", "--out", str(out)]) == 0
    _one_warning(capsys.readouterr().err, model)
    _check_output(out, model, umask_027)
    assert transformers.BertForSequenceClassification.from_pretrained(out).config.hidden_size \
        == 64


def test_model_files_links_and_odd_entries(tmp_path, private, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").symlink_to(src / "nowhere.json")           # broken
    (src / "vocab.json").symlink_to(private.parent)                      # a folder outside
    (src / "vocab.txt").mkdir()                                          # a folder by the name
    (src / "spiece.model").symlink_to(src / "spiece.model")              # a loop
    (src / "checkpoint-5").mkdir()                                       # sub-folders: silent
    (src / "model.safetensors").write_bytes(b"x")                        # weights: silent
    (src / "training_args.bin").write_bytes(b"x")
    (src / ".env").write_text(SECRET)                                    # hidden: silent
    (src / "train.json").write_text("{}")                       # upcycle's own record: silent
    (src / "README.md").write_text("card")
    assert list(model_files(src)) == ["config.json"]
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("upcycle: warning: not copied from ")
    for part in ("README.md (not a model, tokenizer or generation file)",
                 "tokenizer.json (a broken link)", "vocab.json (a link out of the folder)",
                 "vocab.txt (not a regular file)", "spiece.model (a broken link)"):
        assert part in err, err
    for quiet in ("checkpoint-5", "safetensors", "training_args", ".env", "train.json"):
        assert quiet not in err
    dest = tmp_path / "dest"
    dest.mkdir()
    copy_model_files(src, dest)
    assert [p.name for p in dest.iterdir()] == ["config.json"]
    # a folder whose files are all on the list: no warning at all
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "config.json").write_text("{}")
    (clean / "generation_config.json").write_text("{}")
    capsys.readouterr()
    assert set(model_files(clean)) == {"config.json", "generation_config.json"}
    assert capsys.readouterr().err == ""


def test_hf_cache_snapshot_links_are_followed(tmp_path, private, capsys):
    """The HuggingFace cache links a snapshot's files to its repository's blobs: those are the
    folder's own files; a link out of the repository is not."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "blobs" / "c0ffee").write_text('{"model_type": "bert"}')
    (snap / "config.json").symlink_to(Path("..") / ".." / "blobs" / "c0ffee")
    (snap / "tokenizer.json").symlink_to(private)
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "beef").write_text("{}")
    (snap / "vocab.json").symlink_to(other / "beef")
    dest = tmp_path / "dest"
    dest.mkdir()
    copy_model_files(snap, dest)
    assert [p.name for p in dest.iterdir()] == ["config.json"]
    assert not (dest / "config.json").is_symlink()
    assert json.loads((dest / "config.json").read_text()) == {"model_type": "bert"}
    err = capsys.readouterr().err
    assert "tokenizer.json (a link out of the folder)" in err
    assert "vocab.json (a link out of the folder)" in err


def test_soup_tokenizer_from_another_folder_is_filtered(tmp_path, private, capsys):
    """A causal LM soup whose tokenizer comes from another folder (the base of adapters)
    takes only its tokenizer files, never through a link out of that folder."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"t": 1}')
    (tok / "vocab.json").write_text("{}")
    (tok / "merges.txt").symlink_to(private)
    (tok / "config.json").write_text("{}")
    (tok / "notes.txt").write_text("mine")
    files = tokenizer_files(SimpleNamespace(source_dir=source, tokenizer_dir=tok))
    assert set(files) == {"tokenizer.json", "vocab.json"}
    err = capsys.readouterr().err
    assert "merges.txt (a link out of the folder)" in err and "notes.txt" not in err


def test_allow_list_covers_what_save_pretrained_writes(tmp_path):
    """Every file transformers writes for a model with its tokenizer or image processor is
    on the list (weights apart), so a written model loads as the input did."""
    from transformers import (
        BertTokenizerFast,
        GPT2Config,
        GPT2LMHeadModel,
        GPT2TokenizerFast,
        ViTImageProcessor,
    )

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "bert")
    (tmp_path / "v.json").write_text(json.dumps({w: i for i, w in enumerate(["<|e|>", *WORDS])}))
    (tmp_path / "m.txt").write_text("#version: 0.2\n")
    gpt2 = tmp_path / "gpt2"
    GPT2TokenizerFast(vocab_file=str(tmp_path / "v.json"), merges_file=str(tmp_path / "m.txt"),
                      unk_token="<|e|>", eos_token="<|e|>").save_pretrained(gpt2)
    GPT2LMHeadModel(GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2,
                               n_positions=8)).save_pretrained(gpt2)
    ViTImageProcessor().save_pretrained(tmp_path / "vit")
    written = {p.name for d in ("bert", "gpt2", "vit") for p in (tmp_path / d).iterdir()}
    written = {n for n in written if not n.endswith(".safetensors")}
    assert written <= MODEL_FILES, sorted(written - MODEL_FILES)


# -- deliverable 2: no remote code -----------------------------------------------------------

def _custom_code_folder(folder: Path) -> Path:
    """A folder that needs custom code: an auto_map, an unknown model_type, and code that
    leaves a marker file when run."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "upcycle-test-custom", "architectures": ["XModel"],
        "auto_map": {"AutoModel": "modeling_x.XModel", "AutoConfig": "configuration_x.XConfig"},
        "hidden_size": 8}))
    code = f"open({str(folder / 'RAN')!r}, 'w').write('ran')\n"
    (folder / "modeling_x.py").write_text(code)
    (folder / "configuration_x.py").write_text(code)
    from safetensors.torch import save_file

    save_file({"w.weight": torch.ones(4, 4)}, str(folder / "model.safetensors"))
    return folder


def _run_closed_stdin(argv: list[str]) -> subprocess.CompletedProcess:
    src = str(Path(upcycle.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [src, *filter(None, [os.environ.get("PYTHONPATH")])]), "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1"}
    return run_decoded([sys.executable, "-m", "upcycle.cli.main", *argv],
                       stdin=subprocess.DEVNULL, env=env)


@pytest.mark.parametrize("verb", ["soup", "tune", "grow"])
def test_custom_code_folder_is_refused(tmp_path, verb):
    model = _custom_code_folder(tmp_path / "custom")
    data = _data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    argv = {"soup": ["soup", "--method", "uniform", str(model), str(model), "--held-out",
                     str(data), "--out", str(out), "--quiet"],
            "tune": ["tune", "--method", "snell", "--model", str(model), "--data", str(data),
                     "--max-steps", "1", "--out", str(out), "--quiet"],
            "grow": ["grow", "--model", str(model), "--hidden-size", "16", "--out", str(out)],
            }[verb]
    proc = _run_closed_stdin(argv)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in shown(proc.stderr) if line]
    assert len(lines) == 1, proc.stderr
    label = f"--model {model}" if verb == "grow" else f"model {model}"
    assert lines[0] == (f"upcycle {verb}: error: {label}: config.json asks for custom code "
                        f"(auto_map: AutoModel -> modeling_x.XModel); upcycle never runs code "
                        f"from a model folder")
    assert not (model / "RAN").exists()
    assert not out.exists()


def test_custom_tokenizer_is_refused(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}))
    with pytest.raises(UpcycleError) as info:
        check_no_custom_code(folder, f"tokenizer in {folder}")
    assert str(info.value) == (f"tokenizer in {folder}: tokenizer_config.json asks for custom "
                               f"code (auto_map: AutoTokenizer -> tokenization_x.XTokenizer); "
                               f"upcycle never runs code from a model folder")
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {}}))
    check_no_custom_code(folder, "x")  # an empty auto_map asks for nothing


def _from_pretrained_calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"):
            yield node


def test_every_from_pretrained_refuses_remote_code():
    """Every HF ``from_pretrained`` call in the package passes ``trust_remote_code=False``
    (upcycle's own adapter classes, ``*.model_class.from_pretrained``, load no HF code)."""
    root = Path(upcycle.__file__).parent
    seen, missing = 0, []
    for path in sorted(root.rglob("*.py")):
        for call in _from_pretrained_calls(path):
            owner = call.func.value
            if isinstance(owner, ast.Attribute) and owner.attr == "model_class":
                continue
            seen += 1
            ok = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant)
                     and k.value.value is False for k in call.keywords)
            if not ok:
                missing.append(f"{path.relative_to(root)}:{call.lineno}")
    assert seen >= 7 and not missing, missing  # the scan found the loading calls (7 sites)
