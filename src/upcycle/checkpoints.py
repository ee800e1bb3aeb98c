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

import contextlib
import glob
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UpcycleError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_FILE_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # HuggingFace's default max_shard_size ("5GB")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


_legacy_reported: set[str] = set()


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


def _short(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


class Ingredient:
    """One checkpoint on disk, read lazily one tensor at a time.

    ``index`` is 1-based and only used in messages ("ingredient 7 (runs/lr3e-5)").
    """

    def __init__(self, path: str | os.PathLike, index: int = 1):
        self.path = Path(path)
        self.index = index
        self.hf_dir: Path | None = None  # set when the ingredient is a HF model folder
        self._files: dict[str, Path] = {}  # tensor name -> file holding it
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._torch_state: dict[str, torch.Tensor] | None = None  # legacy pickles only
        # zip-format .pt/.bin: name -> (storage byte offset in the file, dtype, shape, stride,
        # storage offset in elements)
        self._torch_index: dict[str, tuple] = {}
        self._open()

    @property
    def label(self) -> str:
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
            if (path / SAFETENSORS_INDEX).is_file():
                self._open_index(path / SAFETENSORS_INDEX)
            elif (path / SAFETENSORS_SINGLE).is_file():
                self._open_safetensors(path / SAFETENSORS_SINGLE)
            elif (path / "pytorch_model.bin").is_file():
                self._open_torch(path / "pytorch_model.bin")
            else:
                raise UpcycleError(
                    f"{self.label}: folder holds no model weights (expected {SAFETENSORS_SINGLE}, "
                    f"{SAFETENSORS_INDEX} or pytorch_model.bin)"
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
                f"(truncated or another format?): {exc}"
            ) from exc

    def _open_index(self, index_file: Path) -> None:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except Exception as exc:
            raise UpcycleError(
                f"{self.label}: {_short(index_file)} is not a valid index: {exc}"
            ) from exc
        for shard in sorted(set(weight_map.values())):
            shard_file = index_file.parent / shard
            if not shard_file.is_file():
                raise UpcycleError(
                    f"{self.label}: shard {shard} named in {_short(index_file)} is missing"
                )
            self._open_safetensors(shard_file)
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
                f"(truncated, or it holds more than tensors?): {exc}"
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
        if whole:
            self._torch_state = dict(state)
            if legacy:
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

    # -- reading ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def numel(self) -> int:
        n = 0
        for shape, _ in self._meta.values():
            k = 1
            for s in shape:
                k *= s
            n += k
        return n

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor as a private (copy-on-write) CPU tensor.

        Safetensors files are opened per read and closed again, so pages of the memory map
        do not stay resident once the caller drops the tensor: reading N ingredients one
        tensor at a time never holds N models. Zip-format ``.bin``/``.pt`` tensors are read
        from their byte offset with a plain read (nothing stays mapped); legacy pickles are
        held whole since they were opened.
        """
        if name not in self._meta:
            raise UpcycleError(f"{self.label}: has no tensor {name!r}")
        if self._torch_state is not None:
            return self._torch_state[name]
        if name in self._torch_index:
            try:
                return self._read_torch(name)
            except UpcycleError:
                raise
            except Exception as exc:
                raise UpcycleError(f"{self.label}: cannot read tensor {name!r} from "
                                   f"{_short(self._files[name])}: {exc}") from exc
        try:
            with safe_open(str(self._files[name]), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:
            raise UpcycleError(
                f"{self.label}: cannot read tensor {name!r} from {_short(self._files[name])}: {exc}"
            ) from exc

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.keys()}


def _looks_like_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return any((path / f).is_file() for f in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX,
                                                   "pytorch_model.bin", "adapter_config.json"))
    return path.is_file() and path.suffix in WEIGHT_FILE_SUFFIXES


def expand_ingredient_paths(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Turn CLI/API arguments into checkpoint paths.

    Each spec is a checkpoint file, a HF model folder, a peft adapter folder, a folder of
    checkpoints (files, HF or adapter folders, taken in sorted order) or a shell glob.
    """
    paths: list[Path] = []
    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if any(ch in spec for ch in "*?[") and not p.exists():
            matches = sorted(glob.glob(spec))
            if not matches:
                raise UpcycleError(f"ingredient pattern {spec!r} matches no files")
            paths.extend(Path(m) for m in matches)
        elif p.is_dir() and not _looks_like_checkpoint(p):
            inner = sorted(c for c in p.iterdir() if _looks_like_checkpoint(c))
            if not inner:
                raise UpcycleError(
                    f"ingredient folder {spec!r} holds no checkpoints (expected .safetensors/.bin/"
                    f".pt files or HuggingFace model folders)"
                )
            paths.extend(inner)
        else:
            paths.append(p)
    return paths


def open_ingredients(specs: Sequence[str | os.PathLike], *,
                     base: str | os.PathLike | Ingredient | None = None) -> list[Ingredient]:
    """Open the ingredients ``specs`` name. peft LoRA adapter folders among them become
    :class:`upcycle.adapters.LoraIngredient` on ``base`` (required for them), merged one
    tensor at a time; full checkpoints and adapters may be mixed."""
    from .adapters import is_adapter, open_adapter

    paths = expand_ingredient_paths(specs)
    if not paths:
        raise UpcycleError("no ingredients given")
    if base is not None and not isinstance(base, Ingredient) and any(map(is_adapter, paths)):
        base = Ingredient(base, index=0)
    return [open_adapter(p, base, index=i + 1) if is_adapter(p) else Ingredient(p, index=i + 1)
            for i, p in enumerate(paths)]


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def validate_ingredients(ingredients: Sequence[Ingredient], *, check_finite: bool = True) -> None:
    """Check that all ingredients are checkpoints of one model, before any work is done.

    Same tensor names, shapes and dtypes as the first ingredient, and (by default) only
    finite floating values. Reads every tensor once when ``check_finite`` is set.
    """
    if not ingredients:
        raise UpcycleError("no ingredients given")
    ref = ingredients[0]
    ref_keys = set(ref.keys())
    for ing in ingredients[1:]:
        keys = set(ing.keys())
        if keys != ref_keys:
            missing = sorted(ref_keys - keys)
            extra = sorted(keys - ref_keys)
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) of {ref.label}, e.g. {missing[0]!r}")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) {ref.label} lacks, e.g. {extra[0]!r}")
            raise UpcycleError(
                f"{ing.label}: not the same architecture: " + "; ".join(parts)
            )
        for name in ref.keys():
            if ing.shape(name) != ref.shape(name):
                raise UpcycleError(
                    f"{ing.label}: {name!r} has shape {_shape_str(ing.shape(name))}, "
                    f"{ref.label.split(' (')[0]} has {_shape_str(ref.shape(name))}"
                )
            if ing.dtype(name) != ref.dtype(name):
                raise UpcycleError(
                    f"{ing.label}: {name!r} has dtype {ing.dtype(name)}, "
                    f"{ref.label.split(' (')[0]} has {ref.dtype(name)}"
                )
    if check_finite:
        for ing in ingredients:
            for name in ing.keys():
                t = ing.get(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                    raise UpcycleError(f"{ing.label}: {name!r} contains {bad} values")


# -- writing ---------------------------------------------------------------------------------

def holds_model(path: Path) -> bool:
    """True when ``path`` already holds a model (a weight file, or a folder with weights)."""
    if path.is_file():
        return True
    if path.is_dir():
        return any(c.suffix in WEIGHT_FILE_SUFFIXES or c.name == SAFETENSORS_INDEX
                   for c in path.iterdir())
    return False


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        if holds_model(out):
            raise UpcycleError(
                f"output {_short(out)} already holds a model; pass --overwrite (overwrite=True) "
                f"to replace it"
            )
        if out.is_dir() and any(out.iterdir()):
            raise UpcycleError(
                f"output folder {_short(out)} is not empty; pass --overwrite (overwrite=True) "
                f"to replace it"
            )


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _user_permissions(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions a plain
    ``mkdir``/``open`` would under the user's umask: ``tempfile`` and safetensors make
    owner-only (0700/0600) files, which would otherwise end up as the output. Executable
    files stay executable."""
    mask = _umask()
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        executable = p.is_dir() or os.stat(p).st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success, move it into place atomically.

    On an exception the temporary folder is removed and ``out`` is left as it was. With
    ``overwrite`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _user_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; rename it to ``out`` on success."""
    out = Path(out)
    if not overwrite:
        check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _user_permissions(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_safetensors_shards(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``state`` into ``folder`` as HF does: one ``model.safetensors`` or shards + index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(_contiguous(shards[0]), str(folder / SAFETENSORS_SINGLE), metadata=meta)
        return [SAFETENSORS_SINGLE]
    names = []
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(_contiguous(shard), str(folder / fname), metadata=meta)
        names.append(fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    (folder / SAFETENSORS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return names


def _is_weight_file(name: str) -> bool:
    return (
        name.endswith(WEIGHT_FILE_SUFFIXES)
        or name == SAFETENSORS_INDEX
        or name.endswith(".index.json")
    )


def copy_model_files(source_dir: Path, dest: Path) -> None:
    """Copy a HF folder's config, tokenizer and processor files (not its weights)."""
    for item in sorted(source_dir.iterdir()):
        if item.is_file() and not _is_weight_file(item.name) and not item.name.startswith("."):
            shutil.copy2(item, dest / item.name)


def save_model(
    out: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    *,
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, bytes | str] | None = None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a model atomically.

    ``out`` ending in ``.safetensors`` gets one file. Otherwise ``out`` is a folder: the
    weights (sharded when larger than ``max_shard_bytes``), the non-weight files of
    ``source_dir`` (config, tokenizer) when given, so ``from_pretrained(out)`` works, and any
    ``extra_files`` / ``extra_tensors`` (name -> safetensors dict) written beside them.
    """
    out = Path(out)
    if out.suffix == ".safetensors":
        check_output(out, overwrite)
        with atomic_file(out) as tmp:
            save_file(_contiguous(state), str(tmp), metadata={"format": "pt"})
        return out
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if source_dir is not None:
            copy_model_files(Path(source_dir), tmp)
        write_safetensors_shards(tmp, state, max_shard_bytes=max_shard_bytes)
        for name, content in (extra_files or {}).items():
            data = content.encode() if isinstance(content, str) else content
            (tmp / name).write_bytes(data)
        for name, tensors in (extra_tensors or {}).items():
            save_file(_contiguous(tensors), str(tmp / name))
    return out
