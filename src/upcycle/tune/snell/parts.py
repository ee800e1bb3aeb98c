"""The parts of delta_W's output rows: a fused projection's q, k and v rows (or gate and up)
are sparsified each with its own threshold. :class:`RowParts` holds them as runs of rows;
the blocked passes walk delta_W a block of rows at a time (:func:`_row_blocks`) and look up
each row's threshold (:func:`_block_tau`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...errors import UpcycleError


@dataclass(frozen=True)
class RowParts:
    """The parts of a fused projection's output rows (nn.Linear orientation), each sparsified
    with its own threshold: per part, its rows as contiguous runs ``(start, end)``. Built by
    :func:`row_parts` from a number of equal stacked slices or from row indices per part
    (``FusedLayout.indices()`` of the architecture map)."""

    runs: tuple[tuple[tuple[int, int], ...], ...]
    rows: int

    @property
    def count(self) -> int:
        return len(self.runs)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sum(e - s for s, e in runs) for runs in self.runs)

    def indices(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """One LongTensor of row indices per part."""
        return [torch.cat([torch.arange(s, e, device=device) for s, e in runs])
                for runs in self.runs]

    def row_part(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The part of every row, (rows,) int64."""
        out = torch.empty(self.rows, dtype=torch.long)
        for p, runs in enumerate(self.runs):
            for s, e in runs:
                out[s:e] = p
        return out.to(device)

    def blocks(self, part: int, block_rows: int):
        """``(first row, end row)`` of the part's rows, at most ``block_rows`` at a time."""
        for s, e in self.runs[part]:
            for o0 in range(s, e, block_rows):
                yield o0, min(o0 + block_rows, e)


def row_parts(parts, rows: int, *, name: str = "delta_W") -> RowParts:
    """:class:`RowParts` from ``parts``: an int (that many equal stacked slices), a sequence
    of row-index tensors (or lists) covering ``0 .. rows-1`` once, or a RowParts."""
    if isinstance(parts, RowParts):
        if parts.rows != rows:
            raise UpcycleError(f"{name}: its row parts cover {parts.rows} rows, it has {rows}")
        return parts
    if isinstance(parts, int):
        if parts < 1 or rows % parts:
            raise UpcycleError(f"{name}: cannot split an output dimension of {rows} into "
                               f"{parts} equal slices")
        h = rows // parts
        return RowParts(tuple(((i * h, (i + 1) * h),) for i in range(parts)), rows)
    if not isinstance(parts, Sequence) or not parts:
        raise UpcycleError(f"{name}: parts must be a number of equal slices or a list of row "
                           f"indices per part, got {parts!r}")
    seen = torch.zeros(rows, dtype=torch.long)
    runs = []
    for p, idx in enumerate(parts):
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= rows:
            raise UpcycleError(f"{name}: part {p} has no rows or rows outside 0..{rows - 1}")
        seen.index_add_(0, idx, torch.ones_like(idx))
        idx = idx.sort().values
        breaks = (torch.nonzero(idx[1:] != idx[:-1] + 1).reshape(-1) + 1).tolist()
        starts = [0, *breaks]
        ends = [*breaks, idx.numel()]
        runs.append(tuple((int(idx[a]), int(idx[e - 1]) + 1) for a, e in zip(starts, ends)))
    if not bool((seen == 1).all()):
        raise UpcycleError(f"{name}: its parts must hold each of its {rows} output rows once "
                           f"(sizes {[len(torch.as_tensor(i).reshape(-1)) for i in parts]})")
    return RowParts(tuple(runs), rows)


def _row_blocks(rows: int, block_rows: int):
    """``(first row, end row)`` of each block of delta_W's rows (blocks may cross parts: the
    threshold is applied per row)."""
    for o0 in range(0, rows, block_rows):
        yield o0, min(o0 + block_rows, rows)


def _block_tau(tau: torch.Tensor, row_part: torch.Tensor | None, o0: int, o1: int):
    """The threshold of rows o0:o1: a 0-dim tensor (one part) or (rows, 1), per row's part."""
    if row_part is None:
        return tau[0]
    return tau.index_select(0, row_part[o0:o1]).unsqueeze(1)


__all__ = ["RowParts", "row_parts"]
