"""Soup bugs an LLM merger hits (issue 21, second part): the LM loss in chunks of positions,
configs that differ, Trainer state in checkpoint folders, a soup without a tokenizer, tied
heads with LoRA adapters."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lm_models import save_lm, tiny_lm, tiny_tokenizer

from upcycle.errors import UpcycleError
from upcycle.jobs.soup import SoupConfig, run_soup
from upcycle.tasks import causal_lm
from upcycle.tasks.causal_lm import IGNORE_INDEX, _token_losses


def _full_logits_loss(model, batch):
    """The loss from the model's whole (batch, seq, vocab) logits (what it was before)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("kind,tie", [("gpt2", True), ("llama", False)])
def test_chunked_lm_loss_is_the_whole_logits_loss(kind, tie, monkeypatch):
    model = tiny_lm(kind, tie=tie, dtype=torch.float64)
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[2, 10:] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    monkeypatch.setattr(causal_lm, "LOGITS_BUDGET", 320 * 7)  # chunks of 7 positions
    calls = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    with torch.no_grad():
        loss, count = _token_losses(model, batch, "sum")
    handle.remove()
    assert calls and all(shape[0] <= 7 and len(shape) == 2 for shape in calls)  # never whole
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        expected = _full_logits_loss(model, batch)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    # the same gradient under autograd (each chunk's logits recomputed in backward)
    mean, _ = _token_losses(model, batch, "mean")
    grads = torch.autograd.grad(mean, list(model.parameters()), allow_unused=True)
    ref = torch.autograd.grad(_full_logits_loss(model, batch) / count,
                              list(model.parameters()), allow_unused=True)
    for g, r in zip(grads, ref):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


# -- configs, Trainer state, tokenizers ----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _llama(folder, tokenizer=None, **config):
    model = tiny_lm("llama", tie=False)
    for key, value in config.items():
        setattr(model.config, key, value)
    return save_lm(model, folder, tokenizer)


def test_differing_config_fields_are_refused_unless_config_from(tmp_path, tokenizer):
    a = _llama(tmp_path / "a", tokenizer, rope_theta=1e4)
    b = _llama(tmp_path / "b", tokenizer, rope_theta=5e5)
    json.loads((b / "config.json").read_text())
    with pytest.raises(UpcycleError, match="rope_theta.*--config-from"):
        run_soup(SoupConfig([str(a), str(b)], out=tmp_path / "s", device="cpu",
                            progress=False))
    assert not (tmp_path / "s").exists()
    run_soup(SoupConfig([str(a), str(b)], out=tmp_path / "s", device="cpu", progress=False,
                        config_from=2))
    written = json.loads((tmp_path / "s" / "config.json").read_text())
    rope = written.get("rope_theta", (written.get("rope_parameters") or {}).get("rope_theta"))
    assert rope == 5e5


def test_trainer_state_is_never_copied_and_no_tokenizer_warns(tmp_path, tokenizer):
    folders = []
    for i in range(2):
        f = _llama(tmp_path / f"run{i}" / "checkpoint-10")
        for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                     "training_args.bin", "scaler.pt"):
            (f / name).write_bytes(b"{}")
        folders.append(f)
    said = []
    run_soup(SoupConfig([str(f) for f in folders], out=tmp_path / "s", device="cpu",
                        progress=False), say=said.append)
    written = {p.name for p in (tmp_path / "s").iterdir()}
    assert not written & {"trainer_state.json", "optimizer.pt", "scheduler.pt",
                          "rng_state.pth", "training_args.bin", "scaler.pt"}
    assert sum("no tokenizer" in m for m in said) == 1, said


# -- tied heads and LoRA adapters (peft) -----------------------------------------------------

def _train_adapter(base_dir, folder, **lora):
    """A real peft LoRA adapter folder: a few optimizer steps on random tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, **lora))
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 320, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(folder)
    return peft_model


def _soup_of(adapter, base_dir, out):
    run_soup(SoupConfig([str(adapter)], base=str(base_dir), out=out, device="cpu",
                        progress=False))
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out)


def test_tied_model_with_modules_to_save_head_is_one_tied_tensor(tmp_path, tokenizer, capsys):
    base_dir = save_lm(tiny_lm("llama", tie=True), tmp_path / "base", tokenizer)
    peft_model = _train_adapter(base_dir, tmp_path / "ad", target_modules=["q_proj"],
                                modules_to_save=["lm_head"])
    capsys.readouterr()
    soup = _soup_of(tmp_path / "ad", base_dir, tmp_path / "s")
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "'lm_head.weight'" in err and "tied" in err
    trained_head = peft_model.base_model.model.lm_head.modules_to_save["default"].weight
    assert soup.config.tie_word_embeddings
    torch.testing.assert_close(soup.lm_head.weight, trained_head.detach())
    assert soup.lm_head.weight.data_ptr() == soup.model.embed_tokens.weight.data_ptr()
    merged = peft_model.merge_and_unload().state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(soup.state_dict()[q], merged[q], rtol=0, atol=1e-6)


def test_lora_on_a_tied_embedding_is_peft_merge_and_says_so(tmp_path, tokenizer, capsys):
    base_dir = save_lm(tiny_lm("llama", tie=True), tmp_path / "base", tokenizer)
    peft_model = _train_adapter(base_dir, tmp_path / "ad", target_modules=["embed_tokens",
                                                                           "q_proj"])
    capsys.readouterr()
    soup = _soup_of(tmp_path / "ad", base_dir, tmp_path / "s")
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "embed_tokens" in err and "lm_head" in err
    merged = peft_model.merge_and_unload()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(soup.state_dict()[name], tensor, rtol=0, atol=1e-6,
                                   msg=name)
    # the head changed with the embedding: one tensor, as in peft's merged model
    torch.testing.assert_close(soup.lm_head.weight, merged.model.embed_tokens.weight,
                               rtol=0, atol=1e-6)


# -- one read of every tensor ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["uniform", "linear", "task-arithmetic"])
def test_the_merge_reads_each_tensor_once_and_still_refuses_nan(tmp_path, method, monkeypatch):
    from safetensors.torch import save_file

    from upcycle.io.checkpoints import Ingredient

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"ft{i}.safetensors")
        save_file({"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)},
                  paths[-1])
    base = paths.pop()
    reads: list[tuple[str, str]] = []
    original = Ingredient._read
    monkeypatch.setattr(Ingredient, "_read",
                        lambda self, name: reads.append((self.path.name, name))
                        or original(self, name))
    config = dict(method=method, device="cpu", progress=False,
                  base=str(base) if method == "task-arithmetic" else None)
    run_soup(SoupConfig([str(p) for p in paths], out=tmp_path / "s.safetensors", **config))
    ingredient_reads = [r for r in reads if r[0] != base.name]
    assert sorted(ingredient_reads) == sorted({(p.name, k) for p in paths for k in "ab"})
    save_file({"a": torch.full((3, 4), float("nan")), "b": torch.zeros(5)}, paths[1])
    with pytest.raises(UpcycleError, match=r"ingredient 2 .*'a' contains NaN"):
        run_soup(SoupConfig([str(p) for p in paths], out=tmp_path / "t.safetensors", **config))
    assert not (tmp_path / "t.safetensors").exists()
