"""Quantized bases: the layer helpers of upcycle.models.quantized on tiny bitsandbytes and
torchao layers, and SHERL / LST training on 4-bit, 8-bit and torchao int8 bases (CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.models import quantized as Q

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")


def _torchao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("torchao.quantization")


# -- tiny layers -------------------------------------------------------------------------------

def _bnb4(linear: nn.Linear, quant_type="nf4", nested=True) -> nn.Module:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                              compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=nested)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


def _bnb8(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True,
                                has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def _torchao_layer(linear: nn.Linear, config) -> nn.Module:
    tq = _torchao()
    holder = nn.Sequential(linear)
    tq.quantize_(holder, config)
    return holder[0]


def _int8_config():
    return _torchao().Int8WeightOnlyConfig()


def _intx4_config():
    return _torchao().IntxWeightOnlyConfig(weight_dtype=torch.int4)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("shape", [(24, 40), (64, 128), (7, 33)])
def test_bnb_4bit_rows_equal_peft_whole_dequantization(quant_type, nested, shape):
    out_f, in_f = shape
    layer = _bnb4(nn.Linear(in_f, out_f), quant_type, nested)
    assert Q.quant_kind(layer) == Q.BNB_4BIT and Q.is_quantized(layer)
    assert Q.describe(layer) == f"bitsandbytes Linear4bit ({quant_type})"
    assert Q.weight_shape(layer) == (out_f, in_f)
    assert Q.compute_dtype(layer) == torch.float32
    whole = Q.dequantized_weight(layer)
    assert whole.shape == (out_f, in_f) and whole.dtype == torch.float32
    for r0, r1 in [(0, out_f), (0, 1), (3, 5), (out_f - 2, out_f), (2, 2)]:
        rows = Q.dequantized_rows(layer, r0, r1)
        assert rows.shape == (r1 - r0, in_f)
        torch.testing.assert_close(rows, whole[r0:r1], rtol=0, atol=0)
    assert Q.dequantized_rows(layer, 1, 3, torch.bfloat16).dtype == torch.bfloat16


def test_bnb_4bit_is_close_to_the_original_weight():
    linear = nn.Linear(64, 32)
    layer = _bnb4(linear)
    err = (Q.dequantized_weight(layer) - linear.weight).abs().max()
    assert err < 0.2 * linear.weight.abs().max()  # 16 levels per 64-value block


def test_bnb_8bit_rows():
    linear = nn.Linear(40, 24)
    layer = _bnb8(linear)
    assert Q.quant_kind(layer) == Q.BNB_8BIT
    assert Q.describe(layer) == "bitsandbytes Linear8bitLt (int8)"
    assert Q.compute_dtype(layer) == torch.float32  # the bias's
    whole = Q.dequantized_weight(layer)
    assert whole.shape == (24, 40)
    torch.testing.assert_close(whole, linear.weight.detach(), atol=0.01, rtol=0)
    torch.testing.assert_close(Q.dequantized_rows(layer, 5, 11), whole[5:11])
    assert layer.weight.device.type == "cpu"


@pytest.mark.parametrize("make_config", [_int8_config, _intx4_config], ids=["int8", "intx-int4"])
def test_torchao_weight_only_rows(make_config):
    linear = nn.Linear(64, 32)
    reference = linear.weight.detach().clone()
    layer = _torchao_layer(linear, make_config())
    assert Q.quant_kind(layer) == Q.TORCHAO
    assert Q.describe(layer).startswith("torchao ") and "in nn.Linear" in Q.describe(layer)
    assert Q.compute_dtype(layer) == torch.float32
    whole = Q.dequantized_weight(layer)
    assert whole.shape == (32, 64) and type(whole) is torch.Tensor
    assert (whole - reference).abs().max() < 0.2 * reference.abs().max()
    torch.testing.assert_close(Q.dequantized_rows(layer, 4, 12), whole[4:12])


def test_torchao_int4_weight_only_where_the_cpu_supports_it():
    tq = _torchao()
    try:
        layer = _torchao_layer(nn.Linear(128, 64), tq.Int4WeightOnlyConfig())
        layer(torch.randn(2, 128))
    except (ImportError, RuntimeError, NotImplementedError, AssertionError) as exc:
        pytest.skip(f"torchao Int4WeightOnlyConfig does not run on this CPU: {exc}")
    assert Q.quant_kind(layer) == Q.TORCHAO
    torch.testing.assert_close(Q.dequantized_rows(layer, 0, 8),
                               Q.dequantized_weight(layer)[:8])


class _GPTQLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.qweight = torch.zeros(4, 8, dtype=torch.int32)
        self.weight = None


def test_plain_and_unknown_layers():
    plain = nn.Linear(8, 4)
    assert not Q.is_quantized(plain) and Q.describe(plain) == "nn.Linear"
    torch.testing.assert_close(Q.dequantized_rows(plain, 1, 3), plain.weight[1:3].detach())
    assert not Q.is_quantized(nn.LayerNorm(8)) and not Q.is_quantized(nn.ReLU())
    odd = _GPTQLike()
    assert Q.quant_kind(odd) == Q.OTHER
    assert "qweight" in Q.describe(odd)
    with pytest.raises(UpcycleError, match="_GPTQLike"):
        Q.dequantized_weight(odd, torch.float32)
    with pytest.raises(UpcycleError, match="rows 2:9 out of range"):
        Q.dequantized_rows(plain, 2, 9)


# -- SHERL and LST on quantized bases ----------------------------------------------------------

def _save_tiny(tmp_path, family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_labels=3)
    if family == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=2, pad_token_id=0)
        model = transformers.LlamaForSequenceClassification(config)
    else:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**common))
    model.save_pretrained(tmp_path / family)
    return tmp_path / family


def _load(folder, quant: str, keep=None):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    if quant == "torchao-int8":
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        keep = tuple(keep or ("score",))  # as bitsandbytes keeps the last module
        _torchao().quantize_(model, _int8_config(), filter_fn=lambda m, name: isinstance(
            m, nn.Linear) and not name.startswith(keep))
        return model
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                 bnb_4bit_quant_type="nf4", llm_int8_skip_modules=keep)
              if quant == "bnb-4bit" else
              BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep))
    return AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=config,
                                                              dtype=torch.float32)


def _make(method: str, model):
    if method == "sherl":
        from upcycle.tune.sherl import SherlConfig, get_sherl_model

        return get_sherl_model(model, SherlConfig(late_layers=1, reduction=4))
    from upcycle.tune.lst import LstConfig, get_lst_model

    return get_lst_model(model, LstConfig(reduction=4))


def _packed_bytes(model) -> dict[str, tuple]:
    return {n: (p.dtype, tuple(p.shape), p.data_ptr()) for n, p in model.named_parameters()
            if not p.is_floating_point() or type(p).__module__.startswith("torchao")}


QUANTS = ["bnb-4bit", "bnb-8bit", "torchao-int8"]
KEEP = {"llama": None, "bert": ["bert.pooler", "classifier"]}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method", ["sherl", "lst"])
@pytest.mark.parametrize("quant", QUANTS)
def test_tuners_train_on_a_quantized_base(tmp_path, family, method, quant):
    model = _load(_save_tiny(tmp_path, family), quant, KEEP[family])
    layers = Q.quantized_layers(model)
    assert layers, "the base should hold quantized layers"
    packed = _packed_bytes(model)
    tuned = _make(method, model)
    trainable = [(n, p) for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)  # compute dtype
    assert all(not p.requires_grad for _, m in layers for p in m.parameters())
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    ids = torch.randint(1, 100, (4, 6))
    labels = torch.tensor([0, 1, 2, 1])
    losses = []
    for _ in range(4):
        out = tuned(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
        grads = [p.grad for _, p in trainable]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        losses.append(out.loss.item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert _packed_bytes(model) == packed  # the base was never dequantized or replaced


def test_sherl_gradient_reaches_the_mtsa_through_a_4bit_late_layer(tmp_path):
    model = _load(_save_tiny(tmp_path, "llama"), "bnb-4bit")
    tuned = _make("sherl", model)
    assert Q.quant_kind(tuned.base.model.layers[2].mlp.up_proj) == Q.BNB_4BIT
    ids = torch.randint(1, 100, (2, 5))
    tuned(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert float(tuned.mtsa.down[0].weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("method,name", [("sherl", "SHERL"), ("lst", "LST")])
@pytest.mark.parametrize("quant,kind", [("bnb-4bit", "bitsandbytes Linear4bit (nf4)"),
                                        ("bnb-8bit", "bitsandbytes Linear8bitLt"),
                                        ("torchao-int8", "torchao Int8Tensor")])
def test_a_quantized_head_is_refused_up_front(tmp_path, method, name, quant, kind):
    # BERT's head is pooler + classifier; bitsandbytes quantizes the pooler by default
    model = _load(_save_tiny(tmp_path, "bert"), quant, ["classifier"])
    with pytest.raises(UpcycleError) as err:
        _make(method, model)
    message = str(err.value)
    assert f"{name} trains module 'bert.pooler.dense', a {kind}" in message
    assert "llm_int8_skip_modules=" in message


def test_sherl_refuses_to_train_quantized_late_layers(tmp_path):
    from upcycle.tune.sherl import SherlConfig, get_sherl_model

    model = _load(_save_tiny(tmp_path, "llama"), "bnb-4bit")
    with pytest.raises(UpcycleError, match=r"SHERL trains module 'model\.layers\.2.*Linear4bit"):
        get_sherl_model(model, SherlConfig(late_layers=1, train_late_layers=True))


def test_sherl_refuses_an_unknown_quantized_late_layer(tmp_path):
    from transformers import AutoModelForSequenceClassification

    class FakeQuantLinear(nn.Linear):
        """A layer that looks quantized (an int 'qweight') but is no known type."""

        def __init__(self, linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            self.register_buffer("qweight", torch.zeros(1, dtype=torch.int32))

    model = AutoModelForSequenceClassification.from_pretrained(_save_tiny(tmp_path, "llama"))
    mlp = model.model.layers[2].mlp
    mlp.up_proj = FakeQuantLinear(mlp.up_proj)
    with pytest.raises(UpcycleError, match=r"SHERL backpropagates through module "
                                           r"'model\.layers\.2\.mlp\.up_proj'.*FakeQuantLinear"):
        _make("sherl", model)
    mlp.up_proj = nn.Linear(32, 64, bias=False)
    model.model.layers[0].mlp.up_proj = FakeQuantLinear(mlp.up_proj)  # early route: no grad
    _make("sherl", model)


def test_float_dtype_skips_quantized_weights(tmp_path):
    model = _load(_save_tiny(tmp_path, "llama"), "bnb-4bit")
    assert Q.float_dtype(model) == torch.float32
    names = [n for n, _ in Q.quantized_layers(model)]
    assert "model.layers.0.self_attn.q_proj" in names and "score" not in names
