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
- :func:`expand_stack`: depth stacking, the G_stack operator of "Stacking Your Transformers"
  (Du et al., NeurIPS 2024, arXiv:2405.15319; official code tongxuluo/prts): the whole stack
  of trained layers is repeated in order, target layer j = source layer j mod L (L -> 2L:
  [0..L-1, 0..L-1]; any depth >= L, the last repetition cut short), embeddings, norms and
  heads kept as they are. Width is unchanged (a width argument is refused). Lossy (the
  function changes), data-free; the same depth up-scaling as mergekit's passthrough merge of
  whole-model slices. Streams like the others (:func:`upcycle.grow.expand_folder`).
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


def expand_stack(model: nn.Module, *, num_layers: int, **dims) -> nn.Module:
    """G_stack depth stacking: ``num_layers`` layers, layer j a copy of source layer
    j mod L; width unchanged (see module docstring). Any width argument different from the
    source's is refused with one UpcycleError."""
    dims.pop("method", None)
    return expand(model, method="stack", num_layers=num_layers, **dims)
