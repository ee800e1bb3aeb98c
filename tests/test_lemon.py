"""LEMON (upcycle.grow): losslessness per family and case, gradients and symmetry breaking
after one step, round trip through from_pretrained, the real MiniLM, baselines, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.grow import (
    example_inputs,
    expand,
    expand_aki,
    expand_net2net,
    lemon_schedule,
    lemon_train_config,
    max_output_difference,
    plan_expansion,
)
from upcycle.training.schedules import cosine_with_warmup, warmup_decay_factor

transformers = pytest.importorskip("transformers")

FAMILIES = ["bert", "vit", "gpt2", "llama"]
# (case name, target dims); the indivisible width is 32 -> 48 (k=1, r=16) for the pre-LN and
# RMSNorm families; BERT is post-LN, where only multiples are lossless (refused otherwise).
CASES = {
    "width": {"hidden_size": 64},
    "depth": {"num_layers": 4},
    "both": {"hidden_size": 64, "num_layers": 4},
    "indivisible": {"hidden_size": 48, "num_layers": 3},
}


def tiny(family: str) -> nn.Module:
    """A tiny task model of the family (hidden 32, 2 layers, 4 heads), norms perturbed so that
    gamma/beta are not the trivial 1/0."""
    T = transformers
    if family == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=32, num_labels=3))
    elif family == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            image_size=8, patch_size=4, num_channels=1, num_labels=3))
    elif family == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4,
                                                n_positions=32))
    else:
        model = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=37, max_position_embeddings=32))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _fp64_rmsnorm(monkeypatch):
    """HF's LlamaRMSNorm computes in float32 even for float64 inputs; for the fp64 proof of
    the RMSNorm rule (eps* = eta^2 eps) use the same formula in float64."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def _loss(model, family, inputs):
    out = model(**inputs)
    logits = out.logits
    if family in ("gpt2", "llama"):
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           inputs["input_ids"][:, 1:].reshape(-1))
    labels = torch.arange(logits.shape[0]) % logits.shape[-1]
    return nn.functional.cross_entropy(logits, labels)


# -- losslessness -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp64_lossless(family, case, monkeypatch):
    if family == "bert" and case == "indivisible":
        pytest.skip("post-LN: indivisible widths are refused (test_post_ln_refuses_...)")
    if family == "llama":
        _fp64_rmsnorm(monkeypatch)
    source = tiny(family).double()
    grown = expand(source, **CASES[case], seed=1)
    for seed in (0, 1):
        result = max_output_difference(source, grown, example_inputs(source, seed=seed))
        # post-LN BERT depth is exact up to an eps/Var term (eps = 1e-12): same bound holds
        assert result["max_abs"] <= 1e-10, result
        assert result["argmax_equal"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_lossless_same_argmax_and_loss(family, case):
    if family == "bert" and case == "indivisible":
        pytest.skip("post-LN: indivisible widths are refused")
    source = tiny(family)
    grown = expand(source, **CASES[case], seed=2)
    inputs = example_inputs(source, seed=3)
    result = max_output_difference(source, grown, inputs)
    assert result["max_rel"] <= 1e-5, result
    assert result["argmax_equal"]
    with torch.no_grad():
        assert _loss(source, family, inputs).item() == pytest.approx(
            _loss(grown, family, inputs).item(), rel=1e-5, abs=1e-6)


def test_post_ln_depth_tolerance_is_the_eps_term():
    """Post-LN depth: the only error is re-normalising a normalised vector, ~eps/Var. With a
    large eps (1e-5) it becomes visible and stays of that order; with BERT's 1e-12 it vanishes."""
    T = transformers
    for eps, bound in ((1e-12, 1e-10), (1e-5, 1e-3)):
        source = T.BertModel(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=37,
                                          layer_norm_eps=eps)).double().eval()
        grown = expand(source, num_layers=4)
        diff = max_output_difference(source, grown, example_inputs(source))["max_abs"]
        assert diff <= bound


def test_llama_gqa_structure():
    source = tiny("llama")
    grown = expand(source, hidden_size=64)
    assert grown.config.num_attention_heads == 8
    assert grown.config.num_key_value_heads == 4  # query groups of 2 kept with their KV head
    assert grown.config.head_dim == 8
    assert grown.config.rms_norm_eps == pytest.approx(source.config.rms_norm_eps)
    g48 = expand(source, hidden_size=48)
    assert g48.config.rms_norm_eps == pytest.approx(source.config.rms_norm_eps * 32 / 48)


def test_gpt2_tied_embeddings_stay_tied():
    grown = expand(tiny("gpt2"), hidden_size=64, num_layers=4)
    assert grown.lm_head.weight is grown.transformer.wte.weight


# -- training: gradients and symmetry breaking ------------------------------------------------

def _mlp_in(model, family, layer):
    base = {"bert": lambda m: m.bert.encoder.layer, "vit": lambda m: m.vit.layers,
            "gpt2": lambda m: m.transformer.h, "llama": lambda m: m.model.layers}[family](model)
    block = base[layer]
    return {"bert": lambda b: b.intermediate.dense, "vit": lambda b: b.mlp.fc1,
            "gpt2": lambda b: b.mlp.c_fc, "llama": lambda b: b.mlp.up_proj}[family](block)


def _q_proj(model, family, layer):
    base = {"bert": lambda m: m.bert.encoder.layer, "vit": lambda m: m.vit.layers,
            "gpt2": lambda m: m.transformer.h, "llama": lambda m: m.model.layers}[family](model)
    block = base[layer]
    return {"bert": lambda b: b.attention.self.query, "vit": lambda b: b.attention.q_proj,
            "gpt2": lambda b: b.attn.c_attn, "llama": lambda b: b.self_attn.q_proj}[family](block)


def _activations(model, family, layer, inputs, pick=_mlp_in):
    captured = {}
    module = pick(model, family, layer)
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return captured["out"].double()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["width", "depth", "indivisible"])
def test_one_step_gradients_and_symmetry_breaking(family, case):
    if family == "bert" and case == "indivisible":
        pytest.skip("post-LN: indivisible widths are refused")
    source = tiny(family)
    grown = expand(source, **CASES[case], seed=3)
    plan = grown.growth_plan
    inputs = example_inputs(source, batch=4, seed=4)
    # the pair of copies to watch: in a width case neuron 0 of layer 0 and its copy f; in the
    # depth case the first new block (target layer 1), whose neurons j and j + m are copies
    f, F = plan.intermediate
    if case == "depth":
        layer, a, b = 1, 0, min(f, F // 2)
    else:
        layer, a, b = 0, 0, f
    before = _activations(grown, family, layer, inputs)
    assert torch.allclose(before[..., a], before[..., b], atol=1e-5)

    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    loss = _loss(grown, family, inputs)
    loss.backward()
    dead = [n for n, p in grown.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    if family == "bert":  # the token-type embedding of type 1 is unused, but not the tensor
        dead = [n for n in dead if "token_type" not in n]
    assert not dead, f"parameters without gradient: {dead}"
    optimizer.step()
    after = _activations(grown, family, layer, inputs)
    assert (after[..., a] - after[..., b]).abs().max() > 1e-6, "neuron copies still equal"

    # the same for a head and its copy (query projections): head 0 and head 2 in the depth
    # case's new block (pairs), head 0 and head h (= 4) in the width cases
    hd = plan.head_dim
    head_b = 2 if case == "depth" else plan.heads[0]
    grown_before = expand(source, **CASES[case], seed=3)
    for model, should_differ in ((grown_before, False), (grown, True)):
        q = _activations(model, family, layer, inputs, pick=_q_proj)
        diff = (q[..., :hd] - q[..., head_b * hd:(head_b + 1) * hd]).abs().max()
        assert (diff > 1e-6) == should_differ, (should_differ, float(diff))


def test_net2net_copies_stay_symmetric_and_new_blocks_start_dead():
    """The baseline LEMON improves on: equal splits give identical copies forever, and
    all-zero output projections leave the new block's Q/K/V without gradient at step 1."""
    source = tiny("gpt2")
    grown = expand_net2net(source, hidden_size=64, num_layers=4)
    assert max_output_difference(source, grown, example_inputs(source))["max_rel"] < 1e-5
    inputs = example_inputs(source, batch=4)
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    _loss(grown, "gpt2", inputs).backward()
    assert not grown.transformer.h[1].attn.c_attn.weight.grad.abs().sum()
    optimizer.step()
    acts = _activations(grown, "gpt2", 0, inputs)
    f = 128
    assert torch.allclose(acts[..., 0], acts[..., f], atol=1e-6)


def test_aki_is_lossy_but_valid():
    source = tiny("vit")
    grown = expand_aki(source, hidden_size=64, num_layers=4)
    diff = max_output_difference(source, grown, example_inputs(source))
    assert diff["max_abs"] > 1e-4
    assert grown.config.hidden_size == 64 and grown.config.num_hidden_layers == 4


def test_seeded():
    source = tiny("gpt2")
    a = expand(source, hidden_size=64, seed=5).state_dict()
    b = expand(source, hidden_size=64, seed=5).state_dict()
    c = expand(source, hidden_size=64, seed=6).state_dict()
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])


# -- saving ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_from_pretrained(family, tmp_path):
    source = tiny(family)
    grown = expand(source, hidden_size=64, num_layers=3)
    grown.save_pretrained(tmp_path)
    loaded = type(grown).from_pretrained(tmp_path).eval()
    inputs = example_inputs(source)
    with torch.no_grad():
        assert torch.equal(grown(**inputs).logits, loaded(**inputs).logits)
    assert max_output_difference(source, loaded, inputs)["max_rel"] <= 1e-5


# -- the real MiniLM ---------------------------------------------------------------------------

@pytest.mark.slow
def test_real_minilm_keeps_sentence_embeddings(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    source = AutoModel.from_pretrained(minilm_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    grown = expand(source, hidden_size=768, num_layers=12)
    assert (grown.config.hidden_size, grown.config.num_hidden_layers) == (768, 12)
    assert grown.config.num_attention_heads == 24 and grown.config.intermediate_size == 3072
    sentences = ["A man is eating food.",
                 "Lossless growth keeps what the model knew, then trains it for fewer steps."]
    enc = tokenizer(sentences,
                    padding=True, return_tensors="pt")
    with torch.no_grad():
        small = source(**enc).last_hidden_state
        big = grown(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    emb_small = (small * mask).sum(1) / mask.sum(1)
    emb_big = (big * mask).sum(1) / mask.sum(1)
    # the grown stream carries 2 copies of each channel: de-duplicate by averaging the copies
    dedup = emb_big.view(emb_big.shape[0], 2, 384).mean(1)
    cos = nn.functional.cosine_similarity(emb_small, dedup)
    assert torch.all(cos >= 1 - 1e-6), cos
    assert torch.allclose(emb_big[:, :384], emb_big[:, 384:], atol=1e-5)


# -- the learning-rate recipe --------------------------------------------------------------------

def test_lemon_schedule_keeps_peak_and_decays_fully():
    p = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([p], lr=123.0)
    scheduler = lemon_schedule(optimizer, peak_lr=1e-3, warmup_steps=10, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[0] < lrs[9] and lrs[-1] < 1e-5
    config = lemon_train_config(1000, peak_lr=2e-3, warmup_steps=50, budget=0.55)
    assert (config.max_steps, config.lr, config.warmup_steps) == (550, 2e-3, 50)
    assert config.train_config().max_steps == 550
    with pytest.raises(UpcycleError, match="budget"):
        lemon_train_config(1000, peak_lr=1e-3, warmup_steps=5, budget=1.5)


# -- bad input ---------------------------------------------------------------------------------

def test_smaller_target_refused():
    with pytest.raises(UpcycleError, match="hidden_size.*smaller"):
        expand(tiny("vit"), hidden_size=16)
    with pytest.raises(UpcycleError, match="num_layers.*smaller"):
        expand(tiny("vit"), num_layers=1)
    with pytest.raises(UpcycleError, match="intermediate_size.*smaller"):
        expand(tiny("vit"), intermediate_size=8)


def test_hidden_not_multiple_of_head_dim_refused():
    with pytest.raises(UpcycleError, match="hidden_size.*multiple of head_dim 8"):
        expand(tiny("gpt2"), hidden_size=50)
    with pytest.raises(UpcycleError, match="num_heads"):
        expand(tiny("gpt2"), hidden_size=64, num_heads=4)


def test_depth_beyond_twice_refused_with_stages_hint():
    source = tiny("gpt2")
    with pytest.raises(UpcycleError, match="num_layers.*twice.*stages"):
        expand(source, num_layers=5)
    staged = expand(expand(source, num_layers=4), num_layers=8)  # in stages: fine
    assert max_output_difference(source, staged, example_inputs(source))["max_rel"] <= 1e-5


def test_post_ln_refuses_indivisible_width():
    with pytest.raises(UpcycleError, match="post-LN.*multiples"):
        expand(tiny("bert"), hidden_size=48)


def test_unsupported_family_names_supported_ones():
    T = transformers
    model = T.BloomModel(T.BloomConfig(vocab_size=50, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UpcycleError, match="unsupported family 'bloom'.*BERT.*ViT.*GPT-2.*Llama"):
        expand(model, hidden_size=64)
    with pytest.raises(UpcycleError, match="unsupported family"):
        expand(nn.Linear(3, 3), hidden_size=64)


def test_gqa_group_mismatch_refused():
    with pytest.raises(UpcycleError, match="num_heads.*query-group size 2"):
        plan_expansion(tiny("llama"), hidden_size=40, num_heads=5)


def test_dropout_in_train_mode_refused():
    source = tiny("bert")
    grown = expand(source, hidden_size=64)
    grown.train()
    with pytest.raises(UpcycleError, match="train mode with dropout.*eval"):
        max_output_difference(source, grown, example_inputs(source))
    grown.eval()
    assert max_output_difference(source, grown, example_inputs(source))["max_rel"] <= 1e-5


def test_unknown_method_refused():
    with pytest.raises(UpcycleError, match="method"):
        expand(tiny("gpt2"), hidden_size=64, method="ligo")


def _lrs(optimizer, scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup, total, min_ratio", [(0, 1, 0.0), (3, 20, 0.0), (10, 100, 0.1),
                                                      (25, 20, 0.0), (5, 7, 0.3)])
def test_one_warmup_decay_formula_for_trainer_soups_and_lemon(warmup, total, min_ratio):
    """cosine_with_warmup (Trainer, learned soups, MEHL) and lemon_schedule (cosine) are the
    same schedule, both warmup_decay_factor; it is today's formula, step for step."""
    def today(step, decay):  # the two formulas as they were written before they were one
        t, w = max(1, total), max(0, min(warmup, max(1, total)))
        if step < w:
            return (step + 1) / (w + 1)
        progress = min(1.0, (step - w) / max(1, t - w))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    steps = total + 5
    for decay in ("cosine", "linear"):
        assert [warmup_decay_factor(s, warmup, total, decay, min_ratio) for s in range(steps)] \
            == [today(s, decay) for s in range(steps)]
    p = nn.Parameter(torch.zeros(1))
    opt_a = torch.optim.SGD([p], lr=1e-3)
    trainer_like = _lrs(opt_a, cosine_with_warmup(opt_a, warmup, total, min_ratio), steps)
    opt_b = torch.optim.SGD([p], lr=5.0)
    lemon = _lrs(opt_b, lemon_schedule(opt_b, peak_lr=1e-3, warmup_steps=warmup,
                                       total_steps=total, min_lr_ratio=min_ratio), steps)
    assert trainer_like == lemon
    assert trainer_like == [1e-3 * today(s, "cosine") for s in range(steps)]
