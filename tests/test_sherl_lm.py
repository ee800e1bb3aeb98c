"""SHERL on decoder language models (every causal-LM family of the map): HF's own loss,
generate() with the KV cache, save/load, activation checkpointing, Trainer, TRL's SFTTrainer
and ``upcycle tune --method sherl`` on a .txt file. Tiny random models (hidden 32, 3 layers)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lm_models import save_lm, tiny_lm, tiny_tokenizer, write_lines

from upcycle.errors import UpcycleError
from upcycle.tune import load as load_adapter_folder
from upcycle.tune.sherl import SherlConfig, SherlModel, get_sherl_model

T = pytest.importorskip("transformers")
VOCAB = 60
FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "phi3", "qwen2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def causal_lm(family: str, layers: int = 3, seed: int = 0):
    """A tiny random causal LM; Mistral/Qwen2 with a sliding window shorter than the inputs."""
    torch.manual_seed(seed)
    decoder = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                   max_position_embeddings=64, pad_token_id=0)
    configs = {
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                     n_positions=64, pad_token_id=0),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32,
                                            num_hidden_layers=layers, num_attention_heads=4,
                                            intermediate_size=48, max_position_embeddings=64,
                                            pad_token_id=0),
        "llama": lambda: T.LlamaConfig(**decoder),
        "mistral": lambda: T.MistralConfig(**decoder, sliding_window=4),
        "phi3": lambda: T.Phi3Config(**decoder),
        "qwen2": lambda: T.Qwen2Config(**decoder, use_sliding_window=True, sliding_window=4,
                                       max_window_layers=1),
    }
    return T.AutoModelForCausalLM.from_config(configs[family]()).eval()


def randomize(model: SherlModel, scale: float = 0.2) -> SherlModel:
    """Move the MTSA away from its start (the base model's function)."""
    with torch.no_grad():
        for p in model.mtsa.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def batch(rows: int = 2, length: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as for generation
    ids[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_starts_as_the_base_model_and_uses_hf_loss(family):
    base = causal_lm(family)
    ids, mask = batch()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
    model = get_sherl_model(base, SherlConfig(late_layers=1))
    assert model.sherl_config.init == "base" and model.config is base.config
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    randomize(model)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
    torch.testing.assert_close(out.loss, shifted)
    assert not torch.allclose(out.logits, want, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train_late", [False, True])
def test_gradients_reach_only_the_mtsa_and_late_layers(family, train_late):
    model = randomize(get_sherl_model(causal_lm(family), SherlConfig(
        late_layers=1, train_late_layers=train_late, init="paper"))).train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("mtsa.") for n in trained)
    late = [n for n in trained if n.startswith("base.")]
    assert bool(late) == train_late
    assert all(".2." in n for n in late)  # layer 2 of 3: the late one
    head = model.get_output_embeddings().weight
    assert not head.requires_grad and head.grad is None
    assert torch.is_grad_enabled()  # the route put autograd back


def test_the_early_route_saves_nothing_for_backward():
    """Bytes saved for backward do not grow with the number of early layers (one tap)."""
    def saved_bytes(layers: int) -> int:
        torch.manual_seed(0)
        model = get_sherl_model(causal_lm("llama", layers=layers),
                                SherlConfig(late_layers=1, taps=[layers - 1], init="paper"))
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        ids, mask = batch(rows=2, length=32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return total

    assert saved_bytes(2) == saved_bytes(6) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_the_cache_equals_without(family):
    model = randomize(get_sherl_model(causal_lm(family), SherlConfig(late_layers=1))).eval()
    ids, mask = batch(length=6)
    common = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    cached = model.generate(ids, use_cache=True, **common)
    plain = model.generate(ids, use_cache=False, **common)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the route is really used: the base model alone scores differently
    base_scores = model.base.generate(ids, use_cache=True, **common).scores
    assert not torch.allclose(base_scores[0], cached.scores[0], atol=1e-3)
    assert model.generation_config is model.base.generation_config


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_checkpointing_gives_the_same_gradients(family):
    def grads(checkpointing: bool):
        model = randomize(get_sherl_model(causal_lm(family), SherlConfig(
            late_layers=1, train_late_layers=True, init="paper"))).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.base.is_gradient_checkpointing
        ids, mask = batch()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        if checkpointing:
            model.gradient_checkpointing_disable()
            assert not model.base.is_gradient_checkpointing
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(3)
    plain = grads(False)
    torch.manual_seed(3)
    again = grads(True)
    assert plain.keys() == again.keys()
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load(family, tmp_path):
    model = randomize(get_sherl_model(causal_lm(family), SherlConfig(late_layers=2)))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base"]["head"] == "causal-lm" and saved["init"] == "base"
    loaded = SherlModel.from_pretrained(causal_lm(family), tmp_path / "adapter")
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)


def test_load_from_the_folder_alone_and_mismatches(tmp_path):
    base = causal_lm("llama")
    save_lm(base, tmp_path / "base")
    base = T.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = randomize(get_sherl_model(base, SherlConfig(late_layers=1)))
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter_folder(tmp_path / "adapter")
    assert isinstance(loaded, SherlModel) and loaded.causal_lm
    assert not any(p.requires_grad for p in loaded.parameters())
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(UpcycleError, match="trained on another backbone: head 'causal-lm'"):
        SherlModel.from_pretrained(T.LlamaForSequenceClassification(base.config),
                                   tmp_path / "adapter")
    with pytest.raises(UpcycleError, match="num_layers 3 \\(base model: 4\\)"):
        SherlModel.from_pretrained(causal_lm("llama", layers=4), tmp_path / "adapter")


def test_generate_on_a_classifier_is_a_clear_error():
    model = get_sherl_model(T.LlamaForSequenceClassification(causal_lm("llama").config))
    with pytest.raises(UpcycleError, match="is a classifier, not a causal LM"):
        model.generate(torch.ones(1, 3, dtype=torch.long))


# -- Trainer, TRL and the CLI ---------------------------------------------------------------------

def lm_dataset(rows: int = 16):
    from lm_models import CORPUS

    return [{"text": line} for line in CORPUS[:rows]]


def sft(kind: str, tmp_path, rows, **settings):
    """A SHERL model on a tiny ``kind`` LM trained by TRL's SFTTrainer on ``rows``."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    model = get_sherl_model(tiny_lm(kind, vocab_size=len(tokenizer)), SherlConfig(late_layers=1))
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4,
                         bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                         max_length=32, **settings)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows))
    return trainer, model, tokenizer


def test_upcycle_trainer_with_checkpointing_saves_the_adapter(tmp_path):
    from upcycle.training.trainer import UpcycleTrainer, UpcycleTrainingArguments

    tokenizer = tiny_tokenizer()
    base = tiny_lm("llama", vocab_size=len(tokenizer))
    model = get_sherl_model(base, SherlConfig(late_layers=1))
    rows = [tokenizer(r["text"])["input_ids"][:16] for r in lm_dataset()]
    data = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows
            if len(r) == 16]
    args = UpcycleTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3,
                                    per_device_train_batch_size=4, learning_rate=1e-2,
                                    gradient_checkpointing=True, report_to=[], use_cpu=True,
                                    save_strategy="no", logging_steps=1,
                                    remove_unused_columns=False)
    trainer = UpcycleTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert model.base.is_gradient_checkpointing
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_config.json").is_file()
    again = SherlModel.from_pretrained(tiny_lm("llama", vocab_size=len(tokenizer)),
                                       tmp_path / "saved")
    torch.testing.assert_close(again.mtsa.up.weight, model.mtsa.up.weight)


def test_trl_sft_trainer_trains_saves_and_reloads(tmp_path):
    trainer, model, tokenizer = sft("llama", tmp_path, lm_dataset(), max_steps=3,
                                    learning_rate=1e-2, logging_steps=1)
    before = model.mtsa.up.weight.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.mtsa.up.weight, before)
    # TRL's fused LM-head loss (through model.base_model) is the route's causal-LM loss
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        plain = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "adapter")
    again = SherlModel.from_pretrained(tiny_lm("llama", vocab_size=len(tokenizer)),
                                       tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_trl_sft_trainer_on_prompt_completion_data(tmp_path):
    rows = [{"prompt": r["text"][:20], "completion": r["text"][20:]}
            for r in lm_dataset(8)]
    trainer, _, _ = sft("gpt2", tmp_path, rows, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2


def test_cli_tune_sherl_on_a_causal_lm(tmp_path, capsys):
    from lm_models import CORPUS

    from upcycle.cli.main import main

    tokenizer = tiny_tokenizer()
    model_dir = save_lm(tiny_lm("llama", vocab_size=len(tokenizer)), tmp_path / "tiny-llama",
                        tokenizer)
    data = write_lines(tmp_path / "train.txt", CORPUS)
    out = tmp_path / "run"
    rc = main(["tune", "--method", "sherl", "--model", str(model_dir), "--data", str(data),
               "--max-steps", "3", "--batch-size", "4", "--late-layers", "1",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm" and report["held_out_metrics"]["perplexity"] > 1
    loaded = load_adapter_folder(out / "adapter")
    assert isinstance(loaded, SherlModel) and loaded.causal_lm
    ids = torch.tensor([tokenizer("the cat")["input_ids"]])
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("extra,message", [
    (["--late-layers", "2"], "late_layers must be an integer with 1 <= late_layers < 2"),
    (["--reduction", "5"], "reduction 5 does not divide the hidden size 32"),
])
def test_cli_refuses_before_loading_weights(tmp_path, capsys, extra, message):
    """The model folder has no weights: a refusal that needed them would fail otherwise."""
    from lm_models import CORPUS

    from upcycle.cli.main import main

    tokenizer = tiny_tokenizer()
    model_dir = save_lm(tiny_lm("llama", vocab_size=len(tokenizer)), tmp_path / "m", tokenizer)
    (model_dir / "model.safetensors").unlink()
    data = write_lines(tmp_path / "train.txt", CORPUS)
    rc = main(["tune", "--method", "sherl", "--model", str(model_dir), "--data", str(data),
               "--max-steps", "1", "--out", str(tmp_path / "bad"), "--quiet", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
