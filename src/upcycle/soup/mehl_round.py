"""One MEHL round: the K directions of a model batch, the coefficients X, and the gradient
hooks that fold the weight gradient into dL/dX (see :mod:`upcycle.soup.mehl` for the maths).

Directions are D_i^l = theta_i^l - c^l with their inverse norms kept apart:
theta^l(X) = c^l + sum_i X[i,l] inv[i,l] D_i^l and dL/dX[i,l] = inv[i,l] <D_i^l, g^l>, the
same maths as unit directions. Where D lives:

- resident (``store="resident"``): the K directions are built once per round and kept on the
  model's device in fp32 (``compact``: in the ingredients' dtype, half for bf16): K model
  copies, the fastest;
- out of core (``store="out-of-core"``): no direction is kept. Whenever the combine or the
  gradient fold touches parameter tensor l, its K slices theta_i^l are read again from the
  ingredients' files (one slice at a time, the next one read ahead by a reader thread,
  :class:`~upcycle.soup.mehl_offload.SliceReader`) and D_i^l = theta_i^l - c^l is
  recomputed in fp32. The anchor c is a file too (:class:`~upcycle.soup.mehl_offload.
  FileAnchor`), read one tensor at a time and rewritten at the end of the round. A tensor
  over :data:`~upcycle.soup.mehl_offload.PIECE` elements (a vocabulary-sized embedding) is
  read, combined, folded and written in pieces of that size. Memory is then the model, its
  activations and two pieces in flight, whatever K and N.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..io.checkpoints import Ingredient
from ..runtime import distributed
from .common import accumulator_dtype
from .mehl_offload import SliceReader, pieces

RESIDENT, OUT_OF_CORE = "resident", "out-of-core"


class MehlRound:
    """One model batch: the directions (stored or re-read), the coefficients X, the hooks.

    ``anchor``: name -> flat fp32 tensor (on the device when resident, on the host when out
    of core). ``shard``: under torch.distributed this rank owns the direction rows
    [lo, hi) only; everything K x L (norms, X, dL/dX) stays whole on every rank.
    """

    def __init__(self, names, block_of, n_blocks, params, anchor, members,
                 ingredients: Sequence[Ingredient], grad_clip, compact, shard=False,
                 store: str = RESIDENT):
        self.names, self.block_of, self.params, self.anchor = names, block_of, params, anchor
        device = params[names[0]].device
        self.device = device
        acc = accumulator_dtype(device)
        self.acc_dtype = acc
        k = len(members)
        self.shard = shard
        self.lo, self.hi = ((k * distributed.rank()) // distributed.world_size(),
                            (k * (distributed.rank() + 1)) // distributed.world_size()) \
            if shard else (0, k)
        self.out_of_core = store == OUT_OF_CORE
        self.reader = (SliceReader(ingredients, members, range(self.lo, self.hi), device,
                                   names) if self.out_of_core else None)
        self._backward_order: list[str] = []
        self._seen: list[str] = []
        sq = torch.zeros(k, n_blocks, dtype=acc, device=device)
        anchor_sq = torch.zeros(n_blocks, dtype=acc, device=device)
        self.directions: dict[str, torch.Tensor] = {}
        if self.out_of_core:
            self.reader.plan(names)
        for name, block in zip(names, block_of):
            if self.out_of_core:
                for p, part in enumerate(pieces(params[name].numel())):
                    c = self._anchor(name, part)
                    for row, diff in self._rows(name, c, p):
                        sq[row, block] += torch.linalg.vector_norm(diff).to(acc).square()
                    anchor_sq[block] += torch.linalg.vector_norm(c).to(acc).square()
            else:
                c = self._anchor(name)
                self.directions[name] = self._store(name, block, c, members, ingredients,
                                                    compact, sq)
                anchor_sq[block] += torch.linalg.vector_norm(c).to(acc).square()
        if shard:
            distributed.all_reduce_sum(sq)  # each rank filled its own rows
        norms = sq.sqrt()
        # A block whose difference to the anchor is zero (or at fp32 rounding level) has no
        # direction: skip it (the reference divides by zero and produces NaN there).
        tol = torch.clamp(1e-7 * anchor_sq.sqrt(), min=1e-30)
        valid = norms > tol
        self.inv_norms = torch.where(valid, 1.0 / norms.clamp_min(torch.finfo(acc).tiny),
                                     torch.zeros_like(norms))
        self._inv32 = self.inv_norms.to(torch.float32)
        self.valid = valid
        self.x = torch.zeros(k, n_blocks, device=device)
        self.grad_x = torch.zeros(k, n_blocks, dtype=acc, device=device)
        self.grad_sq = torch.zeros((), dtype=acc, device=device)
        self.grad_clip = grad_clip
        self._hooks = [params[name].register_post_accumulate_grad_hook(self._hook(name, block))
                       for name, block in zip(names, block_of)]

    # -- where the directions come from ------------------------------------------------------
    def _anchor(self, name: str, part: tuple[int, int] | None = None) -> torch.Tensor:
        """c^l on the device: the resident anchor's tensor, or (out of core) one read from
        the anchor's file (elements [a, b) of it: ``part``; valid until the next read)."""
        read = getattr(self.anchor, "read", None)
        return (self.anchor[name] if read is None else read(name, part)).to(self.device)

    def _store(self, name, block, c, members, ingredients, compact, sq) -> torch.Tensor:
        """The resident rows D_i^l (fp32, or the ingredients' dtype when ``compact``), their
        squared norms added into ``sq``."""
        store = ingredients[0].dtype(name) if compact else torch.float32
        d = torch.empty(self.hi - self.lo, c.numel(), dtype=store, device=self.device)
        for row in range(self.lo, self.hi):
            theta = ingredients[members[row]].get(name).reshape(-1).to(self.device).to(
                torch.float32)
            if store == torch.float32:
                diff = torch.sub(theta, c, out=d[row - self.lo])
            else:
                diff = theta.sub_(c)
                d[row - self.lo].copy_(diff)
            # Reductions without fp64 copies of the directions (that would cost 4x).
            sq[row, block] += torch.linalg.vector_norm(diff).to(self.acc_dtype).square()
            del theta, diff
        return d

    def _rows(self, name: str, c: torch.Tensor | None, piece: int = 0
              ) -> Iterator[tuple[int, torch.Tensor]]:
        """(row, D_row^l in fp32 on the device) for this rank's rows, one at a time: the
        stored row, or (out of core) piece ``piece`` of the slice read again with c (that
        piece of the anchor) subtracted in place."""
        if self.out_of_core:
            for row in range(self.lo, self.hi):
                yield row, self.reader.take(name, row, piece).sub_(c)
            return
        d = self.directions[name]
        for row in range(d.shape[0]):
            yield self.lo + row, d[row].to(torch.float32, copy=True)  # callers scale it

    # -- the gradient fold -------------------------------------------------------------------
    def _hook(self, name: str, block: int):
        # Sharded, every rank folds the global gradient into its own directions; else only
        # clipping needs it (the global norm).
        need_global_grad = self.shard or (self.grad_clip is not None
                                          and distributed.is_distributed())
        lo, hi = self.lo, self.hi

        def fold(param: torch.Tensor) -> None:
            g = param.grad
            if need_global_grad:  # every rank runs this hook for every parameter, in order
                distributed.all_reduce_sum(g)
            if self.out_of_core:
                self._seen.append(name)
                dots, g_sq = self._fold_pieces(name, g.reshape(-1))
            else:
                g = g.reshape(-1).to(torch.float32)
                g_sq = (None if self.grad_clip is None
                        else torch.linalg.vector_norm(g).to(self.acc_dtype).square())
                direction = self.directions.get(name)
                if direction is not None and (direction.dtype == torch.float32 or hi == lo):
                    dots = direction.to(torch.float32) @ g
                elif hi > lo:  # one row at a time in fp32: no K x D fp32 copy
                    dots = torch.stack([torch.dot(row, g) for _, row in self._rows(name, None)])
            if hi > lo:
                self.grad_x[lo:hi, block] += (dots.to(self.acc_dtype)
                                              * self.inv_norms[lo:hi, block])
            if self.grad_clip is not None:
                self.grad_sq += g_sq
            param.grad = None  # consumed: never hold a full weight gradient

        return fold

    def _fold_pieces(self, name: str, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Out of core: this rank's <D_i^l, g> and (with clipping) |g|^2, a piece at a time
        (``g`` flat, in the parameter's dtype; only a piece of it is made fp32)."""
        dots = torch.zeros(self.hi - self.lo, dtype=torch.float32, device=g.device)
        g_sq = torch.zeros((), dtype=self.acc_dtype, device=g.device)
        for p, (a, b) in enumerate(pieces(g.numel())):
            gp = g[a:b].to(torch.float32)
            if self.grad_clip is not None:
                g_sq += torch.linalg.vector_norm(gp).to(self.acc_dtype).square()
            if self.hi > self.lo:
                c = self._anchor(name, (a, b))
                for row, diff in self._rows(name, c, p):
                    dots[row - self.lo] += torch.dot(diff, gp)
        return dots, g_sq

    # -- the combine -------------------------------------------------------------------------
    def _combine_pieces(self, name: str, block: int, out: torch.Tensor | None = None
                        ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Out of core: (a, b, theta^l(X)[a:b] in fp32) piece by piece, written into
        ``out[a:b]`` when given (else valid until the next piece)."""
        coef = self.x[:, block] * self._inv32[:, block]
        for p, (a, b) in enumerate(pieces(self.params[name].numel())):
            c = self._anchor(name, (a, b))
            if self.shard:
                acc = torch.zeros_like(c) if out is None else out[a:b].zero_()
                for row, diff in self._rows(name, c, p):
                    acc.add_(diff.mul_(coef[row]))
                yield a, b, distributed.all_reduce_sum(acc).add_(c)
                continue
            acc = c.clone() if out is None else out[a:b].copy_(c)
            for row, diff in self._rows(name, c, p):
                acc.add_(diff.mul_(coef[row]))
            yield a, b, acc

    @torch.no_grad()
    def combine(self, name: str, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """theta^l(X) = c + sum_i X[i, l] inv[i, l] D_i^l in fp32 (into ``out`` when given).
        Sharded: every rank sums its own rows, the sum is all-reduced, then c is added (every
        rank must call this for the same tensors in the same order)."""
        if self.out_of_core:
            if out is None:
                out = torch.empty(self.params[name].numel(), dtype=torch.float32,
                                  device=self.device)
            for _ in self._combine_pieces(name, block, out):
                pass
            return out
        coef = self.x[:, block] * self._inv32[:, block]
        d = self.directions.get(name)
        c = self._anchor(name)
        if d is not None and d.dtype == torch.float32 and not self.shard:
            if out is None:
                return torch.addmm(c.unsqueeze(0), coef.unsqueeze(0), d).view(-1)
            torch.addmm(c.unsqueeze(0), coef.unsqueeze(0), d, out=out.view(1, -1))
            return out
        if self.shard:
            acc = torch.zeros_like(c) if out is None else out.zero_()
            if d is not None and d.dtype == torch.float32 and len(d):
                acc.view(1, -1).addmm_(coef[self.lo:self.hi].unsqueeze(0), d)
            else:
                for row, diff in self._rows(name, c):
                    acc.add_(diff.mul_(coef[row]))
            return distributed.all_reduce_sum(acc).add_(c)
        acc = c.clone() if out is None else out.copy_(c)
        for row, diff in self._rows(name, c):
            acc.add_(diff.mul_(coef[row]))
        return acc

    @torch.no_grad()
    def apply(self) -> None:
        """Write theta(X) into the model's parameters (in place when the parameter is fp32,
        so no model-sized temporary is made)."""
        if self.out_of_core:
            self._learn_backward_order()
            self.reader.plan(self.names)
        for name, block in zip(self.names, self.block_of):
            param = self.params[name]
            if param.dtype == torch.float32 and param.is_contiguous():
                self.combine(name, block, out=param.view(-1))
            elif self.out_of_core and param.is_contiguous():  # a piece at a time
                flat = param.view(-1)
                for a, b, theta in self._combine_pieces(name, block):
                    flat[a:b].copy_(theta)
            else:
                param.copy_(self.combine(name, block).view_as(param))
        if self.out_of_core:  # the backward that follows reads in the order it last ran
            self.reader.plan(self._backward_order)

    def _learn_backward_order(self) -> None:
        if self._seen and not self._backward_order:
            self._backward_order = list(dict.fromkeys(self._seen))
        self._seen = []

    @torch.no_grad()
    def move_anchor(self) -> None:
        """The round's end point theta(X) (fp32, even for a low-precision model) becomes the
        anchor, in place."""
        if self.out_of_core:
            self.reader.plan(self.names)
        replace = getattr(self.anchor, "replace", None)
        if replace is not None:  # a file: the next anchor is written beside it, then swapped
            replace(self._end_point())
            return
        for name, value, _ in self._end_point():
            self.anchor[name].copy_(value)

    def _end_point(self):
        """(name, theta^l(X) flat, fp32, start) for every souped tensor, one at a time:
        start None for a whole tensor, else the first element of a piece (out of core)."""
        for name, block in zip(self.names, self.block_of):
            param = self.params[name]
            if param.dtype == torch.float32:
                yield name, param.detach().reshape(-1), None
            elif self.out_of_core:
                for a, _, theta in self._combine_pieces(name, block):
                    yield name, theta, a
            else:
                yield name, self.combine(name, block), None

    def take_grad(self, loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dL/dX for the last backward (times ``loss_scale``, the fp16 loss scale; clipped as
        clip_grad_norm_ would on the unscaled weight gradient), and the clip factor; then
        reset."""
        grad = self.grad_x
        factor = None
        if self.grad_clip is not None:
            # The hooks folded the global (all-reduced) weight gradient: grad is global.
            norm = self.grad_sq.sqrt() / loss_scale
            factor = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            grad = grad * factor
        if self.shard or self.grad_clip is None:
            # Unsharded without clipping: the local weight gradient was folded, sum the K x L
            # partial dL/dX. Sharded: each rank filled only its own rows of the (global) dL/dX.
            distributed.all_reduce_sum(grad)  # only K x L numbers cross the wire
        self.grad_x = torch.zeros_like(self.grad_x)
        self.grad_sq = torch.zeros_like(self.grad_sq)
        return grad.to(torch.float32), factor

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.directions.clear()
        if self.reader is not None:
            self.reader.close()
