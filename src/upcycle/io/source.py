"""The TensorSource protocol: a model's tensors, read lazily one at a time.

A full checkpoint on disk (:class:`~upcycle.io.checkpoints.Ingredient`: safetensors, sharded
HF folders, ``.bin``/``.pt``) and a LoRA adapter on its base
(:class:`~upcycle.io.lora.LoraIngredient`: base + scale * B @ A, formed per tensor) both
satisfy it, so every soup method reads either the same way and never holds more than the
tensors it asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TensorSource(Protocol):
    path: Path
    """Where the tensors come from (a file or a folder)."""
    index: int
    """1-based position among the ingredients (for messages)."""
    hf_dir: Path | None
    """The HF model folder holding the config, when there is one."""

    @property
    def label(self) -> str:
        """How messages name it: "ingredient 7 (runs/lr3e-5)"."""

    def keys(self) -> list[str]:
        """The tensor names, in storage order."""

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, without reading it."""

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor now (a private CPU tensor; nothing stays resident)."""

    def numel(self) -> int:
        """The number of elements over all tensors."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, read now (small models and tests only)."""


class SourceReads:
    """What a :class:`TensorSource` derives from ``keys``/``shape``/``get``."""

    def numel(self) -> int:
        n = 0
        for name in self.keys():
            k = 1
            for s in self.shape(name):
                k *= s
            n += k
        return n

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.keys()}
