"""SNELL: the kernel, the competition mask, injection, merging, saving, bad input."""

import math

import pytest
import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.tune.adapter import ADAPTER_WEIGHTS, count_parameters
from upcycle.tune.snell import (
    SnellConfig,
    SnellLayer,
    SnellModel,
    get_snell_model,
    save_snell,
    snell_kernel,
    sparsify,
)

# -- tiny models of the four families --------------------------------------------------------


def tiny_bert(num_labels=3, hidden=32):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_vit(num_labels=3):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    num_labels=num_labels)
    return ViTForImageClassification(cfg).eval()


def tiny_gpt2(num_labels=3):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     num_labels=num_labels, pad_token_id=0)
    return GPT2ForSequenceClassification(cfg).eval()


def tiny_llama(num_labels=3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, num_labels=num_labels,
                      pad_token_id=0, max_position_embeddings=64)
    return LlamaForSequenceClassification(cfg).eval()


FAMILIES = {"bert": tiny_bert, "vit": tiny_vit, "gpt2": tiny_gpt2, "llama": tiny_llama}


def inputs_for(family, batch=2):
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(1, 99, (batch, 7), generator=g)}


def randomize(model: SnellModel, scale=3.0):
    """Spread A and B so the kernel is far from zero (as after training)."""
    with torch.no_grad():
        for layer in model.snell_layers().values():
            layer.snell_A["default"].normal_(0, scale)
            layer.snell_B["default"].normal_(0, scale)


# -- the kernel -----------------------------------------------------------------------------

def test_kernel_matches_direct_formula():
    P, d_in, d_out, q = 2, 30, 27, 4
    A = torch.randn(P, d_in, q, dtype=torch.float64)
    B = torch.randn(P, d_out, q, dtype=torch.float64)
    c = torch.tensor([0.1, -0.1], dtype=torch.float64)
    direct = torch.zeros(d_out, d_in, dtype=torch.float64)
    for i in range(d_in):
        for j in range(d_out):
            direct[j, i] = sum(c[p] * math.sqrt(float(((A[p, i] - B[p, j]) ** 2).sum()))
                               for p in range(P))
    torch.testing.assert_close(snell_kernel(A, B, c), direct, rtol=1e-6, atol=1e-8)
    # float32 (the matmul form of cdist) stays close too
    torch.testing.assert_close(snell_kernel(A.float(), B.float(), c.float()), direct.float(),
                               rtol=1e-4, atol=1e-5)


def test_kernel_is_full_rank_unlike_lora():
    A = torch.randn(2, 40, 2, dtype=torch.float64)
    B = torch.randn(2, 40, 2, dtype=torch.float64)
    K = snell_kernel(A, B, torch.tensor([0.1, -0.1], dtype=torch.float64))
    assert torch.linalg.matrix_rank(K) > 4 * 4  # far above r = 4


def test_trainable_count_matches_lora():
    layer = SnellLayer(nn.Linear(20, 12), SnellConfig(r=8))
    assert layer.snell_A["default"].numel() + layer.snell_B["default"].numel() == 8 * (20 + 12)


# -- the competition mask ---------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.1, 0.3, 0.5, 0.9, 0.99])
def test_mask_keeps_exactly_top_fraction(s):
    delta = torch.randn(37, 23)
    out = sparsify(delta, s)
    kept = out != 0
    n = delta.numel()
    assert int(kept.sum()) == n - math.floor(s * n + 1e-9)
    assert delta.abs()[kept].min() > delta.abs()[~kept].max()
    torch.testing.assert_close(out[kept], (delta * delta.abs())[kept])


def test_mask_is_per_slice_for_fused_qkv():
    delta = torch.randn(3 * 8, 10)
    delta[:8] *= 100  # q would win everything with a single threshold
    out = sparsify(delta, 0.5, num_slices=3)
    for part in out.reshape(3, -1):
        assert int((part != 0).sum()) == 40
    single = sparsify(delta, 0.5, num_slices=1)
    assert int((single[:8] != 0).sum()) == 80  # one threshold: q keeps all of its entries


def test_gpt2_c_attn_sparsified_per_slice():
    model = get_snell_model(tiny_gpt2(), SnellConfig(r=4, sparsity=0.7))
    layers = model.snell_layers()
    c_attn = [m for n, m in layers.items() if n.endswith("c_attn")]
    assert c_attn and all(m.parts.count == 3 for m in c_attn)
    assert all(m.parts.count == 1 for n, m in layers.items() if not n.endswith("c_attn"))
    delta = c_attn[0].delta_weight()
    assert delta.shape == (96, 32)
    per_slice = (delta != 0).reshape(3, -1).sum(1)
    assert per_slice.tolist() == [32 * 32 - math.floor(0.7 * 32 * 32)] * 3


def test_gradients_zero_on_pruned_and_scale_with_magnitude():
    K = torch.randn(16, 12, requires_grad=True)
    G = torch.randn(16, 12)
    out = sparsify(K, 0.6, "reference")
    out.backward(G)
    kept = out.detach() != 0
    assert torch.all(K.grad[~kept] == 0)
    torch.testing.assert_close(K.grad[kept], (G * K.detach().abs())[kept])

    K.grad = None
    out = sparsify(K, 0.6, "paper")
    out.backward(G)
    tau = K.detach().abs().flatten().kthvalue(math.floor(0.6 * K.numel())).values
    expected = G * (K.detach().abs() - tau).clamp_min(0)
    torch.testing.assert_close(K.grad, expected)
    assert torch.all(K.grad[K.detach().abs() <= tau] == 0)


def test_sparsity_zero_is_dense_klora():
    K = torch.randn(8, 5)
    assert sparsify(K, 0.0) is K
    layer = SnellLayer(nn.Linear(5, 8), SnellConfig(r=4, sparsity=0.0))
    torch.testing.assert_close(layer.delta_weight(),
                               snell_kernel(layer.snell_A["default"], layer.snell_B["default"], layer.coeffs()))
    assert (layer.delta_weight() != 0).all()


@pytest.mark.parametrize("recompute", ["backward", "checkpoint"])
def test_nothing_d_out_by_d_in_saved_for_backward(recompute):
    """With recompute, autograd keeps no d_out x d_in tensor (beyond W0 itself, a parameter);
    without it, it does."""
    def saved_shapes(mode):
        layer = SnellLayer(nn.Linear(24, 40), SnellConfig(r=4, sparsity=0.5, dropout=0.0,
                                                          drop_path=0.0, recompute=mode))
        layer.train()
        weight_ptr = layer.base_layer.weight.untyped_storage().data_ptr()
        shapes = []

        def pack(t):
            if t.untyped_storage().data_ptr() != weight_ptr:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(torch.randn(3, 24, requires_grad=True))
        y.sum().backward()
        assert layer.snell_A["default"].grad is not None
        return shapes

    big = {(40, 24), (24, 40), (2, 40, 24), (2, 24, 40), (3, 320), (1, 960), (960,)}
    assert not big & set(saved_shapes(recompute))
    assert big & set(saved_shapes("none"))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("regularised", [False, True])
def test_recompute_modes_give_same_gradients(transposed, regularised):
    from transformers.pytorch_utils import Conv1D

    x0 = torch.randn(2, 4, 10)
    results = []
    for mode in ("backward", "checkpoint", "none"):
        torch.manual_seed(0)
        base = Conv1D(6, 10) if transposed else nn.Linear(10, 6)
        nn.init.normal_(base.bias)
        layer = SnellLayer(base, SnellConfig(r=4, recompute=mode, learnable_coeffs=True,
                                             dropout=0.2 if regularised else 0.0, drop_path=0.0))
        layer.train()
        base.weight.requires_grad_(True)  # also check the gradient reaching W0 and b
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(1)
        y = layer(x)
        y.pow(2).sum().backward()
        results.append((y.detach(), x.grad, layer.snell_A["default"].grad, layer.snell_B["default"].grad,
                        layer.coeffs().grad, base.weight.grad, base.bias.grad))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- models: injection, training, merging, saving ---------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_families_train_merge_save_load(family, tmp_path):
    torch.manual_seed(0)
    base = FAMILIES[family]()
    inputs = inputs_for(family)
    model = get_snell_model(base, SnellConfig(r=4, sparsity=0.5))
    assert len(model.snell_layers()) > 0
    assert model.modules_to_save  # the classification head
    randomize(model)
    # one training step through the HF loss
    model.train()
    out = model(**inputs, labels=torch.tensor([0, 2]))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(".snell_" in n or any(f".{m}." in n for m in model.modules_to_save) for n in grads)
    model.eval()
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
        model.save_pretrained(tmp_path / "adapter")
        model.merge_adapter()
        merged_logits = model(**inputs).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    # save -> load into a fresh base with the same initial weights -> same outputs
    torch.manual_seed(0)
    reloaded = SnellModel.from_pretrained(FAMILIES[family](), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapter_logits, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_default_targets_per_family():
    expected = {"bert": 12, "vit": 12, "gpt2": 8, "llama": 14}
    for family, count in expected.items():
        model = get_snell_model(FAMILIES[family](), SnellConfig(r=2))
        assert len(model.snell_layers()) == count, family


def test_merge_unmerge_restores_w0_and_merge_and_unload():
    base = tiny_bert()
    originals = {n: p.detach().clone() for n, p in base.state_dict().items()}
    model = get_snell_model(base, SnellConfig(r=4, sparsity=0.3))
    randomize(model, scale=0.5)
    model.merge_adapter()
    layer = model.snell_layers()["bert.encoder.layer.0.attention.self.query"]
    assert not torch.equal(layer.base_layer.weight,
                           originals["bert.encoder.layer.0.attention.self.query.weight"])
    model.unmerge_adapter()
    for name, layer in model.snell_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, originals[f"{name}.weight"],
                                   atol=1e-6, rtol=0)
    inputs = inputs_for("bert")
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
        plain = model.merge_and_unload()
        after = plain(**inputs).logits
    assert not any(isinstance(m, SnellLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(originals)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_only_adapter_and_head_change_in_training_loop():
    from upcycle.training.config import TrainingConfig
    from upcycle.training.fit import fit

    base = tiny_bert()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_snell_model(base, SnellConfig(r=4, sparsity=0.5, learnable_coeffs=True))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 99, (4, 9), generator=g),
                "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(3)]
    A0 = {n: m.snell_A["default"].detach().clone() for n, m in model.snell_layers().items()}
    examples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    fit(model, examples, TrainingConfig(max_steps=4, lr=1e-2, batch_size=4, device="cpu",
                                        progress=False))
    for name, p in base.named_parameters():
        if ".snell_" in name:
            continue
        # peft trains a copy of the head (modules_to_save) and keeps the original
        stem = name.replace(".base_layer.", ".").replace(".original_module.", ".").replace(
            ".modules_to_save.default.", ".")
        changed = not torch.equal(p.detach(), before[stem])
        assert changed == name.startswith("classifier.modules_to_save."), name
    assert any(not torch.equal(m.snell_A["default"], A0[n]) for n, m in model.snell_layers().items())
    assert any(not torch.equal(m.coeffs().detach(), torch.tensor([0.1, -0.1]))
               for m in model.snell_layers().values())


def test_plain_user_loop_reduces_loss():
    torch.manual_seed(0)
    model = get_snell_model(tiny_bert(num_labels=2), r=8, sparsity=0.5, dropout=0.0,
                            drop_path=0.0)
    ids = torch.randint(1, 99, (8, 6))
    labels = (ids[:, 0] > 50).long()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_saved_adapter_holds_only_adapter_and_head(tmp_path):
    from safetensors import safe_open

    model = get_snell_model(tiny_bert(), SnellConfig(r=4))
    model.save_pretrained(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS), "pt") as f:
        keys = list(f.keys())
    # peft's names: A, B and the (fixed) coefficients of each layer, and the head
    assert keys and all(k.startswith("base_model.model.") for k in keys)
    assert all(k.endswith((".snell_A", ".snell_B", ".snell_coeffs"))
               or k.startswith("base_model.model.classifier.") for k in keys)
    save_snell(model, tmp_path / "b")
    with pytest.raises(UpcycleError, match="already holds"):
        save_snell(model, tmp_path / "b")
    save_snell(model, tmp_path / "b", overwrite=True)


def test_print_trainable_parameters(capsys):
    model = get_snell_model(tiny_bert(), SnellConfig(r=4))
    model.print_trainable_parameters()
    text = capsys.readouterr().out
    trainable, total = count_parameters(model)
    assert text.strip() == (f"trainable params: {trainable:,} || all params: {total:,} || "
                            f"trainable%: {100 * trainable / total:.4f}")


def test_regex_targets_and_custom_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.enc(x))

    model = get_snell_model(Net(), SnellConfig(r=2, target_modules=r"enc\.(0|2)",
                                               modules_to_save=["out"]))
    assert sorted(model.snell_layers()) == ["enc.0", "enc.2"]
    assert model.out.weight.requires_grad and not model.enc[0].base_layer.weight.requires_grad
    randomize(model)
    model.eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        a = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), a, atol=1e-5, rtol=0)


# -- bad input --------------------------------------------------------------------------------

def test_error_pattern_matches_nothing_lists_names():
    with pytest.raises(UpcycleError, match=r"'qkv_typo' matches no module.*query"):
        get_snell_model(tiny_bert(), SnellConfig(target_modules=["query", "qkv_typo"]))


def test_error_r_not_divisible():
    with pytest.raises(UpcycleError, match="r=5 is not divisible by num_pieces=2"):
        SnellConfig(r=5)


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5])
def test_error_sparsity_out_of_range(s):
    with pytest.raises(UpcycleError, match=r"sparsity must be in \[0, 1\)"):
        SnellConfig(sparsity=s)


def test_error_module_cannot_be_adapted():
    with pytest.raises(UpcycleError, match="a LayerNorm; SNELL adapts nn.Linear"):
        get_snell_model(tiny_bert(), SnellConfig(target_modules=["attention.output.LayerNorm"]))
    with pytest.raises(UpcycleError, match="a ReLU"):
        get_snell_model(nn.Sequential(nn.Linear(3, 3), nn.ReLU()),
                        SnellConfig(target_modules=r"\d", modules_to_save=[]))


def test_error_load_into_different_shapes(tmp_path):
    get_snell_model(tiny_bert(hidden=32), SnellConfig(r=4)).save_pretrained(tmp_path / "a")
    with pytest.raises(UpcycleError, match=r"tensor 'base_model\.model\.bert\.encoder\.layer\.0\.attention\.self"
                                           r"\.query\.snell_A' has shape"):
        SnellModel.from_pretrained(tiny_bert(hidden=48), tmp_path / "a")


def test_error_incomplete_adapter_folder(tmp_path):
    get_snell_model(tiny_bert(), SnellConfig(r=4)).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(UpcycleError, match="incomplete: missing adapter_model.safetensors"):
        SnellModel.from_pretrained(tiny_bert(), tmp_path / "a")
    with pytest.raises(UpcycleError, match="no such folder"):
        SnellModel.from_pretrained(tiny_bert(), tmp_path / "nothing")


def test_error_unknown_family_needs_targets():
    with pytest.raises(UpcycleError, match="no default target_modules"):
        get_snell_model(nn.Sequential(nn.Linear(3, 3)))


# -- the real MiniLM --------------------------------------------------------------------------

@pytest.mark.slow
def test_real_minilm(minilm_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    model = get_snell_model(base, SnellConfig(r=8, sparsity=0.5))
    assert len(model.snell_layers()) == 36  # 6 per block x 6 blocks
    trainable, _ = count_parameters(model)
    lora_equivalent = 6 * 8 * (4 * (384 + 384) + (384 + 1536) + (1536 + 384))
    assert trainable == lora_equivalent + 384 * 2 + 2
    enc = tok(["a good film", "a terrible film"], return_tensors="pt", padding=True)
    model.train()
    loss = model(**enc, labels=torch.tensor([1, 0])).loss
    loss.backward()
    model.eval()
    with torch.no_grad():
        a = model(**enc).logits
        model.merge_adapter()
        b = model(**enc).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
