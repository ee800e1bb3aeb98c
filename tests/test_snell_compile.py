"""torch.compile of a SNELL model: traced once, whatever the thresholds do from step to step
(the threshold search and its hint stay out of the graph, in SNELL's custom operators), and
the compiled passes are the eager ones bit for bit."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from upcycle.tune.snell import SnellConfig, ThresholdHint, get_snell_model, row_parts
from upcycle.tune.snell.autograd import _SnellLinear

STEPS = 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test counts its own graphs: no sizes remembered from another test's models
    (dynamo would compile for dynamic shapes at once)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _llama(intermediate=192, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    # intermediate 192 > the kernel's 64-row tile: the MLP's delta_W comes in several blocks,
    # so the thresholds go through the hint's window (block_mb below)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    # problem_type given: transformers sets it at the first call otherwise, a guard that
    # fails once (one more graph, with or without SNELL)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=192, num_labels=3, max_position_embeddings=32,
        problem_type="single_label_classification"))


def _batch(family, step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    if family == "llama":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 3, (2,), generator=g)}


def _graphs_per_step(family, config, backend="aot_eager", **shape):
    """The model's graphs after each of STEPS training steps (forward, backward, AdamW) and
    after two evaluation passes, every graph dynamo made by then (the kernel's own compiled
    loop's too) and the graph breaks seen."""
    counters.clear()
    model = get_snell_model(_llama(**shape) if family == "llama" else _bert(), config)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    seen, total = [], []
    for step in range(STEPS):
        loss = compiled(**_batch(family, step)).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append(counter.frame_count)
        total.append(counters["stats"]["unique_graphs"])
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))  # it trained
    model.eval()
    with torch.no_grad():
        for step in range(2):
            batch = _batch(family, step)
            batch.pop("labels")
            assert torch.isfinite(compiled(**batch).logits).all()
            seen.append(counter.frame_count)
    return seen, total, sum(counters["graph_break"].values())


@pytest.mark.parametrize("family", ["llama"])  # "bert" too (by hand: same, ~16 s more)
def test_compiled_snell_model_is_traced_once(family):
    """One graph for training, one more for evaluation; no graph break and no recompile as
    the thresholds move (it was one recompile per step, on the hint's floats)."""
    seen, _, breaks = _graphs_per_step(family, SnellConfig(r=8, sparsity=0.5, block_mb=0.001))
    assert seen[0] == 1, seen
    assert seen[STEPS - 1] == seen[0], f"recompiled while training: {seen}"
    assert seen[-1] == seen[STEPS - 1] + 1 and seen[-2] == seen[-1], seen
    assert breaks == 0


def test_compiled_snell_model_with_the_compiled_kernel_is_traced_once():
    """``SnellConfig(compile=True)``: the model's graph as above, and the kernel's own
    compiled loop compiles a bounded set of graphs, none while training goes on."""
    config = SnellConfig(r=8, sparsity=0.5, block_mb=0.001, compile=True, dropout=0.0,
                         drop_path=0.0)
    # one layer, one width: fewer of the kernel's graphs to compile (inductor is slow)
    seen, total, breaks = _graphs_per_step("llama", config, intermediate=32, layers=1)
    assert seen[STEPS - 1] == seen[0] == 1, seen
    assert breaks == 0
    # the kernel's graphs (per pass kind and width) all come in the first two steps
    assert total[1] == total[STEPS - 1], total


def _function_step(x, weight, bias, A, B, coeffs, parts, row_part, hint, block_rows):
    y = _SnellLinear.apply(x, weight, bias, A, B, coeffs, 0.5, "reference", parts, row_part,
                           block_rows, False, hint)
    return (y * y).sum()


def test_compiled_function_is_the_eager_function_bit_for_bit():
    """The custom operators run the autograd Function's own passes: the same output and
    gradients bit for bit, step after step, while the hint (kept out of the graph) learns
    where the thresholds are."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 48, 192
    parts = row_parts(3, d_out)
    row_part = parts.row_part()
    weight = torch.randn(d_out, d_in, generator=g)
    bias = torch.randn(d_out, generator=g)
    x = torch.randn(5, 7, d_in, generator=g, requires_grad=True)
    A0 = torch.randn(2, d_in, 4, generator=g)
    B0 = torch.randn(2, d_out, 4, generator=g)
    coeffs = torch.tensor([0.1, -0.1])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_function_step, backend=counter, fullgraph=True)
    hints = {"eager": ThresholdHint(), "compiled": ThresholdHint()}
    factors = {name: (A0.clone().requires_grad_(), B0.clone().requires_grad_())
               for name in hints}
    for step in range(STEPS):
        grads = {}
        for name, fn in (("eager", _function_step), ("compiled", compiled)):
            A, B = factors[name]
            x.grad = None
            loss = fn(x, weight, bias, A, B, coeffs, parts, row_part, hints[name], 64)
            loss.backward()
            grads[name] = (loss.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone())
            with torch.no_grad():  # a small step, so the thresholds move a little
                A -= 1e-3 * A.grad / A.grad.abs().max()
                B -= 1e-3 * B.grad / B.grad.abs().max()
            A.grad = B.grad = None
        for got, want in zip(grads["compiled"], grads["eager"]):
            assert torch.equal(got, want), step
        assert hints["compiled"].last == hints["eager"].last
    assert counter.frame_count == 1
    assert hints["compiled"].hits == hints["eager"].hits > 0


def test_hint_handles_are_unique_and_follow_copies():
    import copy
    import pickle

    hint = ThresholdHint()
    hint.last = [0.5]
    twin, thawed = copy.deepcopy(hint), pickle.loads(pickle.dumps(hint))
    assert len({hint.handle, twin.handle, thawed.handle}) == 3
    assert ThresholdHint.find(twin.handle) is twin and twin.last == [0.5]
    assert ThresholdHint.find(hint.handle) is hint and ThresholdHint.find(-1) is None


def test_compiled_snell_model_with_varying_lengths_is_traced_twice():
    """Sequences of another length: one recompile with a dynamic length, then none."""
    model = get_snell_model(_llama(), SnellConfig(r=8, block_mb=0.001))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for length in (8, 12, 10):
        ids = torch.randint(0, 64, (2, length))
        compiled(input_ids=ids, labels=ids).loss.backward()
    assert counter.frame_count == 2
