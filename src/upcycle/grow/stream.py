"""Streamed LEMON: grow a HF model folder into another one tensor at a time.

    result = expand_folder("llama-1b/", "llama-2b/", hidden_size=2560, num_layers=28)

The source is read one tensor at a time (safetensors opened per read, zip ``.bin`` read at
its byte offset; :class:`upcycle.io.checkpoints.Ingredient`), the grown model is written shard
by shard as its pieces come (:class:`upcycle.io.shards.ShardWriter`: HF's sharded
safetensors with ``model.safetensors.index.json``), and both models exist only as empty
(meta) skeletons: memory holds the tensors outside the layers, then one source layer (two for
AKI) and the target layers grown from it, whatever the model's size. The tensors are those of
the in-memory :func:`upcycle.grow.expand` on the same model (:func:`~upcycle.grow.lemon.grow_pieces`
computes both). The lossless check runs each model's own forward with every module's weights
read from its folder just before the module runs (:func:`upcycle.io.on_demand.weights_on_demand`),
one model after the other: never both, never one whole.

A bad input is refused before anything is written: a legacy (non-zip) PyTorch pickle, which
cannot be read one tensor at a time; a target LEMON cannot grow; a disk without room for the
planned output.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UpcycleError
from ..io.checkpoints import TORCH_INDEX, Ingredient, _short, read_config_json
from ..io.on_demand import weights_on_demand
from ..io.shards import ShardWriter, TensorEntry
from ..io.writing import DEFAULT_MAX_SHARD_BYTES, atomic_dir, copy_model_files
from ..models.families import ARCHITECTURES
from .check import compare_outputs, example_inputs
from .growth import Growth, check_finite_tensor, empty_weights, prepare_growth
from .lemon import grow_pieces
from .plan import GrowthPlan

CHECK_SEEDS = (0, 1, 2)
"""The seeded inputs of the check (those of ``upcycle grow``'s in-memory check), run as one
batch so that each model's weights are read once."""


@dataclass
class FolderGrowth:
    """What :func:`expand_folder` did."""
    out: Path
    plan: GrowthPlan
    parameters: tuple[int, int]
    """Source and grown parameter counts."""
    difference: dict | None
    """The check's max_abs, max_rel, argmax_equal (None: not checked)."""
    bytes_written: int
    dtype: torch.dtype


def model_class(config):
    """The transformers class of ``config.architectures[0]`` (None: AutoModel's choice)."""
    import transformers  # deferred: transformers loads only when a model is grown

    for arch in config.architectures or []:
        return getattr(transformers, arch, None)
    return None


def _empty_model(config) -> nn.Module:
    """The model of ``config`` with its parameters on the meta device (buffers real)."""
    from transformers import AutoModel  # deferred: as above

    cls = model_class(config)
    with empty_weights():
        model = cls(config) if cls is not None else AutoModel.from_config(config)
    if hasattr(model, "tie_weights"):  # as from_pretrained does
        model.tie_weights()
    return model.eval()


def _renamings(model: nn.Module, *, legacy: bool) -> list:
    """transformers' checkpoint renamings of ``model`` (``legacy``: also the old names it
    still reads); an UpcycleError when a conversion is more than a renaming."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    found = get_model_conversion_mapping(model, add_legacy=legacy)
    if any(not isinstance(c, WeightRenaming) for c in found):
        raise UpcycleError(f"model: {type(model).__name__}'s checkpoints are converted (not "
                           f"only renamed) on loading; it cannot be grown streamed: pass "
                           f"--in-memory")
    return found if legacy else [c for c in found if not isinstance(c, PrefixChange)]


def checkpoint_names(model: nn.Module, keys) -> dict[str, str]:
    """Each parameter name of ``model`` -> the name ``save_pretrained`` gives it on disk."""
    from transformers.core_model_loading import apply_renamings

    reverse = [c.reverse_transform() for c in _renamings(model, legacy=False)[::-1]]
    return {k: apply_renamings(k, reverse) for k in keys}


def stream_blocker(config) -> str | None:
    """Why a model of ``config`` is grown in memory rather than streamed (None: it streams)."""
    if not any(config.model_type in a.model_types for a in ARCHITECTURES.values()):
        return (f"model_type {config.model_type!r} is matched to a family by its tensor "
                f"layout, which is verified by running the whole model")
    return None


def _check_streamable(folder: Path, label: str) -> None:
    """Refuse weights that cannot be read one tensor at a time (a legacy pickle)."""
    files = []
    if not any((folder / n).is_file() for n in ("model.safetensors",
                                                "model.safetensors.index.json")):
        if (folder / "pytorch_model.bin").is_file():
            files = [folder / "pytorch_model.bin"]
        elif (folder / TORCH_INDEX).is_file():
            try:
                shards = set(json.loads((folder / TORCH_INDEX).read_text())["weight_map"]
                             .values())
            except (ValueError, KeyError, TypeError, OSError):
                shards = set()  # the Ingredient names the bad index
            files = [folder / s for s in sorted(shards)]
    for file in files:
        if file.is_file() and not zipfile.is_zipfile(file):
            config = read_config_json(folder, label)
            arch = (config.get("architectures") or ["AutoModel"])[0]
            raise UpcycleError(
                f"{label} {_short(folder)}: {file.name} is a legacy (non-zip) PyTorch pickle, "
                f"which cannot be read one tensor at a time; convert the folder once to "
                f"safetensors (upcycle has no convert command: python -c \"import transformers; "
                f"transformers.{arch}.from_pretrained('{folder}').save_pretrained('NEW_FOLDER')\""
                f"), or pass --in-memory to load it whole")


class _Source:
    """The source folder under the model's parameter names, read one tensor at a time."""

    def __init__(self, folder: Path, label: str = "--model"):
        from transformers import AutoConfig  # deferred: as above
        from transformers.core_model_loading import rename_source_key

        _check_streamable(folder, label)
        self.weights = Ingredient(folder, role=label)
        self.label = self.weights.label
        self.config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        self.model = _empty_model(self.config)
        state = self.model.state_dict()
        renamings = _renamings(self.model, legacy=True)
        self.files: dict[str, str] = {}
        for name in self.weights.keys():
            key = rename_source_key(name, renamings, [], self.model.base_model_prefix,
                                    state)[0]
            self.files.setdefault(key, name)
        for key, alias in _aliases(self.model).items():  # a tied weight saved once
            if key not in self.files and alias in self.files:
                self.files[key] = self.files[alias]
        buffers = dict(self.model.named_buffers())
        missing = [k for k in state if k not in self.files and k not in buffers]
        if missing:
            raise UpcycleError(f"{self.label}: its weights have no tensor for {missing[0]!r} "
                               f"(a parameter of {type(self.model).__name__}); is it the model "
                               f"of its config.json?")
        self.buffers = {k: buffers[k] for k in state if k not in self.files}
        self.shapes = {k: self.weights.shape(self.files[k]) if k in self.files
                       else tuple(self.buffers[k].shape) for k in state}
        first = next(n for n, _ in self.model.named_parameters())
        self.dtype = self.weights.dtype(self.files[first])

    def read(self, key: str) -> torch.Tensor:
        if key in self.files:
            return self.weights.get(self.files[key])
        return self.buffers[key]


class _WorkState(Mapping):
    """The source's tensors in the rules' dtype, each read from disk when asked (and checked
    to be finite), never kept."""

    def __init__(self, source: _Source, work: torch.dtype):
        self.source, self.work = source, work

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.source.shapes:
            raise KeyError(key)
        value = self.source.read(key)
        check_finite_tensor(key, value, self.source.label)
        return value.to(self.work) if value.is_floating_point() else value

    def __contains__(self, key) -> bool:
        return key in self.source.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.shapes)

    def __len__(self) -> int:
        return len(self.source.shapes)


def _aliases(model: nn.Module) -> dict[str, str]:
    """Every name of a parameter shared under several names -> its first name (the one
    written; ``from_pretrained`` ties the others)."""
    first: dict[int, str] = {}
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(param), name)
    return {k: v for k, v in out.items() if k != v}


def _entries(g: Growth, dtype: torch.dtype) -> list[TensorEntry]:
    aliases = _aliases(g.new_model)
    entries = []
    for key, value in g.new_model.state_dict().items():
        if key in aliases:
            continue
        entries.append(TensorEntry(key, tuple(value.shape),
                                   dtype if value.is_floating_point() else value.dtype))
    return entries


def check_free_space(out: Path, need: int, label: str = "--out") -> None:
    """Refuse an ``out`` whose disk has less than ``need`` bytes free (nothing written)."""
    where = out.absolute().parent
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise UpcycleError(f"{label} {_short(out)}: the grown model needs {need / 1e9:.2f} GB "
                           f"but {where} has {free / 1e9:.2f} GB free; nothing was written "
                           f"(free some space or write elsewhere)")


def _check_inputs(model: nn.Module) -> dict:
    inputs = [example_inputs(model, seed=s, device="cpu") for s in CHECK_SEEDS]
    return {k: torch.cat([i[k] for i in inputs]) for k in inputs[0]}


@torch.no_grad()
def _run_on_demand(model: nn.Module, read: Callable[[str], torch.Tensor], inputs: dict) -> dict:
    """``model``'s outputs on ``inputs``, in float32, each module's weights read on demand."""
    model.to(torch.float32).eval()
    with weights_on_demand(model, lambda key: read(key).to(torch.float32)):
        out = model(**inputs)
    items = out.items() if hasattr(out, "items") else enumerate(out)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor)}


def expand_folder(src_dir: str | Path, out_dir: str | Path, *, hidden_size: int | None = None,
                  num_layers: int | None = None, num_heads: int | None = None,
                  intermediate_size: int | None = None, seed: int = 0,
                  noise_std: float | None = None, method: str = "lemon",
                  dtype: torch.dtype | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                  check: bool = True, judge: Callable[[FolderGrowth], dict] | None = None,
                  say: Callable[[str], None] = lambda line: None,
                  progress: bool = False) -> FolderGrowth:
    """Grow the HF model folder ``src_dir`` into ``out_dir`` (written atomically), streamed.

    The dimensions, ``seed``, ``noise_std`` and ``method`` are :func:`upcycle.grow.expand`'s;
    ``dtype``: the dtype the grown weights are written in (default: the source's; the rules
    compute in float32, float64 for a float64 source). ``check``: run both models on a few
    inputs, piecewise, and compare (``judge(difference)`` may refuse the result by raising,
    and returns the report written as ``growth.json``; without ``judge`` nothing is enforced
    and no report is written). ``say``: progress lines.
    """
    src, out = Path(src_dir), Path(out_dir)
    source = _Source(src)
    g = prepare_growth(source.model, hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=num_heads, intermediate_size=intermediate_size, seed=seed,
                       noise_std=noise_std, method=method, dtype=source.dtype, empty=True)
    dtype = dtype or source.dtype
    entries = _entries(g, dtype)
    files = checkpoint_names(g.new_model, [e.name for e in entries])
    entries = [TensorEntry(files[e.name], e.shape, e.dtype) for e in entries]
    aliases = _aliases(g.new_model)
    n_source = sum(p.numel() for p in source.model.parameters())
    n_grown = sum(p.numel() for p in g.new_model.parameters())
    say(f"grown {g.plan.describe()} (streamed)")
    say(f"parameters: {n_source:,} -> {n_grown:,}")
    planned = ShardWriter(out, entries, max_shard_bytes=max_shard_bytes).planned_bytes
    check_free_space(out, planned + (1 << 20))  # the shards, and config/tokenizer files
    state = _WorkState(source, g.work)
    result = FolderGrowth(out=out, plan=g.plan, parameters=(n_source, n_grown), difference=None,
                          bytes_written=planned, dtype=dtype)
    start = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with ShardWriter(tmp, entries, max_shard_bytes=max_shard_bytes) as writer, \
                tqdm(total=len(entries), desc="growing", unit="tensor", leave=False,
                     disable=None if progress else True) as bar:
            written: set[str] = set()
            for piece in grow_pieces(state, g, source.shapes):
                for key, value in piece.items():
                    name = files[aliases.get(key, key)]
                    if name not in written:
                        writer.write(name, value)
                        written.add(name)
                        bar.update(1)
                del piece
        copy_model_files(src, tmp)
        g.new_config.dtype = dtype
        g.new_config.save_pretrained(tmp)
        say(f"wrote {planned / 1e9:.2f} GB in {len(writer.files)} shard(s) in "
            f"{time.perf_counter() - start:.0f}s" + ("; checking it piecewise" if check else ""))
        if check:
            start = time.perf_counter()
            result.difference = check_folders(source, g, tmp, files, aliases)
            say(f"checked in {time.perf_counter() - start:.0f}s")
            if judge is not None:
                report = judge(result)
                (tmp / "growth.json").write_text(json.dumps(report, indent=2))
    return result


def check_folders(source: _Source, g: Growth, grown_dir: Path, files: Mapping[str, str],
                  aliases: Mapping[str, str]) -> dict:
    """The source and the grown model (written in ``grown_dir``) on the check's inputs, one
    after the other, each module's weights read from its folder when it runs."""
    inputs = _check_inputs(source.model)
    a = _run_on_demand(source.model, source.read, inputs)
    grown = Ingredient(grown_dir, role="grown model")
    b = _run_on_demand(g.new_model, lambda key: grown.get(files[aliases.get(key, key)]),
                       inputs)
    return compare_outputs(a, b)
