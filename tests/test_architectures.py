"""The architecture map (upcycle.models: families, matching, backbone) and LEMON on every
family and head it lists: fp64 losslessness per family x case, heads and bare backbones, reload
with from_pretrained of the model's own class, structural matching of clones, the map's view of
a layer call (what SHERL runs) and of fused projections (what SNELL slices), and every
refusal."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from upcycle.cli.main import main
from upcycle.errors import UpcycleError
from upcycle.grow import (
    example_inputs,
    expand,
    lemon_schedule,
    lemon_train_config,
    max_output_difference,
    plan_expansion,
)
from upcycle.models.backbone import (
    base_model,
    call_layer,
    classification_logits,
    embed,
    final_norm_module,
    layer_kwargs,
    layer_list,
    layer_mask,
)
from upcycle.models.families import ARCHITECTURES
from upcycle.models.matching import (
    architecture_of,
    fused_layouts,
    model_fused_layouts,
    sizes_of,
    snell_target_modules,
)

T = pytest.importorskip("transformers")

TEXT = dict(vocab_size=50)


def _cfg(family: str, **over):
    """A tiny config of the family: hidden 32, 2 layers, 4 heads (GQA 4/2 where it exists)."""
    if family == "bert":
        c = T.BertConfig(**TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=32, num_labels=3)
    elif family == "roberta":
        c = T.RobertaConfig(**TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=40, num_labels=3,
                            pad_token_id=1)
    elif family == "distilbert":
        c = T.DistilBertConfig(**TEXT, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                               max_position_embeddings=32, num_labels=3)
    elif family == "vit":
        c = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, image_size=8, patch_size=4, num_channels=1,
                        num_labels=3)
    elif family == "gpt2":
        c = T.GPT2Config(**TEXT, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=3,
                         pad_token_id=0)
    elif family in ("llama", "mistral"):
        cls = T.LlamaConfig if family == "llama" else T.MistralConfig
        c = cls(**TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=37, max_position_embeddings=32,
                num_labels=3, pad_token_id=0)
    elif family == "qwen2":
        c = T.Qwen2Config(**TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=37, max_position_embeddings=32,
                          tie_word_embeddings=True, num_labels=3, pad_token_id=0,
                          use_sliding_window=True, sliding_window=64, max_window_layers=1)
    elif family == "phi3":
        c = T.Phi3Config(**TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37, max_position_embeddings=32,
                         original_max_position_embeddings=32, num_labels=3, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    elif family == "gpt_neox":
        c = T.GPTNeoXConfig(**TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=32, rotary_pct=0.5,
                            num_labels=3, pad_token_id=0, use_parallel_residual=True)
    else:
        raise KeyError(family)
    for key, value in over.items():
        setattr(c, key, value)
    return c


# the main task model of each family
MAIN = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
        "distilbert": "DistilBertForSequenceClassification", "vit": "ViTForImageClassification",
        "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
POST_LN = {"bert", "roberta", "distilbert"}
NEW_FAMILIES = ["roberta", "distilbert", "mistral", "qwen2", "phi3", "gpt_neox"]
CASES = {"width": {"hidden_size": 64}, "depth": {"num_layers": 4},
         "both": {"hidden_size": 64, "num_layers": 4},
         "indivisible": {"hidden_size": 48, "num_layers": 3}}


def build(cls_name: str, family: str, dtype=torch.float64, **kwargs) -> nn.Module:
    """A tiny model of class ``cls_name``, 1-D parameters perturbed (gamma/beta not 1/0)."""
    torch.manual_seed(0)
    config = _cfg(family)
    if "QuestionAnswering" in cls_name:
        config.num_labels = 2  # start and end logits
    model = getattr(T, cls_name)(config, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype).eval()


@pytest.fixture(autouse=True)
def fp64_rmsnorm(monkeypatch):
    """HF's RMSNorms compute in float32 even for float64 inputs; for the fp64 proof use the
    same formula in float64 (every family's copy of it)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.qwen2 import modeling_qwen2

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    for module, name in ((modeling_llama, "LlamaRMSNorm"), (modeling_mistral, "MistralRMSNorm"),
                         (modeling_qwen2, "Qwen2RMSNorm"), (modeling_phi3, "Phi3RMSNorm")):
        monkeypatch.setattr(getattr(module, name), "forward", forward)


def _check(source, grown, bound=1e-10):
    for seed in (0, 1):
        result = max_output_difference(source, grown, example_inputs(source, seed=seed))
        assert result["max_abs"] <= bound, result
        assert result["argmax_equal"]


def _reload(grown, tmp_path, source):
    grown.save_pretrained(tmp_path)
    loaded = type(grown).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded) is type(grown)
    _check(source, loaded)


# -- every family x case, fp64 ------------------------------------------------------------------

@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_family_lossless_fp64(family, case, tmp_path):
    source = build(MAIN[family], family)
    if family in POST_LN and case == "indivisible":
        with pytest.raises(UpcycleError, match="post-LN.*nearest valid: 32 or 64"):
            expand(source, **CASES[case])
        return
    grown = expand(source, **CASES[case], seed=1)
    _check(source, grown)
    if case == "both":
        _reload(grown, tmp_path, source)


def test_qwen2_depth_extends_layer_types():
    source = build("Qwen2ForCausalLM", "qwen2")
    assert source.config.layer_types == ["full_attention", "sliding_attention"]
    grown = expand(source, num_layers=4)
    # layers 0, 1, 1' (new block after 1): ... follow their source layer
    assert grown.config.layer_types == ["full_attention", "full_attention",
                                        "sliding_attention", "sliding_attention"]
    assert grown.lm_head.weight is grown.model.embed_tokens.weight  # tied in small sizes
    assert grown.model.layers[0].self_attn.q_proj.bias is not None


def test_phi3_fused_sizes_with_gqa():
    source = build("Phi3ForCausalLM", "phi3")
    grown = expand(source, hidden_size=64)
    assert grown.config.num_key_value_heads == 4
    assert grown.model.layers[0].self_attn.qkv_proj.weight.shape == (64 + 32 + 32, 64)
    assert grown.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * 74, 64)


# -- heads and bare backbones -------------------------------------------------------------------

HEADS = [
    ("bert", "BertModel", {}), ("bert", "BertModel", {"add_pooling_layer": False}),
    ("bert", "BertForMaskedLM", {}), ("bert", "BertForTokenClassification", {}),
    ("bert", "BertForQuestionAnswering", {}), ("bert", "BertForPreTraining", {}),
    ("roberta", "RobertaModel", {}), ("roberta", "RobertaForMaskedLM", {}),
    ("roberta", "RobertaForTokenClassification", {}),
    ("roberta", "RobertaForQuestionAnswering", {}),
    ("distilbert", "DistilBertModel", {}), ("distilbert", "DistilBertForMaskedLM", {}),
    ("distilbert", "DistilBertForQuestionAnswering", {}),
    ("distilbert", "DistilBertForTokenClassification", {}),
    ("vit", "ViTModel", {}),
    ("gpt2", "GPT2Model", {}), ("gpt2", "GPT2ForSequenceClassification", {}),
    ("gpt2", "GPT2ForTokenClassification", {}), ("gpt2", "GPT2ForQuestionAnswering", {}),
    ("llama", "LlamaModel", {}), ("llama", "LlamaForSequenceClassification", {}),
    ("llama", "LlamaForTokenClassification", {}), ("llama", "LlamaForQuestionAnswering", {}),
    ("qwen2", "Qwen2ForSequenceClassification", {}), ("phi3", "Phi3ForTokenClassification", {}),
    ("gpt_neox", "GPTNeoXModel", {}), ("gpt_neox", "GPTNeoXForSequenceClassification", {}),
    ("gpt_neox", "GPTNeoXForQuestionAnswering", {}),
]


@pytest.mark.parametrize("family, cls_name, kwargs", HEADS,
                         ids=[f"{c}{'-nopool' if k else ''}" for _, c, k in HEADS])
def test_heads_and_bare_models_lossless_and_reload(family, cls_name, kwargs, tmp_path):
    source = build(cls_name, family, **kwargs)
    grown = expand(source, hidden_size=64, num_layers=3, seed=2)
    _check(source, grown)
    if kwargs:  # saved without a pooler: its own class reloads it with a fresh pooler
        grown.save_pretrained(tmp_path)
        loaded = type(grown).from_pretrained(tmp_path, dtype=torch.float64).eval()
        inputs = example_inputs(source)
        with torch.no_grad():
            assert torch.equal(grown(**inputs).last_hidden_state,
                               loaded(**inputs).last_hidden_state)
        return
    _reload(grown, tmp_path, source)


def test_tied_mlm_head_stays_tied():
    grown = expand(build("BertForMaskedLM", "bert"), hidden_size=64)
    assert grown.cls.predictions.decoder.weight is grown.bert.embeddings.word_embeddings.weight


def test_head_lemon_cannot_grow_is_named():
    source = build("GPT2DoubleHeadsModel", "gpt2")
    with pytest.raises(UpcycleError, match="multiple_choice_head.summary.weight"):
        expand(source, hidden_size=64)


# -- structural matching ------------------------------------------------------------------------

def test_llama_clone_matched_by_structure():
    source = build("LlamaForCausalLM", "llama")
    source.config.model_type = "my-llama"  # an unknown type with Llama's layout
    match = architecture_of(source)
    assert match.by_structure and match.arch.name == "llama"
    grown = expand(source, hidden_size=64, num_layers=3)
    assert grown.growth_plan.by_structure
    assert "matched by structure" in grown.growth_plan.describe()
    _check(source, grown)


def test_gemma_is_not_a_llama_clone():
    """Gemma's tensors are named like Llama's, but its RMSNorm computes x (1 + w)."""
    c = T.GemmaConfig(**TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=37, head_dim=8)
    model = T.GemmaForCausalLM(c).eval()
    with pytest.raises(UpcycleError, match="unsupported family 'gemma'.*Llama.*GPT-NeoX"):
        expand(model, hidden_size=64)


def test_unsupported_family_names_supported_ones():
    model = T.BloomModel(T.BloomConfig(**TEXT, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UpcycleError, match="unsupported family 'bloom'; LEMON supports "
                                           "BERT/MiniLM.*RoBERTa.*Phi-3.*GPT-NeoX"):
        expand(model, hidden_size=64)


# -- widths that break a family's constraint ----------------------------------------------------

@pytest.mark.parametrize("family, dims, message", [
    ("gpt2", {"hidden_size": 50}, "hidden_size: 50 is not a multiple of head_dim 8.*nearest "
                                  "valid hidden_size: 48 or 56"),
    ("llama", {"hidden_size": 40}, "num_heads: 5 is not a multiple of the query-group size 2.*"
                                   "nearest valid num_heads: 4 or 6 \\(hidden_size 32 or 48\\)"),
    ("phi3", {"hidden_size": 56}, "query-group size 2.*hidden_size 48 or 64"),
    ("llama", {"hidden_size": 64, "num_heads": 6}, "num_heads: 6 heads x head_dim 8 = 48.*"
                                                   "pass num_heads=8"),
    ("distilbert", {"hidden_size": 48}, "post-LN.*nearest valid: 32 or 64"),
])
def test_bad_widths_name_the_nearest_valid_value(family, dims, message):
    with pytest.raises(UpcycleError, match=message):
        plan_expansion(build(MAIN[family], family, torch.float32), **dims)


def test_fused_slice_sizes_checked():
    arch = ARCHITECTURES["phi3"]
    source = build("Phi3ForCausalLM", "phi3", torch.float32)
    layout = fused_layouts(arch, sizes_of(source.config, arch))["self_attn.qkv_proj"]
    with pytest.raises(UpcycleError, match="self_attn.qkv_proj.*65 output rows, expected "
                                           "32 \\+ 16 \\+ 16 = 64"):
        layout.split(torch.zeros(65, 32))


# -- the map as SHERL reads it: running a backbone layer by layer ------------------------------

@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_map_runs_the_backbone_like_hf(family):
    """embed -> every layer (with the map's mask and rotary position_embeddings) -> final norm
    equals the HF model's last hidden state at every real token."""
    model = build(MAIN[family], family)
    inputs = example_inputs(model, seed=5)
    if "input_ids" in inputs:
        inputs["attention_mask"][-1, 12:] = 0  # a padded row, decoders included
    match = architecture_of(model)
    with torch.no_grad():
        want = base_model(model, match)(**inputs).last_hidden_state
        hidden = embed(model, inputs, match)
        token_mask = inputs.get("attention_mask")
        kwargs = layer_kwargs(model, hidden, layer_mask(model, hidden, token_mask, match),
                              match=match)
        for layer in layer_list(model, match):
            hidden = call_layer(layer, hidden, kwargs)
        norm = final_norm_module(model, match)
        if norm is not None:
            hidden = norm(hidden)
    real = token_mask.bool() if token_mask is not None else torch.ones(hidden.shape[:2],
                                                                        dtype=torch.bool)
    assert (hidden - want)[real].abs().max() <= 1e-10


CLASSIFIERS = {"bert": "BertForSequenceClassification",
               "roberta": "RobertaForSequenceClassification",
               "distilbert": "DistilBertForSequenceClassification",
               "vit": "ViTForImageClassification", "gpt2": "GPT2ForSequenceClassification",
               "llama": "LlamaForSequenceClassification",
               "mistral": "MistralForSequenceClassification",
               "qwen2": "Qwen2ForSequenceClassification",
               "phi3": "Phi3ForSequenceClassification",
               "gpt_neox": "GPTNeoXForSequenceClassification"}


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_map_runs_the_classifier_like_hf(family):
    """The whole piecewise route SHERL takes (embed, layers, final norm, classification head)
    gives the HF classifier's logits, with a right-padded row for text models."""
    model = build(CLASSIFIERS[family], family)
    inputs = example_inputs(model, seed=6)
    if "input_ids" in inputs:
        inputs["attention_mask"][-1, 10:] = 0
        inputs["input_ids"][-1, 10:] = model.config.pad_token_id or 0
        inputs["input_ids"][:, :10].clamp_(min=3)
    match = architecture_of(model)
    with torch.no_grad():
        want = model(**inputs).logits
        hidden = embed(model, inputs, match)
        kwargs = layer_kwargs(model, hidden, layer_mask(model, hidden,
                                                        inputs.get("attention_mask"), match),
                              match=match)
        for layer in layer_list(model, match):
            hidden = call_layer(layer, hidden, kwargs)
        norm = final_norm_module(model, match)
        hidden = norm(hidden) if norm is not None else hidden
        got = classification_logits(model, hidden, inputs, match)
    assert (got - want).abs().max() <= 1e-10


def test_llama_map_names_rotary_and_rmsnorm():
    arch = ARCHITECTURES["llama"]
    assert arch.call.rotary == "rotary_emb" and arch.norm == "rmsnorm"
    model = build("LlamaForSequenceClassification", "llama")
    assert type(final_norm_module(model)).__name__ == "LlamaRMSNorm"


# -- the map as SNELL reads it: default targets, fused slices ------------------------------------

@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_snell_targets_match_linear_modules(family):
    """The default targets (suffix-matched, as SNELL matches them) select exactly every
    layer's attention and MLP projections."""
    model = build(MAIN[family], family, torch.float32)
    match = architecture_of(model)
    names = dict(model.named_modules())
    hits = {n for n in names for t in snell_target_modules(match.arch) if n.endswith("." + t)}
    layers = f"{match.prefix}{match.arch.layers}"
    assert hits == {f"{layers}.{i}.{m}" for i in range(2) for m in match.arch.layer_modules()}
    assert all(names[n].weight.ndim == 2 for n in hits)


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gpt_neox"])
def test_fused_layout_splits_like_the_model(family):
    """q/k/v rows from the layout equal what the HF attention computes from the fused output."""
    model = build(MAIN[family], family, torch.float32)
    layouts = model_fused_layouts(model)
    name = next(n for n in layouts if n.endswith(("c_attn", "qkv_proj", "query_key_value")))
    module = dict(model.named_modules())[name]
    x = torch.randn(3, 32)
    y = module(x)
    q, k, v = layouts[name].split(y, dim=-1)
    hd = 8
    if family == "gpt_neox":  # HF: view(..., heads, 3 * head_dim).chunk(3)
        ref = y.view(3, 4, 3 * hd).chunk(3, dim=-1)
        ref = [t.reshape(3, -1) for t in ref]
    elif family == "phi3":  # HF: q = [:h hd], k, v = the next kv hd each
        ref = [y[:, :32], y[:, 32:48], y[:, 48:]]
    else:  # GPT-2: split(n_embd)
        ref = y.split(32, dim=-1)
    for mine, theirs in zip((q, k, v), ref):
        assert torch.equal(mine, theirs)
    joined = layouts[name].join([q, k, v], dim=-1)
    assert torch.equal(joined, y)
    if family == "phi3":
        gate_up = layouts[name.replace("self_attn.qkv_proj", "mlp.gate_up_proj")]
        assert gate_up.sizes == (37, 37) and gate_up.parts == ("gate", "up")


# -- the recipe ----------------------------------------------------------------------------------

def test_linear_and_cosine_decay_fresh_state():
    p = nn.Parameter(torch.ones(2))
    for decay in ("cosine", "linear"):
        optimizer = torch.optim.AdamW([p], lr=9.0)
        p.grad = torch.ones(2)
        optimizer.step()
        assert optimizer.state
        scheduler = lemon_schedule(optimizer, peak_lr=1e-3, warmup_steps=4, total_steps=20,
                                   decay=decay)
        assert not optimizer.state  # a fresh optimizer state
        lrs = []
        for _ in range(20):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < 1e-4
        mid = lrs[4 + 8]  # halfway through the decay
        assert mid == pytest.approx(1e-3 * (0.5 if decay == "linear" else 0.5), rel=1e-6)
        if decay == "linear":
            assert lrs[6] - lrs[7] == pytest.approx(lrs[10] - lrs[11])
    recipe = lemon_train_config(1000, peak_lr=2e-3, warmup_steps=50, decay="linear")
    assert recipe.training_arguments() == {"max_steps": 550, "learning_rate": 2e-3,
                                           "warmup_steps": 50, "lr_scheduler_type": "linear"}
    with pytest.raises(UpcycleError, match="decay must be one of cosine, linear"):
        lemon_train_config(1000, peak_lr=1e-3, warmup_steps=5, decay="step")


# -- grow: every failure is one error line, exit 2, nothing written -----------------------------

def _grow(tmp_path, model_dir, *extra):
    out = tmp_path / "out"
    code = main(["grow", "--model", str(model_dir), "--out", str(out), "--hidden-size", "64",
                 *extra])
    return code, out


def test_cli_unknown_model_type(tmp_path, capsys):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    code, out = _grow(tmp_path, folder)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("upcycle grow: error:") and len(err.strip().splitlines()) == 1
    assert "model_type 'no-such-model'" in err and "GPT-NeoX" in err


def test_cli_folder_without_weights(tmp_path, capsys):
    folder = tmp_path / "empty"
    _cfg("gpt2").save_pretrained(folder)
    code, out = _grow(tmp_path, folder)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "no weights" in err and len(err.strip().splitlines()) == 1


def test_cli_unsupported_family(tmp_path, capsys):
    folder = tmp_path / "bloom"
    T.BloomModel(T.BloomConfig(**TEXT, hidden_size=32, n_layer=1, n_head=4)).save_pretrained(
        folder)
    code, out = _grow(tmp_path, folder)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "unsupported family 'bloom'" in err and "Qwen2" in err


def test_cli_grows_a_new_family(tmp_path, capsys):
    folder = tmp_path / "neox"
    build("GPTNeoXForCausalLM", "gpt_neox", torch.float32).save_pretrained(folder)
    code, out = _grow(tmp_path, folder, "--layers", "3")
    assert code == 0, capsys.readouterr().err
    grown = T.GPTNeoXForCausalLM.from_pretrained(out)
    assert grown.config.hidden_size == 64 and grown.config.num_hidden_layers == 3


def test_cli_train_needs_scratch_recipe(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    build("GPT2LMHeadModel", "gpt2", torch.float32).save_pretrained(folder)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    code, out = _grow(tmp_path, folder, "--train", str(data), "--steps", "2")
    assert code == 2 and not out.exists()
    assert "--scratch-lr: required with --train" in capsys.readouterr().err


# -- more of the same machinery on the new families ----------------------------------------------

@pytest.mark.parametrize("family, tied", [("llama", True), ("qwen2", False), ("gpt_neox", True),
                                          ("phi3", True)])
def test_causal_lm_heads_tied_or_not(family, tied, tmp_path):
    torch.manual_seed(0)
    model = getattr(T, MAIN[family])(_cfg(family, tie_word_embeddings=tied)).double().eval()
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is emb.weight) == tied
    grown = expand(model, hidden_size=48, num_layers=3)
    assert (grown.get_output_embeddings().weight is grown.get_input_embeddings().weight) == tied
    _check(model, grown)
    _reload(grown, tmp_path, model)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_grown_parameter_gets_a_gradient(family):
    """No dead copy and no dead new block in any new family (fp32, one backward)."""
    source = build(MAIN[family], family, torch.float32)
    grown = expand(source, hidden_size=64, num_layers=4, seed=3)
    inputs = example_inputs(source, batch=4, seed=4)
    out = grown(**inputs, labels=inputs["input_ids"] if MAIN[family].endswith("CausalLM")
                else torch.arange(4) % 3)
    out.loss.backward()
    dead = [n for n, p in grown.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not [n for n in dead if "token_type" not in n], dead


def test_a_clone_that_computes_something_else_is_refused():
    """Same tensors as Llama, but the embedding output is scaled (as Gemma's is): the grown
    model (a plain Llama) would differ, so structural matching refuses it after checking."""
    source = build("LlamaForCausalLM", "llama", torch.float32)

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    scaled = Scaled(50, 32)
    scaled.weight = source.model.embed_tokens.weight
    source.model.embed_tokens = scaled
    source.config.model_type = "scaled-llama"
    with pytest.raises(UpcycleError, match="'scaled-llama' has the tensor layout of llama but "
                                           "computes something else"):
        expand(source, hidden_size=64)
