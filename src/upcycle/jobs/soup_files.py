"""The files a soup folder gets besides its weights: the tokenizer of a causal LM (found in
--model, the ingredients or --base) and the copied ``config.json`` with the soup's dtype."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.checkpoints import read_config_json
from ..io.model_files import model_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def find_tokenizer_dir(folders) -> Path | None:
    """The first of ``folders`` (None entries skipped) holding tokenizer files."""
    for folder in folders:
        if folder is not None and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
            return Path(folder)
    return None


def _tokenizer_candidates(ingredients, model_dir, base) -> list[Path]:
    """Where a causal LM's tokenizer may be: --model, each ingredient's folder (an adapter's
    own folder, then its base), then --base; each once, in that order."""
    found: list[Path] = []
    for folder in [model_dir, *[d for ing in ingredients for d in (
            ing.path if ing.path.is_dir() else None, ing.hf_dir)], base]:
        if folder is not None and Path(folder).is_dir() and Path(folder) not in found:
            found.append(Path(folder))
    return found


def tokenizer_files(job) -> dict[str, bytes]:
    """A causal LM's tokenizer files when they come from another folder than the one whose
    config is copied (e.g. the base of LoRA adapters, or one ingredient), so that the soup
    folder has its tokenizer too."""
    source, tok = job.source_dir, job.tokenizer_dir
    if tok is None or source is None or find_tokenizer_dir([source]) is not None:
        return {}
    names = {*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt", "added_tokens.json",
             "chat_template.jinja"}
    return {name: path.read_bytes() for name, path in model_files(tok, names).items()}


def config_with_dtype(job, state: dict) -> dict[str, str]:
    """The copied ``config.json`` with its ``dtype`` (and ``torch_dtype``, when present) set
    to the soup's floating dtype, which ``--dtype`` or the ingredients decide (empty when no
    config is copied)."""
    source = job.source_dir
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if source is None or not (Path(source) / "config.json").is_file() or not floating:
        return {}
    config = read_config_json(source, "the soup's config")
    name = str(floating[0]).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    return {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
