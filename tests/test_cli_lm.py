"""Language models in every verb: ``upcycle soup`` and ``upcycle tune`` on tiny GPT-2 and
Llama causal LMs (full checkpoints and peft LoRA adapters), offline, through the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import torchrun
from lm_models import CORPUS, save_lm, tiny_lm, tiny_tokenizer, write_lines
from safetensors import safe_open

from upcycle.cli.main import main
from upcycle.tasks.causal_lm import CausalLMTask, causal_lm_loss

WTE = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}
HELD_OUT = CORPUS[:6] * 2
TEST = [" ".join(reversed(line.split())) for line in CORPUS[:6]]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _pretrained(kind, tokenizer, root):
    """A briefly trained tiny tied LM (so perturbations of it hurt) saved with its tokenizer."""
    model = tiny_lm(kind, tie=True)
    folder = save_lm(model, root / f"{kind}-base", tokenizer)
    task = CausalLMTask(folder, max_length=16)
    data = task.read(write_lines(root / "train.txt", CORPUS))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        for batch in task.batches(data, 8):
            opt.zero_grad()
            causal_lm_loss(model, batch).backward()
            opt.step()
    return model.eval(), save_lm(model, root / f"{kind}-pretrained", tokenizer)


def _noisy_copies(model, tokenizer, root, prefix, noise=(0.002, 0.15, 0.15), dtype=None):
    folders = []
    for i, sigma in enumerate(noise):
        gen = torch.Generator().manual_seed(100 + i)
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(sigma * torch.randn(p.shape, generator=gen))
        m.generation_config.max_new_tokens = 7
        if dtype is not None:
            m = m.to(dtype)
        folders.append(save_lm(m, root / f"{prefix}{i}", tokenizer))
    return folders


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory, tokenizer):
    """Per kind: three tied fine-tunes (GPT-2 stored in bf16, Llama in fp32) and data files:
    GPT-2 held-out as .txt, Llama's as prompt/completion JSONL."""
    root = tmp_path_factory.mktemp("lm")
    runs = {}
    for kind in ("gpt2", "llama"):
        model, _ = _pretrained(kind, tokenizer, root)
        dtype = torch.bfloat16 if kind == "gpt2" else None
        runs[kind] = _noisy_copies(model, tokenizer, root, f"{kind}-run", dtype=dtype)
    write_lines(root / "held_out.txt", HELD_OUT)
    write_lines(root / "test.txt", TEST)
    with open(root / "held_out.jsonl", "w") as f:
        for line in HELD_OUT:
            words = line.split()
            f.write(json.dumps({"prompt": " ".join(words[:3]) + " ",
                                "completion": " ".join(words[3:])}) + "\n")
    return root, runs


def _soup(*args):
    return main(["soup", *map(str, args), "--quiet"])


def _stored(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _held_out_loss(model_dir, data, base=None, dtype=torch.float32):
    """The held-out loss of the model in ``model_dir``, loaded in ``dtype`` ("auto": as
    stored, the dtype a job evaluates a bf16 soup in)."""
    from transformers import AutoModelForCausalLM

    from upcycle.tasks.causal_lm import evaluate

    task = CausalLMTask(model_dir, base_dir=base, max_length=16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return evaluate(model, task.batches(task.read(data), 4))["loss"]


# -- soups of full causal-LM checkpoints ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lm_soup_cli_uniform_is_the_mean_and_mehl_lowers_held_out_loss(lm_runs, tmp_path, kind,
                                                                       capsys):
    from transformers import AutoModelForCausalLM

    root, runs = lm_runs
    held = root / ("held_out.txt" if kind == "gpt2" else "held_out.jsonl")
    common = ["--held-out", held, "--test", root / "test.txt", "--max-length", "16",
              "--batch-size", "4"]
    assert _soup("--method", "uniform", *runs[kind], "--out", tmp_path / "uniform", *common) == 0
    printed = capsys.readouterr().out
    assert "held-out ppl" in printed and "test ppl" in printed and "acc" not in printed
    stored = _stored(tmp_path / "uniform")
    assert "lm_head.weight" not in stored  # tied: written once, under the embedding's name
    ingredients = [_stored(r) for r in runs[kind]]
    for name, value in stored.items():
        mean = sum(ing[name].double() for ing in ingredients) / len(ingredients)
        assert value.dtype == ingredients[0][name].dtype  # bf16 GPT-2 stays bf16
        assert torch.equal(value, mean.to(value.dtype)), name

    out = tmp_path / "mehl"
    assert _soup("--method", "mehl+", *runs[kind], "--out", out, *common, "--model-batch", "3",
                 "--epochs", "3", "--lr", "0.1") == 0
    uniform_report = json.loads((tmp_path / "uniform" / "report.json").read_text())
    report = json.loads((out / "report.json").read_text())
    best, uni = uniform_report["rows"]
    _, soup = report["rows"]
    assert best["method"] == f"best ingredient (1: {kind}-run0)"  # the least perturbed
    for row in (best, uni, soup):
        assert row["held_out_perplexity"] == pytest.approx(2.718281828 ** row["held_out_loss"])
        assert {"test_loss", "test_perplexity"} <= set(row) and "held_out_accuracy" not in row
    assert soup["held_out_loss"] < uni["held_out_loss"] - 0.02
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert loaded.generation_config.max_new_tokens == 7
    stored = _stored(out)
    assert "lm_head.weight" not in stored
    assert {t.dtype for t in stored.values()} == {_stored(runs[kind][0])[WTE[kind]].dtype}
    if kind == "gpt2":  # held-out .txt: the written soup reproduces the reported loss, in
        # the dtype it is stored and was fitted in (bf16; an fp32 evaluation differs by ~1e-4)
        assert _held_out_loss(out, held, dtype="auto") == pytest.approx(soup["held_out_loss"],
                                                                         abs=1e-6)


@pytest.mark.parametrize("method", ["greedy", "learned", "learned+", "mehl"])
def test_every_soup_method_runs_on_causal_lms(lm_runs, tmp_path, method):
    from transformers import AutoModelForCausalLM

    root, runs = lm_runs
    out = tmp_path / "soup"
    assert _soup("--method", method, *runs["llama"], "--out", out, "--held-out",
                 root / "held_out.txt", "--max-length", "16", "--batch-size", "6", "--epochs",
                 "1", "--model-batch", "2") == 0
    report = json.loads((out / "report.json").read_text())
    best, soup = report["rows"]
    assert soup["held_out_loss"] > 0 and "held_out_perplexity" in soup
    if method == "greedy":  # scored by held-out loss: starts from the best ingredient
        assert soup["held_out_loss"] <= best["held_out_loss"] + 1e-9
        assert report["soup"]["info"]["accepted"][0] == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_task_flag_and_data_carved_from_one_file(lm_runs, tmp_path):
    root, runs = lm_runs
    out = tmp_path / "soup"
    long = write_lines(tmp_path / "long.txt", CORPUS * 2)
    assert _soup("--method", "greedy", *runs["gpt2"], "--out", out, "--task", "causal-lm",
                 "--data", long, "--held-out-fraction", "0.3", "--chunk", "--max-length",
                 "16") == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert "test_perplexity" in rows[-1]  # the rest of --data is the test split


# -- LoRA adapters as ingredients ----------------------------------------------------------------

def _adapters(kind, tokenizer, root, configs, *, base_name="base"):
    """A base folder (with tokenizer), peft adapter folders trained 'on' it (recorded base
    path) and the merged state dict of each."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_lm(tiny_lm(kind, tie=(kind == "gpt2"), seed=1), root / base_name, tokenizer)
    folders, merged = [], []
    for i, cfg in enumerate(configs):
        torch.manual_seed(10 + i)
        model = AutoModelForCausalLM.from_pretrained(base)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **cfg))
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        folder = root / f"{base_name}-adapter{i}"
        peft_model.save_pretrained(folder)
        merged.append({k: v.detach().clone()
                       for k, v in peft_model.merge_and_unload().state_dict().items()})
        folders.append(folder)
    return base, folders, merged


GPT2_LORA = [dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
             dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                  use_rslora=True)]
LLAMA_LORA = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
              dict(r=2, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"])]


@pytest.mark.parametrize("kind,configs", [("gpt2", GPT2_LORA), ("llama", LLAMA_LORA)])
def test_lora_adapter_soup_is_the_mean_of_the_merged_models(kind, configs, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, folders, merged = _adapters(kind, tokenizer, tmp_path, configs)
    out = tmp_path / "soup"
    assert _soup("--base", base, *folders, "--out", out) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in merged[0]:
        mean = sum(m[name].double() for m in merged) / len(merged)
        assert torch.allclose(loaded[name].double(), mean, atol=1e-6, rtol=0), name
    # not the model of the mean A and mean B: the two differ on an adapted matrix
    name = "transformer.h.0.attn.c_attn.weight" if kind == "gpt2" else \
        "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(loaded[name], merged[0][name], atol=1e-4)
    AutoTokenizer.from_pretrained(out)  # the base's tokenizer comes along


def test_adapters_and_full_checkpoints_mix_and_fit_on_data(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    base, folders, merged = _adapters("gpt2", tokenizer, tmp_path, GPT2_LORA)
    full_model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in full_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full = save_lm(full_model, tmp_path / "full")  # no tokenizer of its own
    out = tmp_path / "soup"
    assert _soup("--base", base, folders[0], full, folders[1], "--out", out) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    full_state = full_model.state_dict()
    for name, value in loaded.items():
        mean = (merged[0][name].double() + full_state[name].double()
                + merged[1][name].double()) / 3
        assert torch.allclose(value.double(), mean, atol=1e-6, rtol=0), name
    held = write_lines(tmp_path / "held.txt", HELD_OUT)
    out2 = tmp_path / "mehl"
    assert _soup("--method", "mehl+", "--base", base, folders[0], full, folders[1], "--out",
                 out2, "--held-out", held, "--max-length", "16", "--epochs", "1",
                 "--model-batch", "2") == 0
    row = json.loads((out2 / "report.json").read_text())["rows"][-1]
    assert _held_out_loss(out2, held) == pytest.approx(row["held_out_loss"], abs=1e-4)


# -- bad input: one clear line, nothing written --------------------------------------------------

def _fails(capsys, out, *args):
    capsys.readouterr()  # the test's own saves and loads (bars in transformers 5): not the verb's
    assert main(["soup", *map(str, args), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("upcycle soup: error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


def test_lm_soup_bad_inputs(lm_runs, tokenizer, tmp_path, capsys):
    root, runs = lm_runs
    ings = runs["llama"]
    out = tmp_path / "soup"
    empty = write_lines(tmp_path / "empty.txt", ["", "   "])
    assert "empty.txt: is empty" in _fails(capsys, out, "--method", "greedy", *ings,
                                           "--held-out", empty)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"the cat\nthe dog\nna\xefve caf\xe9\n")
    assert "latin1.txt, line 3: not UTF-8" in _fails(capsys, out, "--method", "greedy", *ings,
                                                      "--held-out", bad)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "the cat"}\n{"body": "the dog"}\n')
    assert "rows.jsonl, line 2: no 'text' field" in _fails(
        capsys, out, "--method", "greedy", *ings, "--held-out", rows)
    pc = tmp_path / "pc.jsonl"
    pc.write_text('{"prompt": "the", "completion": "cat"}\n{"prompt": "the"}\n')
    assert "pc.jsonl, line 2: no 'completion' field" in _fails(
        capsys, out, "--method", "greedy", *ings, "--held-out", pc)
    assert "max_length 65 exceeds the position limit" in _fails(
        capsys, out, "--method", "greedy", *ings, "--held-out", root / "held_out.txt",
        "--max-length", "65")

    # no tokenizer in any ingredient nor in --base
    bare = [save_lm(tiny_lm("gpt2", seed=s), tmp_path / f"bare{s}") for s in (1, 2)]
    no_tok_base = save_lm(tiny_lm("gpt2"), tmp_path / "no-tok-base")
    err = _fails(capsys, out, "--method", "greedy", *bare, "--base", no_tok_base,
                 "--held-out", root / "held_out.txt")
    assert "no tokenizer in any ingredient or --base" in err and "bare2" in err \
        and "no-tok-base" in err

    # adapters: without --base, and on another base than --base
    base, folders, _ = _adapters("gpt2", tokenizer, tmp_path, GPT2_LORA)
    assert "pass --base" in _fails(capsys, out, *folders)
    other = save_lm(tiny_lm("gpt2", seed=5), tmp_path / "other-base", tokenizer)
    err = _fails(capsys, out, "--base", other, *folders)
    assert "adapter" in err and "weights differ from the base" in err and "other-base" in err
    llama_base = save_lm(tiny_lm("llama"), tmp_path / "llama-base", tokenizer)
    err = _fails(capsys, out, "--base", llama_base, *folders)
    assert "an adapter for another base" in err
    assert not list(tmp_path.glob(".soup*"))  # no temporary or partial folder left either


# -- tune on a causal LM ---------------------------------------------------------------------------

def test_tune_snell_on_a_causal_lm_merged_and_reloaded(lm_runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = lm_runs
    base = root / "gpt2-base"  # random tiny GPT-2 with a tokenizer that has no pad token
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    train = write_lines(tmp_path / "train.txt", CORPUS)
    held = root / "held_out.txt"
    before = _held_out_loss(base, held)
    out = tmp_path / "run"
    assert main(["tune", "--method", "snell", "--model", str(base), "--data", str(train),
                 "--held-out", str(held), "--test", str(root / "test.txt"), "--r", "4",
                 "--max-length", "16", "--batch-size", "8", "--grad-accum", "2",
                 "--max-steps", "12", "--lr", "1e-1", "--out", str(out), "--merge",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "test perplexity" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm"
    held_metrics = report["held_out_metrics"]
    assert held_metrics["loss"] < before - 0.03
    assert held_metrics["perplexity"] == pytest.approx(2.718281828 ** held_metrics["loss"])
    assert report["merge_max_abs_logit_diff"] < 1e-4
    merged = out / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.pad_token_id == 0
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.pad_token == tok.eos_token
    assert _held_out_loss(merged, held) == pytest.approx(held_metrics["loss"], abs=1e-4)


def test_tune_lm_collator_counts_target_tokens(lm_runs, tmp_path):
    """Trainer averages the loss over the label tokens it counts: the collator leaves only
    target tokens (never a row's first position, nor padding or prompts) unmasked."""
    root, _ = lm_runs
    task = CausalLMTask(root / "llama-base", max_length=16)
    data = task.read(root / "held_out.jsonl")
    collate, dataset = task.collator(), task.dataset(data)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert int((batch["labels"] != -100).sum()) == data.target_tokens()
    ref = task.batches(data, len(data))[0]
    model = tiny_lm("llama")
    hf_loss = model(**batch).loss
    assert float(hf_loss) == pytest.approx(float(causal_lm_loss(model, ref)), rel=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--max-length", "65"], "max_length 65 exceeds the position limit"),
    (["--method", "sherl", "--reduction", "5"], "reduction 5 does not divide the hidden size"),
    (["--chunk", "--task", "classification"], "--chunk applies to causal-LM tasks"),
])
def test_tune_lm_bad_input(lm_runs, tmp_path, capsys, extra, message):
    root, _ = lm_runs
    out = tmp_path / "run"
    args = ["tune", "--method", "snell", "--model", str(root / "gpt2-base"), "--data",
            str(root / "held_out.txt"), "--out", str(out), "--quiet", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "run.checkpoints").exists()


def test_tune_lm_jsonl_without_text(lm_runs, tmp_path, capsys):
    root, _ = lm_runs
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "the cat"}\n{"label": 1}\n')
    out = tmp_path / "run"
    assert main(["tune", "--method", "snell", "--model", str(root / "gpt2-base"), "--data",
                 str(rows), "--out", str(out), "--quiet"]) == 2
    assert "rows.jsonl, line 2: no 'text' field" in capsys.readouterr().err
    assert not out.exists()


def test_tune_classification_on_a_decoder_without_pad_token(lm_runs, tmp_path, capsys):
    """--task classification on GPT-2: the pad token is set to EOS (tokenizer and config),
    so batches of more than one example work."""
    from transformers import AutoModelForSequenceClassification

    root, _ = lm_runs
    data = tmp_path / "labels.jsonl"
    with open(data, "w") as f:
        for i, line in enumerate(CORPUS):
            f.write(json.dumps({"text": line, "label": i % 2}) + "\n")
    out = tmp_path / "run"
    assert main(["tune", "--method", "snell", "--task", "classification", "--model",
                 str(root / "gpt2-base"), "--data", str(data), "--r", "4", "--max-steps", "2",
                 "--batch-size", "4", "--out", str(out), "--merge", "--quiet"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    model = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert model.config.pad_token_id == 0


def test_tune_lm_loss_is_the_global_token_mean_under_torchrun(lm_runs, tmp_path):
    """Two gloo ranks holding unequal numbers of target tokens: the step's loss is the mean
    over all target tokens of the batch (as in one process), not a mean of per-rank means."""
    import os
    import subprocess
    import sys

    root, _ = lm_runs
    data = tmp_path / "pc.jsonl"
    with open(data, "w") as f:
        for i, line in enumerate(CORPUS[:8]):
            words = line.split()
            f.write(json.dumps({"prompt": words[0] + " ",
                                "completion": " ".join(words[1:2 + 2 * i])}) + "\n")
    args = ["tune", "--method", "snell", "--model", str(root / "llama-pretrained"), "--data",
            str(data), "--held-out", str(data), "--dropout", "0", "--drop-path",
            "0", "--max-steps", "1", "--batch-size", "8", "--logging-steps", "1", "--device",
            "cpu", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "upcycle.cli.main", *args, "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun(["-m", "upcycle.cli.main", *args, "--out", tmp_path / "two"])
    first = [json.loads((tmp_path / name / "report.json").read_text())["log_history"][0]["loss"]
             for name in ("one", "two")]
    assert first[0] == pytest.approx(first[1], abs=2e-4)  # Trainer logs 4 decimals
