"""SHERL (upcycle.tune.sherl) and its LST baseline (upcycle.tune.lst): tiny BERT, RoBERTa, ViT
and GPT-2 configs built here, plus one test on the real MiniLM. Every other family of the
architecture map: tests/test_sherl_families.py."""

import pytest
import torch
from conftest import torchrun
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.tune.sherl import MTSA, SherlConfig, SherlModel, get_sherl_model

VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(layers=3, hidden=32, num_labels=3, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=2 * hidden, num_labels=num_labels,
                     max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(layers=3, num_labels=3, seed=0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=64, num_labels=num_labels,
                        max_position_embeddings=64, pad_token_id=0)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_vit(layers=3, num_labels=4, seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=64, image_size=16, patch_size=4, num_channels=1,
                    num_labels=num_labels)
    return ViTForImageClassification(cfg).eval()


def tiny_gpt2(layers=3, num_labels=2, seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                     num_labels=num_labels, pad_token_id=0)
    return GPT2ForSequenceClassification(cfg).eval()


def text_batch(batch=3, length=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    ids[1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def image_batch(batch=3):
    return {"pixel_values": torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(1))}


FAMILIES = {"bert": (tiny_bert, text_batch), "vit": (tiny_vit, image_batch),
            "gpt2": (tiny_gpt2, text_batch), "roberta": (tiny_roberta, text_batch)}


def early_and_late(model: SherlModel):
    layers = model._backbone.layers
    return list(layers)[:model.num_early], list(layers)[model.num_early:]


# -- gradients never enter the early route ------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("train_late", [False, True])
def test_no_gradient_reaches_early_layers(family, train_late):
    make, batch_of = FAMILIES[family]
    model = get_sherl_model(make(), SherlConfig(late_layers=1, train_late_layers=train_late))
    model.train()
    early, late = early_and_late(model)
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in early]
    logits = model(**batch_of()).logits
    for h in hooks:
        h.remove()
    logits.square().sum().backward()

    # early activations: no graph at all
    assert len(outputs) == len(early)
    for out in outputs:
        out = out[0] if isinstance(out, tuple) else out
        assert not out.requires_grad and out.grad_fn is None
    taps, h_last, _, _ = model.early_route(batch_of())
    assert all(t.grad_fn is None and not t.requires_grad for t in taps + [h_last])
    # early and embedding parameters: frozen and untouched
    for layer in early:
        for p in layer.parameters():
            assert not p.requires_grad and p.grad is None
    embed_params = [p for n, p in model.base.named_parameters()
                    if "embed" in n or n.startswith(("transformer.wte", "transformer.wpe"))]
    assert embed_params and all(p.grad is None for p in embed_params)
    # late layers: gradients only when asked for
    for layer in late:
        for p in layer.parameters():
            assert (p.grad is not None) == train_late
    # the MTSA and the head learn
    assert all(p.grad is not None for p in model.mtsa.parameters())
    for _, p in model._backbone.head_parameters():
        assert p.grad is not None


# -- MTSA invariants ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(num_taps=st.integers(2, 5), seed=st.integers(0, 10_000), scale=st.floats(0.01, 30.0))
def test_mtsa_weights_sum_to_at_most_one(num_taps, seed, scale):
    torch.manual_seed(seed)
    mtsa = MTSA(16, num_taps, reduction=2, init_std=0.5)
    taps = [scale * torch.randn(2, 5, 16) for _ in range(num_taps)]
    _, alpha = mtsa(taps, taps[-1], return_weights=True)
    assert alpha.shape == (num_taps - 1, 2, 5)
    assert bool((alpha >= 0).all())
    assert bool((alpha.abs().sum(0) <= 1 + 1e-6).all())


def test_mtsa_falls_back_to_guide_when_no_score_is_positive():
    torch.manual_seed(0)
    mtsa = MTSA(16, 4, reduction=4)
    with torch.no_grad():
        mtsa.score.weight.zero_()
        mtsa.score.bias.fill_(-1.0)  # every s_i = -1
    taps = [torch.randn(2, 5, 16) for _ in range(4)]
    x, alpha = mtsa(taps, torch.randn(2, 5, 16), return_weights=True)
    assert bool((alpha == 0).all())
    guide = mtsa.project(3, taps[3])
    torch.testing.assert_close(x, mtsa.up(torch.relu(guide)))


def test_mtsa_gate_starts_closed_and_opens_with_gamma():
    torch.manual_seed(0)
    mtsa = MTSA(16, 3, reduction=4)
    assert float(mtsa.skip_gate.detach()) == 0.0
    taps = [torch.randn(2, 5, 16) for _ in range(3)]
    a = mtsa(taps, torch.randn(2, 5, 16))
    b = mtsa(taps, 100 * torch.randn(2, 5, 16))
    torch.testing.assert_close(a, b)  # tanh(0) = 0: h_last is not used at init
    with torch.no_grad():
        mtsa.skip_gate.fill_(0.05)
    h_last = torch.randn(2, 5, 16)
    diff = mtsa(taps, h_last) - mtsa(taps, torch.zeros_like(h_last))
    torch.testing.assert_close(diff, torch.tanh(torch.tensor(0.5)) * h_last)


def test_mtsa_init_and_padded_tokens_get_no_weight():
    torch.manual_seed(0)
    mtsa = MTSA(32, 3, reduction=4)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in mtsa.modules()
               if isinstance(m, nn.Linear))
    assert abs(float(mtsa.up.weight.detach().std()) - 0.02) < 0.005
    taps = [torch.randn(2, 6, 32) for _ in range(3)]
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    _, alpha = mtsa(taps, taps[-1], token_mask=mask, return_weights=True)
    assert bool((alpha[:, 0, 4:] == 0).all())


# -- the wrapper computes what the HF model computes -----------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_open_gate_and_zero_fusion_reproduce_the_hf_model(family):
    """With x = h_last (gate fully open, W_o = 0) SHERL is the original model: this checks the
    family description (embeddings, masks, final norm, head) against HF's own forward."""
    make, batch_of = FAMILIES[family]
    base = make()
    batch = batch_of()
    expected = base(**batch).logits
    model = get_sherl_model(base, SherlConfig(late_layers=2, reduction=2)).eval()
    with torch.no_grad():
        model.mtsa.skip_gate.fill_(100.0)
        model.mtsa.up.weight.zero_()
        model.mtsa.up.bias.zero_()
    torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "gpt2", "roberta"])
def test_padding_does_not_change_real_tokens(family):
    make, _ = FAMILIES[family]
    model = get_sherl_model(make(), SherlConfig(reduction=2)).eval()
    with torch.no_grad():
        model.mtsa.skip_gate.fill_(0.03)  # use every part of the MTSA
    ids = torch.randint(1, VOCAB, (1, 7))
    alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    padded_ids = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], 1)
    other = torch.randint(1, VOCAB, (1, 12))
    batch_ids = torch.cat([padded_ids, other])
    batch_mask = torch.cat([mask, torch.ones(1, 12, dtype=torch.long)])
    padded = model(input_ids=batch_ids, attention_mask=batch_mask).logits
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_configs_train_with_the_shared_loop(family):
    from upcycle.tasks.classification import evaluate
    from upcycle.training.config import TrainingConfig
    from upcycle.training.fit import fit

    make, batch_of = FAMILIES[family]
    model = get_sherl_model(make(layers=4), SherlConfig(late_layers=2, taps=[0, 2]))
    batch = batch_of(batch=6)
    batch["labels"] = torch.tensor([0, 1, 0, 1, 1, 0])
    examples = [{k: v[i] for k, v in batch.items()} for i in range(6)]
    result = fit(model, examples, TrainingConfig(max_steps=25, lr=1e-2, warmup_ratio=0.0,
                                                 batch_size=6, device="cpu", progress=False))
    assert result.steps == 25 and len(result.step_losses) == 25
    assert result.step_losses[-1] < result.step_losses[0]
    metrics = evaluate(model, [batch])
    assert metrics["n"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0


# -- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_load_gives_identical_outputs(family, tmp_path):
    make, batch_of = FAMILIES[family]
    config = SherlConfig(late_layers=1, reduction=4, train_late_layers=(family == "bert"))
    model = get_sherl_model(make(seed=0), config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UpcycleError, match="already holds"):
        model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "adapter", overwrite=True)
    loaded = SherlModel.from_pretrained(make(seed=0), tmp_path / "adapter").eval()
    assert loaded.sherl_config == SherlConfig(late_layers=1, reduction=4, init="paper",
                                              train_late_layers=(family == "bert"), taps=[0, 1, 2])
    batch = batch_of()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    # only the trainable part is stored
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert all(n.startswith(("mtsa.", "base.")) for n in names)
    assert not any(".embeddings." in n or ".wte." in n for n in names)


def test_load_onto_another_size_is_a_clear_error(tmp_path):
    get_sherl_model(tiny_bert(hidden=32)).save_pretrained(tmp_path / "a")
    with pytest.raises(UpcycleError, match="hidden_size 32 \\(base model: 64\\)"):
        SherlModel.from_pretrained(tiny_bert(hidden=64), tmp_path / "a")
    with pytest.raises(UpcycleError, match="family 'bert' \\(base model: 'vit'\\)"):
        SherlModel.from_pretrained(tiny_vit(), tmp_path / "a")
    with pytest.raises(UpcycleError, match="no such folder"):
        SherlModel.from_pretrained(tiny_bert(), tmp_path / "missing")


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("late", [0, 3, -1, 7])
def test_bad_late_layers(late):
    with pytest.raises(UpcycleError, match="late_layers must be an integer with 1 <= late_layers < 3"):
        get_sherl_model(tiny_bert(layers=3), SherlConfig(late_layers=late))


def test_bad_taps_and_reduction():
    with pytest.raises(UpcycleError, match="taps: index 3 is out of range.*0 \\(embedding output\\) to 2"):
        get_sherl_model(tiny_bert(layers=3), SherlConfig(taps=[0, 3]))
    with pytest.raises(UpcycleError, match="taps: index -1"):
        get_sherl_model(tiny_bert(layers=3), SherlConfig(taps=[-1]))
    with pytest.raises(UpcycleError, match="duplicate"):
        get_sherl_model(tiny_bert(layers=3), SherlConfig(taps=[1, 1]))
    with pytest.raises(UpcycleError, match="reduction 5 does not divide the hidden size 32"):
        get_sherl_model(tiny_bert(), SherlConfig(reduction=5))


def test_unsupported_backbone_names_the_supported_ones():
    from transformers import BloomConfig, BloomForSequenceClassification

    model = BloomForSequenceClassification(BloomConfig(vocab_size=VOCAB, hidden_size=32,
                                                       n_layer=2, n_head=4))
    with pytest.raises(UpcycleError, match="unsupported family 'bloom'; SHERL supports "
                                           "BERT/MiniLM.*DistilBERT.*ViT.*GPT-2.*Llama.*"
                                           "upcycle.models.families"):
        get_sherl_model(model)
    with pytest.raises(UpcycleError, match="unsupported family 'Linear'"):
        get_sherl_model(nn.Linear(3, 3))


def test_single_tap_uses_the_guide_only():
    model = get_sherl_model(tiny_bert(layers=3), SherlConfig(taps=[2]))
    assert model.mtsa.score is None
    logits = model(**text_batch()).logits
    logits.sum().backward()
    assert all(p.grad is not None for p in model.mtsa.parameters())


# -- the LST baseline ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lst_baseline_trains_only_the_side_network(family):
    from upcycle.tune.lst import LstConfig, get_lst_model

    make, batch_of = FAMILIES[family]
    model = get_lst_model(make(), LstConfig(reduction=4)).train()
    model(**batch_of()).logits.square().sum().backward()
    for layer in model._backbone.layers:
        assert all(p.grad is None for p in layer.parameters())
    side = [p for n, p in model.named_parameters() if not n.startswith("base.")]
    assert side and all(p.grad is not None for p in side)


# -- the real MiniLM ----------------------------------------------------------------------------
def test_real_minilm(minilm_path, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path)
    enc = dict(tok(["the match ended in a draw", "shares fell sharply on wall street today"],
                   padding=True, return_tensors="pt"))
    model = get_sherl_model(base, SherlConfig(late_layers=1, reduction=4))
    assert model.num_early == 5 and model.tap_indices == [0, 1, 2, 3, 4, 5]
    model.train()
    out = model(**enc, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is None for layer in early_and_late(model)[0] for p in layer.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.1 * sum(p.numel() for p in model.parameters())
    model.eval()
    model.save_pretrained(tmp_path / "minilm-sherl")
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    again = SherlModel.from_pretrained(fresh, tmp_path / "minilm-sherl").eval()
    torch.testing.assert_close(again(**enc).logits, model(**enc).logits, rtol=0, atol=0)


# -- the CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_task(tmp_path_factory):
    """A tiny random 3-layer BERT folder (no head) with a tokenizer, and train/test JSONL."""
    import json

    import numpy as np
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "film"]
    root = tmp_path_factory.mktemp("sherl-cli")
    model_dir = root / "tiny-bert"
    model_dir.mkdir()
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                              *words]) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=3,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=32)).save_pretrained(model_dir)
    rng = np.random.default_rng(0)

    def write(path, n):
        with open(path, "w") as f:
            for _ in range(n):
                label = int(rng.integers(2))
                pool = words[:4] if label else words[4:8]
                count = int(rng.integers(1, 4))  # different lengths: padded batches
                f.write(json.dumps({"text": " ".join(["the", "film", *rng.choice(pool, count)]),
                                    "label": label}) + "\n")
        return path

    return model_dir, write(root / "train.jsonl", 48), write(root / "test.jsonl", 16)


def test_cli_tune_sherl_end_to_end(text_task, tmp_path, capsys):
    import json

    from transformers import AutoModelForSequenceClassification

    from upcycle.cli.main import main

    model_dir, train_file, test_file = text_task
    out = tmp_path / "run"
    rc = main(["tune", "--method", "sherl", "--model", str(model_dir), "--data", str(train_file),
               "--test", str(test_file), "--late-layers", "2", "--reduction", "2",
               "--taps", "0", "1", "--max-steps", "4", "--batch-size", "8", "--out", str(out),
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "peak RSS" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "sherl" and report["steps"] == 4
    assert report["trainable_params"] < report["all_params"]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["late_layers"] == 2 and saved["reduction"] == 2 and saved["taps"] == [0, 1]
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    loaded = SherlModel.from_pretrained(base, out / "adapter")
    assert loaded.num_early == 1 and loaded.tap_indices == [0, 1]


def test_cli_tune_sherl_on_a_decoder(text_task, tmp_path, capsys):
    """`upcycle tune --method sherl` on a Llama folder (rotary, RMSNorm, causal mask, the
    last-non-pad-token head), with the BERT folder's tokenizer (its pad token is id 0)."""
    import json
    import shutil

    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaModel

    from upcycle.cli.main import main

    bert_dir, train_file, test_file = text_task
    model_dir = tmp_path / "tiny-llama"
    shutil.copytree(bert_dir, model_dir)
    for f in ("config.json", "model.safetensors"):
        (model_dir / f).unlink()
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=15, hidden_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                           pad_token_id=0)).save_pretrained(model_dir)
    out = tmp_path / "run"
    rc = main(["tune", "--method", "sherl", "--model", str(model_dir), "--data", str(train_file),
               "--test", str(test_file), "--max-steps", "3", "--batch-size", "8",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["test_metrics"]["n"] == 16
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["base"]["family"] == "llama" and saved["taps"] == [0, 1, 2]
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    assert SherlModel.from_pretrained(base, out / "adapter").num_early == 2


@pytest.mark.parametrize("extra,message", [
    (["--late-layers", "3"], "late_layers must be an integer with 1 <= late_layers < 3"),
    (["--taps", "0", "5"], "taps: index 5 is out of range"),
    (["--reduction", "5"], "reduction 5 does not divide the hidden size 32"),
])
def test_cli_tune_sherl_bad_input(text_task, tmp_path, capsys, extra, message):
    from upcycle.cli.main import main

    model_dir, train_file, _ = text_task
    rc = main(["tune", "--method", "sherl", "--model", str(model_dir), "--data", str(train_file),
               "--max-steps", "1", "--out", str(tmp_path / "bad"), "--quiet", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_tune_sherl_ddp_two_ranks(text_task, tmp_path):
    import json

    model_dir, train_file, test_file = text_task
    out = tmp_path / "ddp"
    torchrun(["-m", "upcycle.cli.main", "tune", "--method", "sherl", "--model", model_dir,
              "--data", train_file, "--test", test_file, "--max-steps", "3", "--batch-size",
              "8", "--out", out, "--device", "cpu", "--quiet"])  # gloo, also with one GPU
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 3
    assert report["test_metrics"]["n"] == 16
