"""SNELL, SHERL and LST models under ``transformers.Trainer``'s own switches: activation
(gradient) checkpointing, ``model.config`` and ``trainer.save_model()``. Tiny BERT built here."""

import copy

import pytest
import torch

from upcycle.training.config import TrainingConfig
from upcycle.training.fit import fit
from upcycle.tune.lst import LstConfig, get_lst_model
from upcycle.tune.sherl import SherlConfig, get_sherl_model
from upcycle.tune.snell import SnellConfig, get_snell_model

VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=64, num_labels=2,
                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0,
                     id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    return BertForSequenceClassification(cfg).eval()


TUNERS = {
    "snell": lambda m: get_snell_model(m, SnellConfig(r=4, dropout=0.0, drop_path=0.0)),
    "sherl": lambda m: get_sherl_model(m, SherlConfig(late_layers=1, train_late_layers=True)),
    "lst": lambda m: get_lst_model(m, LstConfig(reduction=4)),
}


def tiny_vit(seed=0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, image_size=8, patch_size=4, num_channels=1,
                    num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).eval()


def images(n=4):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(n, 1, 8, 8, generator=g)
    return [{"pixel_values": pixels[i], "labels": torch.tensor(i % 2)} for i in range(n)]


def examples(n=4, length=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(n)]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def one_step(model, data=None, **trainer_arguments):
    """The change one SGD-like step makes to each trainable parameter."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainingConfig(max_steps=1, lr=1e-2, warmup_ratio=0.0, batch_size=4, device="cpu",
                            progress=False, weight_decay=0.0, grad_clip=None)
    fit(model, data or examples(), config, data_collator=collate, **trainer_arguments)
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}


@pytest.mark.parametrize("method", sorted(TUNERS))
@pytest.mark.parametrize("reentrant", [None, True])
def test_checkpointing_trains_every_parameter_as_without_it(method, reentrant):
    model = TUNERS[method](tiny_bert())
    twin = copy.deepcopy(model)
    plain = one_step(model)
    extra = {} if reentrant is None else {
        "gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    checkpointed = one_step(twin, gradient_checkpointing=True, **extra)
    assert set(plain) == set(checkpointed) and plain
    for name, delta in checkpointed.items():
        assert delta.abs().sum() > 0, f"{name} did not train with checkpointing"
        torch.testing.assert_close(delta, plain[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_snell_checkpointing_of_an_image_model_trains_the_adapters(reentrant):
    """ViT's main input is pixel_values, so transformers does not make its embedding output
    require grad: with reentrant checkpointing only the head would train."""
    model = get_snell_model(tiny_vit(), SnellConfig(r=4, dropout=0.0, drop_path=0.0))
    twin = copy.deepcopy(model)
    plain = one_step(model, images())
    checkpointed = one_step(twin, images(), gradient_checkpointing=True,
                            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert any(".snell_" in n for n in plain)
    for name, delta in checkpointed.items():
        assert delta.abs().sum() > 0, f"{name} did not train with checkpointing"
        torch.testing.assert_close(delta, plain[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_checkpointing_switches(method):
    model = TUNERS[method](tiny_bert())
    assert model.is_gradient_checkpointing is False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing is True
    model.gradient_checkpointing_disable()
    assert model.is_gradient_checkpointing is False
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing is True
    model.activation_checkpointing_disable()
    assert model.is_activation_checkpointing is False


def test_snell_checkpointing_needs_a_transformers_base_model():
    from upcycle.errors import UpcycleError

    model = get_snell_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                            SnellConfig(r=2, target_modules=["0"], modules_to_save=[]))
    with pytest.raises(UpcycleError, match="Sequential, has no activation_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing is False
    model.gradient_checkpointing_disable()  # nothing to switch off


@pytest.mark.parametrize("method", sorted(TUNERS))
def test_config_is_the_wrapped_models(method):
    base = tiny_bert()
    model = TUNERS[method](base)
    assert model.config is base.config
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_tuner_settings_keep_their_own_names():
    sherl = get_sherl_model(tiny_bert(), SherlConfig(late_layers=2, reduction=8))
    assert sherl.sherl_config.late_layers == 2 and sherl.sherl_config.reduction == 8
    lst = get_lst_model(tiny_bert(), LstConfig(reduction=2))
    assert lst.lst_config.reduction == 2


@pytest.mark.parametrize("method", ["sherl", "snell"])
def test_trainer_save_model_writes_a_loadable_adapter_folder(method, tmp_path):
    from upcycle.training.trainer import UpcycleTrainer, training_arguments
    from upcycle.tune import load
    from upcycle.tune.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    model = TUNERS[method](tiny_bert())
    config = TrainingConfig(max_steps=2, lr=1e-2, warmup_ratio=0.0, batch_size=4, device="cpu",
                            progress=False, report_to=[])
    trainer = UpcycleTrainer(model=model, args=training_arguments(config, tmp_path / "run"),
                             train_dataset=examples(), data_collator=collate)
    trainer.train()
    out = tmp_path / "saved"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    trainer.save_model(str(out))
    trainer.save_model(str(out))  # a second save replaces the adapter files
    # SNELL is a peft model: Trainer saves it as it saves LoRA (with peft's card, README.md,
    # and Trainer's training_args.bin)
    extra = ["README.md", "training_args.bin"] if method == "snell" else []
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                                           "notes.txt", *extra])
    loaded = load(out, base_model=tiny_bert())
    batch = collate(examples())
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
