"""The README's walkthrough runs as written, in sequence, on a tiny random BERT.

The commands and the Python between ``<!-- readme-example: begin -->`` and ``end`` are
extracted from README.md and run in a folder holding ``base-model/`` and the JSONL files the
README names. The one substitution: ``--epochs 3`` becomes 2 steps of batch 8 (a smoke run).
"""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from upcycle.cli.main import main

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film", "was",
         "a", "day", "really"]
SUBSTITUTIONS = {"--epochs 3": "--max-steps 2 --batch-size 8 --quiet"}


def walkthrough() -> tuple[list[str], list[str]]:
    """(commands, python blocks) of the README's walkthrough, in order."""
    text = README.read_text()
    begin, end = "<!-- readme-example: begin -->", "<!-- readme-example: end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, "walkthrough markers"
    section = text.split(begin)[1].split(end)[0]
    commands, python = [], []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        if lang == "python":
            python.append(body)
            continue
        assert lang == "bash"
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line
            if line.strip():
                commands.append(line.strip())
    return commands, python


def _tiny_setup(folder: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder / "base-model")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=32)).save_pretrained(folder / "base-model")
    rng = np.random.default_rng(0)
    for name, n in (("train.jsonl", 40), ("held_out.jsonl", 16), ("test.jsonl", 16)):
        with open(folder / name, "w") as f:
            for _ in range(n):
                label = int(rng.integers(2))
                pool = WORDS[:4] if label else WORDS[4:8]
                text = " ".join(["the", "film", "was", *rng.choice(pool, 2)])
                f.write(json.dumps({"text": text, "label": label}) + "\n")


def test_walkthrough_extracts():
    commands, python = walkthrough()
    assert len(commands) >= 5 and all(c.startswith("upcycle ") for c in commands)
    assert python and "upcycle.tune.load" in python[0]
    assert any(old in c for c in commands for old in SUBSTITUTIONS)


def test_readme_walkthrough_runs_in_sequence(tmp_path, monkeypatch, capsys):
    _tiny_setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands, python = walkthrough()
    for command in commands:
        for old, new in SUBSTITUTIONS.items():
            command = command.replace(old, new)
        argv = shlex.split(command)
        assert argv[0] == "upcycle"
        assert main(argv[1:]) == 0, command
    for i in range(3):
        run = tmp_path / "runs" / f"snell-{i}"
        assert (run / "adapter" / "README.md").is_file() and (run / "merged" / "README.md").is_file()
    for soup in ("mehl", "greedy"):
        card = (tmp_path / "soups" / soup / "README.md").read_text()
        assert f"- {soup}+" in card or f"- {soup}\n" in card
    assert json.loads((tmp_path / "soups/greedy/report.json").read_text())["method"] == "greedy"
    capsys.readouterr()
    for block in python:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "test accuracy of the soup:" in printed
    assert (tmp_path / "soups" / "mehl-api" / "README.md").is_file()
