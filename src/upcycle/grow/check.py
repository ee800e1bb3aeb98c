"""Checking losslessness: run the source and the grown model on the same inputs and compare
(:func:`max_output_difference`, :func:`example_inputs`), and the check that refuses a family
matched by its tensor layout only when the grown model is not lossless (:func:`check_clone`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UpcycleError
from ..models.matching import architecture_of


def worst(*values: float) -> float:
    """The largest of ``values``, NaN when any is NaN (Python's ``max(0.0, nan)`` is 0.0: a
    NaN difference must not pass as none)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


def _has_active_dropout(model: nn.Module) -> bool:
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "attention_dropout", 0) or 0)


def _outputs(output) -> dict[str, torch.Tensor]:
    """The tensors of a model output (logits, start/end logits, hidden states, pooled)."""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    items = output.items() if hasattr(output, "items") else enumerate(output)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor) and k != "loss"}


@torch.no_grad()
def max_output_difference(source: nn.Module, grown: nn.Module, inputs: dict) -> dict:
    """Run both models on ``inputs`` (a dict of model inputs) and compare their outputs.

    Compares every tensor output: logits (and QA start/end logits) as they are, hidden states
    and pooled outputs on their first channels (the grown stream holds k copies of the
    source's). Returns max_abs, max_rel (max_abs / max(1, max |output|)) and argmax_equal (of
    the logits, or of the compared tensors when there are none). Refuses models in train mode
    with active dropout: losslessness holds in eval mode only.
    """
    for label, model in (("source", source), ("grown", grown)):
        if model.training and _has_active_dropout(model):
            raise UpcycleError(f"{label} model: in train mode with dropout; LEMON is lossless "
                               f"only in eval mode (or with dropout p=0): call model.eval() first")
    return compare_outputs(source(**inputs), grown(**inputs))


def compare_outputs(a_out, b_out) -> dict:
    """Compare the source's outputs ``a_out`` with the grown model's ``b_out`` (model outputs
    or dicts of tensors) as :func:`max_output_difference` does."""
    a_out, b_out = _outputs(a_out), _outputs(b_out)
    if not a_out:
        raise UpcycleError("source model: its output holds no tensor to compare")
    diff, scale, argmax = 0.0, 1.0, True
    logit_keys = [k for k in a_out if k.endswith("logits")] or list(a_out)
    for key, a in a_out.items():
        if key not in b_out:
            raise UpcycleError(f"grown model: its output has no {key!r} (the source's has)")
        a = a.double()
        b = b_out[key].double()[..., : a.shape[-1]]
        diff = worst(diff, (a - b).abs().max().item())  # torch's max propagates NaN
        scale = worst(scale, a.abs().max().item())
        if key in logit_keys:
            argmax = argmax and bool((a.argmax(-1) == b.argmax(-1)).all())
    rel = diff / scale if math.isfinite(scale) else (math.nan if diff else 0.0)
    return {"max_abs": diff, "max_rel": rel, "argmax_equal": argmax}


def example_inputs(model: nn.Module, *, batch: int = 2, length: int = 16, seed: int = 0,
                   device: torch.device | str | None = None) -> dict:
    """A few seeded inputs for ``model`` on its device (or ``device``: a model on the meta
    device) (token ids, with a padded row for encoders, or random images)."""
    arch = architecture_of(model).arch
    config = model.config
    first = next(model.parameters())
    first = torch.empty(0, dtype=first.dtype, device=device or first.device)
    gen = torch.Generator().manual_seed(seed)
    if arch.embed == "vit":
        size = config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return {"pixel_values": torch.randn(batch, config.num_channels, *size, generator=gen,
                                            dtype=first.dtype).to(first.device)}
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 512)
    length = min(length, int(limit) - 2)  # RoBERTa's positions start after the padding index
    ids = torch.randint(3, int(config.vocab_size), (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and arch.call.mask == "padding":
        mask[-1, length // 2:] = 0
    return {"input_ids": ids.to(first.device), "attention_mask": mask.to(first.device)}



def check_clone(source: nn.Module, grown: nn.Module, config) -> None:
    """A family recognised by its layout only: its forward may still differ (an embedding
    scale, a norm offset). Refuse unless the grown model is lossless on a few inputs."""
    was_training = source.training
    source.eval()
    try:
        rel = worst(*(max_output_difference(source, grown, example_inputs(source, seed=s))
                      ["max_rel"] for s in range(2)))
    finally:
        source.train(was_training)
    bound = 1e-8 if next(source.parameters()).dtype == torch.float64 else 1e-4
    if not rel <= bound:
        raise UpcycleError(f"model: model_type {config.model_type!r} has the tensor layout of "
                           f"{grown.growth_plan.family} but computes something else (the grown "
                           f"model differs by {rel:.2e}); not supported")
