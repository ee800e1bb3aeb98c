"""SHERL on every family of the architecture map (upcycle.models.families): BERT, RoBERTa,
DistilBERT, ViT, GPT-2, Llama, Mistral, Qwen2, Phi-3, GPT-NeoX. Tiny random classifiers
(hidden 32, 3 layers); fp64 where exactness is checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.models.backbone import layer_windows
from upcycle.models.families import ARCHITECTURES
from upcycle.tune.lst import LstConfig, get_lst_model
from upcycle.tune.sherl import SherlConfig, SherlModel, get_sherl_model

T = pytest.importorskip("transformers")
VOCAB = 60
LENGTH = 9
FAMILIES = sorted(ARCHITECTURES)
DECODERS = ["gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fp64_rmsnorm(monkeypatch):
    """HF's RMSNorms compute in float32 even for float64 inputs: two routes that differ by
    1e-16 before such a norm differ by 1e-7 after it. For the fp64 checks use the same formula
    in float64."""
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


def config_of(family: str, layers: int = 3):
    """A tiny classifier config; the sliding-window families get a window shorter than the
    test sequences (Qwen2: on its last layers only, by layer_types)."""
    common = dict(vocab_size=VOCAB, num_labels=3, pad_token_id=0)
    decoder = dict(common, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
    if family == "bert":
        return T.BertConfig(**common, hidden_size=32, num_hidden_layers=layers,
                            num_attention_heads=4, intermediate_size=48,
                            max_position_embeddings=32)
    if family == "roberta":
        return T.RobertaConfig(**dict(common, pad_token_id=1), hidden_size=32,
                               num_hidden_layers=layers, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=40)
    if family == "distilbert":
        return T.DistilBertConfig(**common, dim=32, n_layers=layers, n_heads=4, hidden_dim=48,
                                  max_position_embeddings=32)
    if family == "vit":
        return T.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=48, image_size=8, patch_size=4, num_channels=1,
                           num_labels=3)
    if family == "gpt2":
        return T.GPT2Config(**common, n_embd=32, n_layer=layers, n_head=4, n_positions=32)
    if family == "llama":
        return T.LlamaConfig(**decoder)
    if family == "mistral":
        return T.MistralConfig(**decoder, sliding_window=4)
    if family == "qwen2":
        return T.Qwen2Config(**decoder, use_sliding_window=True, sliding_window=4,
                             max_window_layers=1)
    if family == "phi3":
        return T.Phi3Config(**decoder, original_max_position_embeddings=32, bos_token_id=1,
                            eos_token_id=2, sliding_window=5)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(**{k: v for k, v in decoder.items() if k != "num_key_value_heads"},
                               rotary_pct=0.5, use_parallel_residual=True)
    raise KeyError(family)


def classifier(family: str, dtype=torch.float32, seed: int = 0, layers: int = 3,
               attention: str | None = None) -> nn.Module:
    """The family's classifier, 1-D parameters perturbed (norms and biases not 1/0)."""
    torch.manual_seed(seed)
    config = config_of(family, layers)
    if attention is not None:
        config._attn_implementation = attention
    cls = T.ViTForImageClassification if family == "vit" else \
        getattr(T, {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert",
                    "gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
                    "phi3": "Phi3", "gpt_neox": "GPTNeoX"}[family] + "ForSequenceClassification")
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype).eval()


def batch_of(model: nn.Module, batch: int = 3, seed: int = 1) -> dict:
    """Text: real ids >= 3 and a right-padded row (pad ids, attention mask 0); ViT: images.
    The padding (3) is shorter than the sliding windows (4, 5): a longer one leaves padded
    queries with no key at all, and HF's eager attention then gives NaN logits."""
    g = torch.Generator().manual_seed(seed)
    if model.config.model_type == "vit":
        return {"pixel_values": torch.randn(batch, 1, 8, 8, generator=g,
                                            dtype=next(model.parameters()).dtype)}
    ids = torch.randint(3, VOCAB, (batch, LENGTH), generator=g)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    mask[1, LENGTH - 3:] = 0
    ids[1, LENGTH - 3:] = model.config.pad_token_id
    return {"input_ids": ids, "attention_mask": mask}


def open_gate(model: SherlModel) -> SherlModel:
    """W_o = 0, b_o = 0, tanh(gamma / 0.1) = 1: the MTSA's output is h_last."""
    with torch.no_grad():
        model.mtsa.up.weight.zero_()
        model.mtsa.up.bias.zero_()
        model.mtsa.skip_gate.fill_(100.0)
    assert float(torch.tanh(model.mtsa.skip_gate.detach() / 0.1)) == 1.0
    return model


# -- the backbone's own logits, exactly --------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_open_gate_and_zero_fusion_reproduce_the_backbone(family, attention):
    base = classifier(family, torch.float64, attention=attention)
    assert base.config._attn_implementation == attention
    batch = batch_of(base)
    with torch.no_grad():
        want = base(**batch).logits
        model = open_gate(get_sherl_model(base, SherlConfig(late_layers=2, reduction=2)))
        got = model(**batch).logits
    assert got.dtype == torch.float64
    assert (got - want).abs().max() <= 1e-10, (got - want).abs().max()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3"])
def test_sliding_windows_are_applied(family):
    """The window matters at this length (the full causal mask gives other logits), and the
    map gives it to exactly the layers HF gives it to."""
    base = classifier(family, torch.float64)
    windows = layer_windows(base)
    assert windows == ([None, 4, 4] if family == "qwen2" else
                       [base.config.sliding_window] * 3)
    batch = batch_of(base)
    model = open_gate(get_sherl_model(base, SherlConfig(late_layers=2)))
    with torch.no_grad():
        want = base(**batch).logits
        model._backbone.windows = [None] * 3  # what ignoring the window would compute
        full = model(**batch).logits
    assert (full - want).abs().max() > 1e-6


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "vit"])
def test_padding_does_not_change_real_tokens(family):
    model = get_sherl_model(classifier(family, torch.float64), SherlConfig(reduction=2)).eval()
    with torch.no_grad():
        model.mtsa.skip_gate.fill_(0.03)  # every part of the MTSA in use
        batch = batch_of(model.base)
        padded = model(**batch).logits[1]
        real = batch["attention_mask"][1].bool()
        alone = model(input_ids=batch["input_ids"][1:2, real],
                      attention_mask=batch["attention_mask"][1:2, real]).logits[0]
    assert (padded - alone).abs().max() <= 1e-10


# -- what trains ---------------------------------------------------------------------------------
@pytest.mark.parametrize("train_late", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_changes_only_the_mtsa_head_and_late_layers(family, train_late):
    model = get_sherl_model(classifier(family), SherlConfig(late_layers=1,
                                                            train_late_layers=train_late))
    model.train()
    backbone = model._backbone
    early_outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: early_outputs.append(o))
             for layer in list(backbone.layers)[:model.num_early]]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(**batch_of(model.base), labels=torch.tensor([0, 1, 2]))
    for h in hooks:
        h.remove()
    out.loss.backward()

    # the early route built no graph and got no gradient
    assert len(early_outputs) == model.num_early
    for o in early_outputs:
        o = o[0] if isinstance(o, (tuple, list)) else o
        assert o.grad_fn is None and not o.requires_grad
    late = f"base.{backbone.layers_path}.{model.num_early}."
    head = tuple(f"base.{n}." for n in backbone.head_modules())
    assert head, "no head module found"
    for name, p in model.named_parameters():
        trainable = name.startswith(("mtsa.", *head)) or (train_late and name.startswith(late))
        assert p.requires_grad == trainable, name
        if not trainable:
            assert p.grad is None, name

    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = {n for n in before if n.startswith(("mtsa.", *head))
               or (train_late and n.startswith(late))}
    assert changed <= allowed, sorted(changed - allowed)
    assert "mtsa.up.weight" in changed
    assert any(n.startswith(head) for n in changed)
    assert any(n.startswith(late) for n in changed) == train_late


# -- save / load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_identical_outputs(family, tmp_path):
    config = SherlConfig(late_layers=1, reduction=4, train_late_layers=family in DECODERS)
    model = get_sherl_model(classifier(family), config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    loaded = SherlModel.from_pretrained(classifier(family), tmp_path / "adapter").eval()
    batch = batch_of(model.base)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert loaded.describe() == model.describe()
    assert model.describe()["family"] == family
    stored = set(model.trainable_state_dict())
    assert all(n.startswith(("mtsa.", "base.")) for n in stored)
    assert not any("embed" in n or ".wte." in n or ".wpe." in n for n in stored)


def test_load_onto_another_family_is_a_clear_error(tmp_path):
    get_sherl_model(classifier("llama")).save_pretrained(tmp_path / "a")
    with pytest.raises(UpcycleError, match="family 'llama' \\(base model: 'mistral'\\)"):
        SherlModel.from_pretrained(classifier("mistral"), tmp_path / "a")


# -- dtypes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_bfloat16_decoder_follows_float32(family):
    model = get_sherl_model(classifier(family), SherlConfig(late_layers=1)).eval()
    batch = batch_of(model.base)
    with torch.no_grad():
        model.mtsa.skip_gate.fill_(0.05)
        want = model(**batch).logits
        got = model.to(torch.bfloat16)(**batch).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.05 * max(1.0, float(want.abs().max()))


# -- the LST baseline on every family --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_lst_trains_only_its_side_network(family):
    model = get_lst_model(classifier(family), LstConfig(reduction=4)).train()
    out = model(**batch_of(model.base), labels=torch.tensor([0, 1, 2]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in model._backbone.layers.parameters())
    side = [p for n, p in model.named_parameters() if not n.startswith("base.")]
    assert side and all(p.grad is not None for p in side)


# -- refusals ------------------------------------------------------------------------------------
def test_a_decoder_missing_from_the_map_names_the_supported_ones():
    model = T.BloomForSequenceClassification(T.BloomConfig(vocab_size=VOCAB, hidden_size=32,
                                                           n_layer=2, n_head=4))
    with pytest.raises(UpcycleError, match="unsupported family 'bloom'; SHERL supports "
                                           "BERT/MiniLM.*Llama.*Mistral.*Qwen2.*Phi-3.*GPT-NeoX"):
        get_sherl_model(model)


def test_gemma_is_not_taken_for_a_llama_clone():
    """Gemma's tensors are named like Llama's but its RMSNorm computes x (1 + w)."""
    model = T.GemmaForSequenceClassification(T.GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, head_dim=8, pad_token_id=0))
    with pytest.raises(UpcycleError, match="unsupported family 'gemma'; SHERL supports"):
        get_sherl_model(model)


def test_a_llama_clone_is_run_as_llama_after_a_check():
    base = classifier("llama", torch.float64)
    batch = batch_of(base)
    with torch.no_grad():
        want = base(**batch).logits
    base.config.model_type = "my-llama"
    model = open_gate(get_sherl_model(base, SherlConfig(late_layers=2)))
    assert model._backbone.match.by_structure and model.describe()["family"] == "llama"
    with torch.no_grad():
        assert (model(**batch).logits - want).abs().max() <= 1e-10


def test_a_clone_that_computes_something_else_is_refused():
    """Llama's tensors, but its forward scales the embeddings outside any module (as Gemma's
    does): SHERL's piecewise route would differ, so the match is refused after the check."""
    base = classifier("llama")
    inner = base.model
    own_forward = inner.forward

    def scaled_forward(input_ids=None, **kwargs):
        kwargs["inputs_embeds"] = inner.embed_tokens(input_ids) * 3.0
        return own_forward(None, **kwargs)

    inner.forward = scaled_forward
    base.config.model_type = "scaled-llama"
    with pytest.raises(UpcycleError, match="'scaled-llama' has the tensor layout of Llama but "
                                           "computes something else"):
        get_sherl_model(base)


def test_a_model_without_a_classification_head_is_refused():
    torch.manual_seed(0)
    with pytest.raises(UpcycleError, match="LlamaModel: a Llama model without the module "
                                           "'score'.*AutoModelForSequenceClassification"):
        get_sherl_model(T.LlamaModel(config_of("llama")))
    with pytest.raises(UpcycleError, match="BertModel: a BERT/MiniLM model without the module "
                                           "'classifier'"):
        get_sherl_model(T.BertModel(config_of("bert")))


def test_a_decoder_without_pad_token_id_is_refused_for_batches():
    """HF's rule (score the last token that is not pad_token_id) needs pad_token_id."""
    model = get_sherl_model(classifier("llama"))
    model.base.config.pad_token_id = None
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(UpcycleError, match="config.pad_token_id is None and the batch has 2 "
                                           "rows; set model.config.pad_token_id"):
        model(input_ids=ids)
    assert model(input_ids=ids[:1]).logits.shape == (1, 3)  # one row: its last token


def test_flash_attention_is_refused_with_the_fix():
    model = classifier("llama")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UpcycleError, match="attention implementation 'flash_attention_2'.*"
                                           "attn_implementation='sdpa'"):
        get_sherl_model(model)
