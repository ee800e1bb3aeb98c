"""SNELL on every family of the architecture map: the defaults come from the map and adapt
exactly every layer's projections, merged = unmerged, save -> load; fused projections are
sparsified per part (GPT-2's c_attn, Phi-3's GQA qkv_proj and gate_up_proj, GPT-NeoX's
interleaved query_key_value) in the blocked and whole-matrix paths; a causal LM's head stays
frozen; a NaN in A or B reaches the output; the --block-mb flag."""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch

from upcycle.errors import UpcycleError
from upcycle.models.backbone import layer_list
from upcycle.models.families import ARCHITECTURES
from upcycle.models.matching import architecture_of, model_fused_layouts
from upcycle.tune.snell import (
    SnellConfig,
    SnellLayer,
    SnellModel,
    get_snell_model,
    row_parts,
    snell_kernel,
    snell_thresholds,
    sparsify,
)

T = pytest.importorskip("transformers")

TEXT = dict(vocab_size=50)


def _cfg(family: str):
    """Hidden 32, 2 layers, 4 heads (GQA 4/2 where the family has it), intermediate 37."""
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, num_labels=3)
    if family == "bert":
        return T.BertConfig(**TEXT, **common, max_position_embeddings=32)
    if family == "roberta":
        return T.RobertaConfig(**TEXT, **common, max_position_embeddings=40, pad_token_id=1)
    if family == "distilbert":
        return T.DistilBertConfig(**TEXT, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                  max_position_embeddings=32, num_labels=3)
    if family == "vit":
        return T.ViTConfig(**common, image_size=8, patch_size=4, num_channels=1)
    if family == "gpt2":
        return T.GPT2Config(**TEXT, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                            num_labels=3, pad_token_id=0)
    gqa = dict(**TEXT, **common, num_key_value_heads=2, max_position_embeddings=32,
               pad_token_id=0)
    if family == "llama":
        return T.LlamaConfig(**gqa)
    if family == "mistral":
        return T.MistralConfig(**gqa)
    if family == "qwen2":
        return T.Qwen2Config(**gqa)
    if family == "phi3":
        return T.Phi3Config(**gqa, original_max_position_embeddings=32, bos_token_id=1,
                            eos_token_id=2)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(**TEXT, **common, max_position_embeddings=32, rotary_pct=0.5,
                               pad_token_id=0)
    raise KeyError(family)


# the main task model of each family (an LM for the decoders, a classifier otherwise)
MAIN = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
        "distilbert": "DistilBertForSequenceClassification", "vit": "ViTForImageClassification",
        "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
FAMILIES = sorted(ARCHITECTURES)


def build(family: str, cls_name: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return getattr(T, cls_name or MAIN[family])(_cfg(family)).eval()


def inputs_for(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 1, 8, 8, generator=g)}
    return {"input_ids": torch.randint(3, 50, (2, 7), generator=g),
            "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def big_update(model):
    """A larger update than the init's, so merged vs unmerged compares something."""
    with torch.no_grad():
        for layer in model.snell_layers().values():
            layer.snell_B["default"].mul_(3.0)


def cfg(**over):
    base = dict(r=4, sparsity=0.5, dropout=0.0, drop_path=0.0)
    base.update(over)
    return SnellConfig(**base)


# -- defaults from the map ---------------------------------------------------------------------

def expected_targets(model) -> set[str]:
    match = architecture_of(model)
    layers = f"{match.prefix}{match.arch.layers}"
    return {f"{layers}.{i}.{m}" for i in range(len(layer_list(model, match)))
            for m in match.arch.layer_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_adapt_every_layer_projection_merge_and_reload(family, tmp_path):
    model = get_snell_model(build(family), cfg(sparsity=0.6))
    base = model.get_base_model()
    assert set(model.snell_layers()) == expected_targets(base)
    layouts = model_fused_layouts(base)
    for name, layer in model.snell_layers().items():  # the map's parts, or one part
        sizes = layouts[name].sizes if name in layouts else (layer.out_features,)
        assert layer.parts.sizes == sizes, name
    big_update(model)
    model.eval()
    inputs = inputs_for(family)
    unmerged = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=2e-5, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=2e-5, rtol=1e-4)
    reloaded = SnellModel.from_pretrained(build(family), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, inputs), unmerged, atol=1e-6, rtol=0)
    plain = reloaded.merge_and_unload()
    torch.testing.assert_close(logits(plain, inputs), unmerged, atol=2e-5, rtol=1e-4)


def test_electra_and_deit_keep_their_snell_only_defaults():
    config = T.ElectraConfig(**TEXT, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=37,
                             max_position_embeddings=32, num_labels=3)
    deit = T.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, image_size=8, patch_size=4, num_channels=1,
                        num_labels=3)
    for base in (T.ElectraForSequenceClassification(config),
                 T.DeiTForImageClassification(deit)):
        model = get_snell_model(base, cfg())
        assert len(model.snell_layers()) == 12
        # ELECTRA's encoder.layer.N, transformers 5's DeiT layers.N
        assert all(re.search(r"\.(encoder\.layer|layers)\.\d\.", n)
                   for n in model.snell_layers())
        assert "classifier" in model.modules_to_save


def test_unknown_family_asks_for_target_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UpcycleError, match="no default target_modules.*pass target_modules"):
        get_snell_model(model, cfg())


# -- modules_to_save: a language model's head stays frozen ---------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_head_stays_frozen(family):
    model = get_snell_model(build(family), cfg())
    assert not model.modules_to_save
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".snell_" in n for n in trainable)
    adapter_params = sum(layer.snell_A["default"].numel() + layer.snell_B["default"].numel()
                         for layer in model.snell_layers().values())
    assert model.get_nb_trainable_parameters()[0] == adapter_params
    # a classifier of the same family still trains its head
    classifier = get_snell_model(build(family, MAIN[family].split("For")[0].replace(
        "LMHeadModel", "") + "ForSequenceClassification"), cfg())
    assert "score" in classifier.modules_to_save


def test_masked_lm_head_holding_the_output_embedding_stays_frozen():
    model = get_snell_model(build("roberta", "RobertaForMaskedLM"), cfg())
    assert not model.modules_to_save
    assert not model.get_base_model().lm_head.decoder.weight.requires_grad


# -- per-part thresholds on fused projections -----------------------------------------------------

FUSED = [("phi3", "self_attn.qkv_proj", (32, 16, 16)), ("phi3", "mlp.gate_up_proj", (37, 37)),
         ("gpt_neox", "attention.query_key_value", (32, 32, 32)),
         ("gpt2", "attn.c_attn", (32, 32, 32))]


def fused_layer(family, module, mode="reference", block_rows=5, recompute="backward"):
    model = get_snell_model(build(family), cfg(sparsity=0.7, sparsify_mode=mode,
                                               recompute=recompute))
    name = next(n for n in model.snell_layers() if n.endswith(module))
    layer = model.snell_layers()[name]
    layer.block_rows = block_rows  # blocks that cross the parts' boundaries
    idx = model_fused_layouts(model.get_base_model())[name].indices()
    with torch.no_grad():  # the first part's kernel ~100x the others'
        layer.snell_B["default"][:, idx[0]] *= 100.0
        layer.snell_A["default"].mul_(0.01)
    return model, layer, idx


def blocked_delta(layer):
    return torch.cat([d for _, _, d in layer._delta_blocks()])


@pytest.mark.parametrize("family,module,sizes", FUSED)
@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_fused_parts_have_their_own_threshold(family, module, sizes, mode):
    _, layer, idx = fused_layer(family, module, mode)
    assert layer.parts.sizes == sizes
    K = snell_kernel(layer.snell_A["default"].detach(), layer.snell_B["default"].detach(), layer.coeffs())
    scale = [float(K[i].abs().mean()) for i in idx]
    assert scale[0] > 30 * max(scale[1:])  # the parts differ in scale
    blocked = blocked_delta(layer)
    dense = layer.delta_weight().detach()
    assert torch.equal(blocked, dense)  # blocked (threshold, rows) = whole-matrix path
    tau = snell_thresholds(layer.snell_A["default"], layer.snell_B["default"], layer.coeffs(), 0.7, layer.parts,
                           block_rows=3)
    d_in = K.shape[1]
    for p, rows in enumerate(idx):
        n = rows.numel() * d_in
        zeroed = math.floor(0.7 * n + 1e-9)
        part = K[rows].abs()
        want = part.reshape(-1).kthvalue(zeroed).values  # kthvalue on this part alone
        assert tau[p] == want
        kept = blocked[rows] != 0
        assert torch.equal(kept, part > want)  # the per-part mask
        assert int(kept.sum()) == n - zeroed  # equal sparsity in every part
    # one threshold for the whole matrix would keep the big part whole
    single = sparsify(K, 0.7, mode)
    total_kept = K.numel() - math.floor(0.7 * K.numel() + 1e-9)
    assert int((single[idx[0]] != 0).sum()) == min(idx[0].numel() * d_in, total_kept)


@pytest.mark.parametrize("family,module,sizes", FUSED)
def test_fused_blocked_step_equals_whole_matrix_step(family, module, sizes):
    grads = {}
    for recompute in ("backward", "none", "checkpoint"):
        _, layer, _ = fused_layer(family, module, recompute=recompute)
        layer.train()
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2),
                        requires_grad=True)
        y = layer(x)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads[recompute] = (y.detach(), x.grad, layer.snell_A["default"].grad, layer.snell_B["default"].grad)
    for other in ("none", "checkpoint"):
        for mine, theirs in zip(grads["backward"], grads[other]):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_fused_merge_equals_unmerged():
    model, layer, _ = fused_layer("phi3", "self_attn.qkv_proj")
    model.eval()
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=1e-5)


def test_row_parts_refuses_a_bad_split():
    with pytest.raises(UpcycleError, match="each of its 6 output rows once"):
        row_parts([torch.arange(0, 3), torch.arange(2, 6)], 6)
    with pytest.raises(UpcycleError, match="cannot split an output dimension of 7 into 3"):
        row_parts(3, 7)
    runs = row_parts([torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3])], 6).runs
    assert runs == (((0, 2), (4, 6)), ((2, 4),))


# -- a NaN in A or B reaches the output and the loss ----------------------------------------------

@pytest.mark.parametrize("mode", ["reference", "paper"])
@pytest.mark.parametrize("factor", ["snell_A", "snell_B"])
def test_nan_in_a_factor_propagates(mode, factor):
    model = get_snell_model(build("gpt2"), cfg(sparsity=0.9, sparsify_mode=mode, dropout=0.1))
    inputs = inputs_for("gpt2")
    for module in ("attn.c_attn", "mlp.c_fc"):  # three parts, one part
        name = next(n for n in model.snell_layers() if n.endswith(module))
        layer = model.snell_layers()[name]
        with torch.no_grad():
            getattr(layer, factor)["default"][0, 1, 0] = float("nan")  # one entry
        x = torch.randn(2, 3, layer.in_features)
        for recompute in ("backward", "none", "checkpoint"):
            layer.settings().recompute = recompute
            for rows in (64, 5):  # a part in one block (kthvalue), in several (radix select)
                layer.block_rows = rows
                for training in (True, False):
                    layer.train(training)
                    assert torch.isnan(layer(x)).any(), (module, recompute, rows, training)
            model.train()
            assert torch.isnan(model(**inputs, labels=inputs["input_ids"]).loss)
        assert torch.isnan(layer.delta_weight()).any()
        layer.merge()
        assert torch.isnan(layer.base_layer.weight).any()
        layer.unmerge()
        with torch.no_grad():
            getattr(layer, factor)["default"][0, 1, 0] = 0.0
            layer.base_layer.weight.copy_(torch.nan_to_num(layer.base_layer.weight))


def test_nan_in_snell_a_stops_training(tmp_path):
    from transformers import TrainerCallback

    from upcycle.training.config import NonFiniteLossError, TrainingConfig
    from upcycle.training.fit import fit

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                layer = next(iter(model.snell_layers().values()))
                with torch.no_grad():
                    layer.snell_A["default"][0, 0, 0] = float("nan")

    model = get_snell_model(build("bert"), cfg())
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(1, 50, (6,), generator=g),
                 "attention_mask": torch.ones(6, dtype=torch.long), "labels": i % 3}
                for i in range(8)]
    with pytest.raises(NonFiniteLossError, match="training loss became nan at step 2"):
        fit(model, examples, TrainingConfig(max_steps=4, lr=1e-3, batch_size=4, device="cpu",
                                            progress=False, report_to=[]),
            output_dir=None, callbacks=[Poison()])


# -- the CLI flag ---------------------------------------------------------------------------------

def test_block_mb_flag():
    from upcycle.cli.tune import add_tuner_arguments, tuner_config
    from upcycle.tune import TUNERS

    snell = TUNERS["snell"]
    parser = argparse.ArgumentParser()
    add_tuner_arguments(parser.add_argument_group("snell"), snell)
    args = parser.parse_args(["--block-mb", "0.5"])
    model = snell.get_model(build("bert"), tuner_config(snell, args))
    assert model.snell_config.block_mb == 0.5
    assert {layer.settings().block_mb for layer in model.snell_layers().values()} == {0.5}
    assert parser.parse_args([]).block_mb is None  # the device's default
    with pytest.raises(UpcycleError, match="block_mb must be a positive number of MiB, got 0"):
        tuner_config(snell, parser.parse_args(["--block-mb", "0"]))


def test_layer_parts_validate_against_the_module():
    with pytest.raises(UpcycleError, match="module 'x': cannot split an output dimension of 10"):
        SnellLayer(torch.nn.Linear(4, 10), cfg(), parts=3, name="x")
