"""Checkpoints on disk: lazy reading, validation against each other, atomic writing.

An *ingredient* is one checkpoint: a ``.safetensors`` file, a HuggingFace model folder
(``model.safetensors``, a sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``),
or a PyTorch ``.bin``/``.pt``/``.pth`` state dict (loaded with ``weights_only=True``).
Tensors are read one at a time: safetensors files are opened per read, PyTorch zip files are
indexed once (tensor -> byte offset, read with ``map_location="meta"``) and each tensor's bytes
are read with a plain file read, so nothing stays mapped and reading N checkpoints never
costs N models of memory unless the caller keeps the tensors. Legacy (non-zip) PyTorch
pickles cannot be read that way: they are loaded whole, kept, and reported once.

Writing goes to a temporary sibling first and is renamed into place only when complete:
an interrupted run never leaves a half-written model where a good one was expected.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UpcycleError
from .source import SourceReads

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_FILE_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


_legacy_reported: set[str] = set()


def read_config_json(folder: str | os.PathLike, label: str) -> dict:
    """A model folder's ``config.json`` as a dict; an error naming the file (``label``: who
    it belongs to, e.g. "--model x") when it is not UTF-8, not JSON or not a JSON object."""
    file = Path(folder) / "config.json"
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UpcycleError(f"{label}: {file} is not UTF-8 text ({exc.reason} at byte "
                           f"{exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise UpcycleError(f"{label}: {file} is not valid JSON ({exc.msg} at line {exc.lineno} "
                           f"column {exc.colno})") from exc
    except OSError as exc:
        raise UpcycleError(f"{label}: {file} cannot be read ({exc.strerror or exc})") from exc
    if not isinstance(value, dict):
        raise UpcycleError(f"{label}: {file} is not a JSON object (it holds a "
                           f"{type(value).__name__})")
    return value


CONFIG_BOOKKEEPING = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                                "architectures", "_attn_implementation_autoset", "use_cache",
                                "_commit_hash"})
"""config.json fields that are bookkeeping, not what the model computes."""
_SHAPE_WORDS = ("hidden", "size", "layer", "head", "vocab", "position", "embd")


def config_differences(a: dict, b: dict) -> list[str]:
    """The fields two config.json dicts disagree on (bookkeeping left out), those that
    decide shapes first."""
    return sorted((k for k in set(a) | set(b) if k not in CONFIG_BOOKKEEPING
                   and a.get(k) != b.get(k)),
                  key=lambda k: (not any(w in k for w in _SHAPE_WORDS), k))


def _report_legacy(label: str, file: Path) -> None:
    """Say once per process that legacy pickles are loaded whole, and how to convert them."""
    if _legacy_reported:
        _legacy_reported.add(str(file))
        return
    _legacy_reported.add(str(file))
    print(f"upcycle: note: {label}: {_short(file)} is a legacy (non-zip) PyTorch file, which "
          f"cannot be read one tensor at a time: it is loaded whole and kept in memory (so is "
          f"any other such ingredient). Convert it once, e.g. torch.save(torch.load(f), f) or "
          f"to .safetensors.", file=sys.stderr)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


def _zip_byteorder(file: Path) -> str | None:
    with zipfile.ZipFile(file) as z:
        for name in z.namelist():
            if name.endswith("/byteorder"):
                return z.read(name).decode().strip()
    return None


def error_line(exc: BaseException) -> str:
    """One line saying why a third-party reader failed: torch's weights-only refusal reduced
    to what it refused, else the message's first non-empty line (the exception's type when
    it has no message), ANSI escapes dropped."""
    text = str(exc).replace("\x1b[1m", "").replace("\x1b[0m", "")
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
        text = text.split(". ", 1)[0].rstrip(".")
    text = text.split("  (Could this error message be improved?", 1)[0]  # torch's C++ footer
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = lines[0]
    return first if len(lines) == 1 or len(first) > 20 else f"{type(exc).__name__}: {first}"


def _short(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


class Ingredient(SourceReads):
    """One checkpoint on disk, read lazily one tensor at a time.

    ``index`` is 1-based and only used in messages ("ingredient 7 (runs/lr3e-5)");
    ``role`` replaces that name in messages (``"--model"``: "--model base-model").
    """

    def __init__(self, path: str | os.PathLike, index: int = 1, *, role: str | None = None):
        self.path = Path(path)
        self.index = index
        self.role = role
        self.hf_dir: Path | None = None  # set when the ingredient is a HF model folder
        self._files: dict[str, Path] = {}  # tensor name -> file holding it
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._torch_state: dict[str, torch.Tensor] | None = None  # legacy pickles only
        # zip-format .pt/.bin: name -> (storage byte offset in the file, dtype, shape, stride,
        # storage offset in elements)
        self._torch_index: dict[str, tuple] = {}
        self.whole_files: list[Path] = []
        """Files that could not be read one tensor at a time (legacy pickles, zips of the
        other byte order): loaded whole and kept in memory."""
        self._open()

    @property
    def label(self) -> str:
        if self.role is not None:
            return f"{self.role} {_short(self.path)}"
        return f"ingredient {self.index} ({_short(self.path)})"

    def __repr__(self) -> str:
        return f"Ingredient({str(self.path)!r}, index={self.index})"

    # -- opening ---------------------------------------------------------------------------
    def _open(self) -> None:
        path = self.path
        if not path.exists():
            raise UpcycleError(f"{self.label}: no such file or folder")
        if path.is_dir():
            self.hf_dir = path
            for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "pytorch_model.bin", TORCH_INDEX):
                if (path / name).is_symlink() and not (path / name).exists():
                    raise UpcycleError(f"{self.label}: {_short(path / name)} is a symlink that "
                                       f"does not resolve (a loop, or its target is missing)")
            if (path / "config.json").exists():  # written into the soup: must load
                read_config_json(path, self.label)
            if (path / SAFETENSORS_INDEX).is_file():
                self._open_index(path / SAFETENSORS_INDEX)
            elif (path / SAFETENSORS_SINGLE).is_file():
                self._open_safetensors(path / SAFETENSORS_SINGLE)
            elif (path / "pytorch_model.bin").is_file():
                self._open_torch(path / "pytorch_model.bin")
            elif (path / TORCH_INDEX).is_file():
                self._open_index(path / TORCH_INDEX, self._open_torch)
            else:
                raise UpcycleError(
                    f"{self.label}: folder holds no model weights (expected {SAFETENSORS_SINGLE}, "
                    f"{SAFETENSORS_INDEX}, pytorch_model.bin or {TORCH_INDEX})"
                )
        elif path.suffix == ".safetensors":
            self._open_safetensors(path)
        elif path.suffix in TORCH_SUFFIXES:
            self._open_torch(path)
        else:
            raise UpcycleError(
                f"{self.label}: unknown checkpoint format (expected a .safetensors, .bin, .pt or "
                f".pth file, or a HuggingFace model folder)"
            )
        if not self._meta:
            raise UpcycleError(f"{self.label}: the checkpoint holds no tensors")

    def _open_safetensors(self, file: Path) -> None:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise UpcycleError(
                            f"{self.label}: tensor {name!r} in {_short(file)} has unsupported "
                            f"dtype {sl.get_dtype()}"
                        )
                    self._meta[name] = (tuple(sl.get_shape()), dtype)
                    self._files[name] = file
        except UpcycleError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise UpcycleError(
                f"{self.label}: {_short(file)} is not a readable safetensors file "
                f"(truncated or another format?): {error_line(exc)}"
            ) from exc

    def _open_index(self, index_file: Path, open_shard=None) -> None:
        """A sharded checkpoint: the index's shards, each opened with ``open_shard``
        (safetensors by default; ``.bin`` shards: :meth:`_open_torch`)."""
        open_shard = open_shard or self._open_safetensors
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except Exception as exc:
            raise UpcycleError(
                f"{self.label}: {_short(index_file)} is not a valid index: {error_line(exc)}"
            ) from exc
        for shard in sorted(set(weight_map.values())):
            shard_file = index_file.parent / shard
            if not shard_file.is_file():
                raise UpcycleError(
                    f"{self.label}: shard {shard} named in {_short(index_file)} is missing"
                )
            open_shard(shard_file)
        missing = set(weight_map) - set(self._meta)
        if missing:
            raise UpcycleError(
                f"{self.label}: tensors listed in {_short(index_file)} are missing from their "
                f"shards: {sorted(missing)[:5]}"
            )

    def _open_torch(self, file: Path) -> None:
        legacy = not zipfile.is_zipfile(file)
        # A zip written on a machine of the other byte order needs torch's byte swapping:
        # load it whole like a legacy file.
        whole = legacy or _zip_byteorder(file) not in (None, sys.byteorder)
        try:
            # Zip format: only the pickle is read; tensors come back on the meta device with
            # their storage's byte offset in the file (nothing mapped, no data read).
            state = torch.load(file, map_location="cpu" if whole else "meta",
                               weights_only=True)
        except Exception as exc:
            raise UpcycleError(
                f"{self.label}: {_short(file)} is not a loadable PyTorch state dict "
                f"(truncated, or it holds more than tensors?): {error_line(exc)}"
            ) from exc
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(
            state["state_dict"], Mapping
        ):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise UpcycleError(
                f"{self.label}: {_short(file)} does not hold a state dict of tensors"
            )
        for name, t in state.items():
            self._meta[name] = (tuple(t.shape), t.dtype)
            self._files[name] = file
            if not whole:
                offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
                if offset is None:
                    raise UpcycleError(f"{self.label}: cannot locate tensor {name!r} in "
                                       f"{_short(file)} (torch {torch.__version__})")
                self._torch_index[name] = (int(offset), t.dtype, tuple(t.shape), t.stride(),
                                           t.storage_offset())
        if whole:  # (shards of a sharded .bin add to it)
            self._torch_state = {**(self._torch_state or {}), **state}
            self.whole_files.append(file)
            if legacy and self.role is None:
                _report_legacy(self.label, file)

    def _read_torch(self, name: str) -> torch.Tensor:
        """One tensor of a zip-format PyTorch file, read with a plain file read (private
        memory; the file is not mapped)."""
        offset, dtype, shape, stride, start = self._torch_index[name]
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        span = 1 + sum((s - 1) * st for s, st in zip(shape, stride))
        size = torch.empty((), dtype=dtype).element_size()
        with open(self._files[name], "rb") as f:
            f.seek(offset + start * size)
            buf = bytearray(f.read(span * size))
        if len(buf) != span * size:
            raise UpcycleError(f"{self.label}: {_short(self._files[name])} is truncated "
                               f"(tensor {name!r})")
        flat = torch.frombuffer(buf, dtype=dtype)
        if span == numel and tuple(stride) == _contiguous_strides(shape):
            return flat.view(shape)
        return flat.as_strided(shape, stride).clone()

    def locate(self, name: str) -> tuple[Path, int, int] | None:
        """Where tensor ``name``'s bytes lie, contiguous and in this machine's byte order:
        (file, byte offset, byte count), for a caller that reads them straight into a buffer
        of its own (``os.preadv``); None when they cannot be read that way (a pickle held
        whole, a strided view)."""
        if name not in self._meta or (self._torch_state is not None
                                      and name in self._torch_state):
            return None
        shape, dtype = self._meta[name]
        size = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            size *= s
        if name in self._torch_index:
            offset, _, _, stride, start = self._torch_index[name]
            if tuple(stride) != _contiguous_strides(shape):
                return None
            return self._files[name], offset + start * torch.empty(
                (), dtype=dtype).element_size(), size
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            return None
        file = self._files[name]
        offsets = self.__dict__.setdefault("_st_offsets", {})
        if file not in offsets:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            offsets[file] = {k: 8 + n + v["data_offsets"][0] for k, v in header.items()
                             if k != "__metadata__"}
        return file, offsets[file][name], size

    # -- reading ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    check_finite = False
    """Check every floating tensor for NaN/Inf as it is read (:func:`checked`): set by
    :func:`upcycle.io.ingredients.validate_ingredients` so that the soup's own read is the
    check (one read of every tensor, not two)."""

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (see :meth:`_read`), checked for NaN/Inf when
        :attr:`check_finite` is set."""
        t = self._read(name)
        return checked(self, name, t) if self.check_finite else t

    def _read(self, name: str) -> torch.Tensor:
        """Read one tensor as a private (copy-on-write) CPU tensor.

        Safetensors files are opened per read and closed again, so pages of the memory map
        do not stay resident once the caller drops the tensor: reading N ingredients one
        tensor at a time never holds N models. Zip-format ``.bin``/``.pt`` tensors are read
        from their byte offset with a plain read (nothing stays mapped); legacy pickles are
        held whole since they were opened.
        """
        if name not in self._meta:
            raise UpcycleError(f"{self.label}: has no tensor {name!r}")
        if self._torch_state is not None and name in self._torch_state:
            return self._torch_state[name]
        if name in self._torch_index:
            try:
                return self._read_torch(name)
            except UpcycleError:
                raise
            except Exception as exc:
                raise UpcycleError(f"{self.label}: cannot read tensor {name!r} from "
                                   f"{_short(self._files[name])}: {error_line(exc)}") from exc
        try:
            with safe_open(str(self._files[name]), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:
            raise UpcycleError(
                f"{self.label}: cannot read tensor {name!r} from {_short(self._files[name])}: "
                f"{error_line(exc)}"
            ) from exc


def checked(source, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (tensor ``name`` of ``source``), or one error naming both when a floating tensor
    holds NaN or Inf; each name is checked once per source (a fitted soup reads it again)."""
    done = source.__dict__.setdefault("_finite_names", set())
    if name in done or not t.is_floating_point():
        return t
    # NaN/Inf make the sum non-finite (one pass, no mask; ~50x faster than isfinite().all());
    # a finite tensor whose sum overflows is told apart by the exact check
    if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise UpcycleError(f"{source.label}: {name!r} contains {bad} values")
    done.add(name)
    return t


def check_model_weights(folder: str | os.PathLike, *, role: str = "--model") -> None:
    """Open the weights of the HF model folder ``folder`` as an ingredient is opened (headers,
    and the pickle of a zip ``.bin`` under weights-only rules; no tensor data read), so that a
    folder without weights, a truncated or foreign weight file or a symlink loop is one error
    naming ``role`` and the file, before transformers reads it. A legacy (non-zip) ``.bin`` is
    loaded once under weights-only rules and dropped; so are the shards of a sharded ``.bin``
    folder (``pytorch_model.bin.index.json``)."""
    Ingredient(folder, role=role)


def load_pretrained(cls, folder: str | os.PathLike, *, role: str = "--model", **kwargs):
    """``cls.from_pretrained(folder, **kwargs)`` (``cls`` a transformers model class), after
    :func:`check_model_weights`. What transformers still refuses is one error naming ``role``,
    the folder and the class; so is a weight file that matches none of the model's parameters
    (which transformers would initialise at random, with a warning)."""
    from transformers.utils import logging as hf_logging  # only called with transformers

    check_model_weights(folder, role=role)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its loading report is repeated below, or is an error
    try:
        model, info = cls.from_pretrained(folder, output_loading_info=True,
                                          trust_remote_code=False, **kwargs)
    except UpcycleError:
        raise
    except Exception as exc:  # transformers, safetensors and torch raise their own types
        raise UpcycleError(f"{role} {folder}: cannot load it as {cls.__name__}: "
                           f"{error_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info.get("missing_keys") or ())
    if missing and not set(model.state_dict()) - missing:
        raise UpcycleError(f"{role} {folder}: its weights match none of "
                           f"{type(model).__name__}'s parameters (e.g. no "
                           f"{sorted(missing)[0]!r}): the weights of another model?")
    logger = hf_logging.get_logger("transformers.modeling_utils")
    if info.get("unexpected_keys"):
        logger.warning(f"Some weights of the model checkpoint at {folder} were not used when "
                       f"initializing {type(model).__name__}: {info['unexpected_keys']}")
    if missing:
        logger.warning(f"Some weights of {type(model).__name__} were not initialized from the "
                       f"model checkpoint at {folder} and are newly initialized: "
                       f"{sorted(missing)}")
    return model
