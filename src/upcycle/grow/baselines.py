"""Baselines for LEMON, built on the same expansion machinery.

- :func:`expand_net2net`: Net2Net-style equal splitting. Every copy gets ``W_u / c_u``;
  new blocks get all-zero output projections (Net2DeeperNet identity). Lossless (with the
  same residue/eps rules as LEMON) but symmetric: copies receive identical gradients and
  stay equal forever.
- :func:`expand_aki`: bert2BERT's Advanced Knowledge Initialisation (data-free, lossy,
  asymmetric): the extra heads/neurons of layer l take their input *and* output weights from
  layer l+1 (the last layer from itself), output columns divided by the copy count as in
  FPI; depth by stacking (the new top layers copy the bottom ones, StackBERT-style). The
  stream dimensions use the same copies + residue + eps rules as LEMON with equal splits.
"""

from __future__ import annotations

from torch import nn

from .lemon import expand


def expand_net2net(model: nn.Module, **dims) -> nn.Module:
    """Net2Net-style symmetric, lossless expansion (see module docstring)."""
    dims.pop("method", None)
    return expand(model, method="net2net", **dims)


def expand_aki(model: nn.Module, **dims) -> nn.Module:
    """bert2BERT-AKI-style expansion: lossy, asymmetric, data-free (see module docstring)."""
    dims.pop("method", None)
    return expand(model, method="aki", **dims)
