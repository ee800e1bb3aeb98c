"""What upcycle reads from and copies out of a HF model folder, safely.

- :func:`model_files`: the files of a folder that may go beside a written model (an
  allow-list of model, tokenizer, processor and generation files, :data:`MODEL_FILES`), as
  regular files: a symlink is followed only when it stays inside the folder (or points at
  the HuggingFace cache's blob of the same repository); any other file is left out with one
  warning line naming it. Custom code (``*.py``), notes, training state never reach an output.
- :func:`check_no_custom_code`: a folder whose config asks for custom code (``auto_map``) is
  refused before transformers reads it; upcycle also passes ``trust_remote_code=False`` to
  every ``from_pretrained``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from ..errors import UpcycleError
from .checkpoints import SAFETENSORS_INDEX, WEIGHT_FILE_SUFFIXES, _short

MODEL_FILES = frozenset({
    # model and generation
    "config.json", "generation_config.json",
    # tokenizers (the vocabulary files of the families' tokenizers, fast and slow)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model",
    "spm.model",
    # image / video processors
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
})
"""The files copied beside a written model (what ``save_pretrained`` of a model, its
tokenizer, processor and generation config write, less the weights that upcycle writes)."""

CUSTOM_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json",
                       "processor_config.json")
"""The files whose ``auto_map`` makes transformers import code from the folder."""

UPCYCLE_RECORDS = frozenset({"train.json", "report.json", "soup.json", "growth.json"})
"""The records upcycle writes beside its own outputs (how the input was made): an output
writes its own, so the input's are left out without a warning."""

_OTHER_WEIGHTS = (".h5", ".msgpack", ".ckpt", ".ckpt.index", ".gguf")


def _is_weight_file(name: str) -> bool:
    """Weights (written by upcycle itself, never copied, no warning)."""
    return (name.endswith(WEIGHT_FILE_SUFFIXES) or name.endswith(_OTHER_WEIGHTS)
            or name == SAFETENSORS_INDEX or name.endswith(".index.json"))


def _inside(target: Path, folder: Path) -> bool:
    """``target`` (resolved) lies inside ``folder`` (resolved), or is the HuggingFace cache's
    blob of the repository whose snapshot ``folder`` is (``models--X/snapshots/REV/name`` ->
    ``models--X/blobs/SHA``: the cache's own links)."""
    if target.is_relative_to(folder):
        return True
    return (folder.parent.name == "snapshots" and target.parent.name == "blobs"
            and target.parent.parent == folder.parent.parent)


def _classify(item: Path, real_folder: Path) -> tuple[Path | None, str | None]:
    """(the regular file to copy, None) or (None, why it is left out; None: silently)."""
    name = item.name
    if name.startswith(".") or _is_weight_file(name) or name in UPCYCLE_RECORDS:
        return None, None
    if name not in MODEL_FILES:
        if item.is_dir():
            return None, None  # sub-folders (checkpoint-*, runs/) are never copied
        if name.endswith(".py"):
            return None, "custom code"
        return None, "not a model, tokenizer or generation file"
    if item.is_symlink():
        try:
            target = item.resolve(strict=True)
        except (OSError, RuntimeError):
            return None, "a broken link"
        if not _inside(target, real_folder):
            return None, "a link out of the folder"
    else:
        target = item
    if not target.is_file():
        return None, "not a regular file"
    return target, None


def model_files(folder: str | os.PathLike, names=None) -> dict[str, Path]:
    """The files of ``folder`` to copy beside a written model: name -> the regular file (a
    link resolved) holding it, in name order. Only :data:`MODEL_FILES` (and of them only
    ``names`` when given) are kept; the rest, bar weights, hidden files, sub-folders and
    upcycle's own records (:data:`UPCYCLE_RECORDS`), is named in one warning line on
    stderr."""
    folder = Path(folder)
    real = folder.resolve()
    found: dict[str, Path] = {}
    skipped: list[str] = []
    for item in sorted(folder.iterdir()):
        if names is not None and item.name not in names:
            continue
        source, why = _classify(item, real)
        if source is not None:
            found[item.name] = source
        elif why is not None:
            skipped.append(f"{item.name} ({why})")
    if skipped:
        print(f"upcycle: warning: not copied from {_short(folder)}: {', '.join(skipped)}",
              file=sys.stderr)
    return found


def _auto_map_entry(auto_map) -> str:
    """``AutoModel -> modeling_x.XModel`` (the first entry) for messages."""
    if isinstance(auto_map, dict) and auto_map:
        key, value = next(iter(auto_map.items()))
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value if v is not None)
        return f"{key} -> {value}"
    return json.dumps(auto_map)[:80]


def check_no_custom_code(folder: str | os.PathLike, label: str) -> None:
    """Refuse a folder that asks for custom code: an ``auto_map`` in its config.json (or
    tokenizer/processor config). ``label`` names it in the error ("--model X", "model X")."""
    folder = Path(folder)
    for name in CUSTOM_CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: the loader that reads it says so
        if isinstance(record, dict) and record.get("auto_map"):
            raise UpcycleError(f"{label}: {name} asks for custom code (auto_map: "
                               f"{_auto_map_entry(record['auto_map'])}); upcycle never runs "
                               f"code from a model folder")



def tied_groups_of_folder(folder: str | os.PathLike) -> list[list[str]]:
    """The parameters sharing one tensor in the model a HF folder's config describes (built
    on the meta device, nothing read): groups of two or more names, in ``named_parameters()``
    order (e.g. ``[transformer.wte.weight, lm_head.weight]``); empty without a usable
    config. A config that unties its embeddings and has no sub-model is answered from
    config.json alone (transformers ties only where a config's ``tie_word_embeddings`` is
    true), so an untied model's soup never imports transformers' modeling code; each folder's
    answer is computed once per process."""
    config = Path(folder) / "config.json"
    try:
        stamp = config.stat().st_mtime_ns
    except OSError:
        return []
    return [list(g) for g in _tied_groups(str(Path(folder).resolve()), stamp)]


@functools.lru_cache(maxsize=32)
def _tied_groups(folder: str, _stamp: int) -> tuple[tuple[str, ...], ...]:
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return ()
    if isinstance(raw, dict) and raw.get("tie_word_embeddings") is False and not any(
            isinstance(v, dict) and "model_type" in v for v in raw.values()):
        return ()
    try:  # transformers: deferred, as io reads plain checkpoints without it
        import torch
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            return ()
        with torch.device("meta"):
            model = cls._from_config(config)
    except Exception:  # no usable config: no tied groups known
        return ()
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)
