"""The language-model benchmark's ingredients: a BPE tokenizer and a small base of one family
(``Sizes.family``: Llama-style, or Qwen2-style with grouped-query attention and q/k/v biases;
both with tied embeddings) pretrained on BBC News, then full and LoRA fine-tunes on topic-skewed
mixes (transformers Trainer / peft). The Qwen2 family's LoRA adapters also train the tied
embedding/head, through peft's ``ensure_weight_tying=True``: alternately a LoRA on
``embed_tokens`` and ``modules_to_save=["embed_tokens"]``. Everything is cached under a folder with its recipe recorded
(``recipe.json``): a rerun with the same recipe skips it, a changed recipe retrains.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOS = "<|endoftext|>"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Sizes:
    vocab: int = 4096
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    seq: int = 128
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    ft_steps: int = 120
    batch: int = 16
    n: int = 10
    held_out_docs: int = 150
    test_docs: int = 300
    docs: int = 0
    """Use only this many articles in all (0: all 2225), for a quick run."""
    family: str = "llama"
    """The base's architecture: ``llama`` or ``qwen2`` (see :data:`FAMILIES`)."""


FAMILIES = ("llama", "qwen2")


QUICK = Sizes(vocab=1024, hidden=96, layers=3, heads=4, seq=96, pretrain_steps=250,
              ft_steps=50, batch=16, n=10, held_out_docs=60, test_docs=150, docs=1200)


def recipes(n: int) -> list[dict]:
    """n fine-tune recipes: full fine-tunes and LoRA, varied by topic mix, learning rate, seed.
    A mix gives each BBC class (business, entertainment, politics, sport, tech) a weight."""
    mixes = [
        [4, 1, 1, 1, 1], [1, 4, 1, 1, 1], [1, 1, 4, 1, 1], [1, 1, 1, 4, 1], [1, 1, 1, 1, 4],
        [3, 1, 3, 1, 1], [1, 3, 1, 3, 1], [1, 1, 1, 3, 3], [2, 2, 1, 1, 2], [1, 1, 1, 1, 1],
    ]
    out = []
    for i in range(n):
        lora = i % 2 == 1
        out.append({
            "name": f"{i:02d}-{'lora' if lora else 'full'}",
            "kind": "lora" if lora else "full",
            "mix": mixes[i % len(mixes)],
            "lr": ([1e-3, 3e-3] if lora else [3e-4, 1e-3])[(i // 2) % 2] * (1 + (i // 10)),
            "seed": i,
        })
    return out


def _recorded(folder: Path, recipe: dict) -> bool:
    f = folder / "recipe.json"
    return f.is_file() and json.loads(f.read_text()) == json.loads(json.dumps(recipe))


def _finish(tmp: Path, folder: Path, recipe: dict) -> None:
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def splits(sizes: Sizes, seed: int = 0) -> dict:
    """BBC News articles cut into pretrain / fine-tune pool / held-out / test (disjoint)."""
    from upcycle.demo.data import bbc_news

    texts, labels, classes = bbc_news()
    order = np.random.default_rng(seed).permutation(len(texts))
    if sizes.docs:
        order = order[: sizes.docs]
    test = order[: sizes.test_docs]
    held = order[sizes.test_docs: sizes.test_docs + sizes.held_out_docs]
    rest = order[sizes.test_docs + sizes.held_out_docs:]
    cut = int(0.6 * len(rest))
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return {"pretrain": pick(rest[:cut]), "finetune": pick(rest[cut:]), "held_out": pick(held),
            "test": pick(test), "classes": classes}


def _train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, model_max_length=100_000)


class _Blocks:
    """Packed blocks as a torch-style dataset for transformers.Trainer."""

    def __init__(self, data):
        import torch

        self.items = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(lab),
                       "attention_mask": torch.ones(len(ids), dtype=torch.long)}
                      for ids, lab in zip(data.input_ids, data.labels) if len(ids) == len(lab)]
        width = max(len(x["input_ids"]) for x in self.items)
        self.items = [x for x in self.items if len(x["input_ids"]) == width]  # drop the tail

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _trainer(model, dataset, *, steps: int, lr: float, batch: int, seed: int, out: Path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, warmup_steps=0.1, lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], use_cpu=True,
        seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=dataset)


def _config(sizes: Sizes, tok):
    """The base's config: ``sizes.family``'s architecture at these sizes, tied embeddings."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tok), hidden_size=sizes.hidden,
                  intermediate_size=int(sizes.hidden * 8 / 3) // 8 * 8,
                  num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                  max_position_embeddings=sizes.seq, tie_word_embeddings=True,
                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.eos_token_id)
    if sizes.family == "llama":
        return LlamaConfig(num_key_value_heads=sizes.heads, **common)
    if sizes.family == "qwen2":  # grouped-query attention (2 heads per key/value head)
        return Qwen2Config(num_key_value_heads=max(1, sizes.heads // 2), **common)
    raise ValueError(f"family {sizes.family!r}: expected one of {', '.join(FAMILIES)}")


def _lora_config(sizes: Sizes, recipe: dict):
    """The LoRA of a recipe: r=8 on every projection; for qwen2 the tied embedding/head is
    trained too (tied through ``ensure_weight_tying``), as a LoRA on it for even-numbered
    adapters, saved whole (``modules_to_save``) for the others."""
    from peft import LoraConfig

    if sizes.family != "qwen2":
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    if (recipe["seed"] // 2) % 2 == 0:
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, ensure_weight_tying=True,
                          target_modules=[*LORA_TARGETS, "embed_tokens"])
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, ensure_weight_tying=True,
                      target_modules=LORA_TARGETS, modules_to_save=["embed_tokens"])


def make_base(cache: Path, sizes: Sizes, data: dict, log=print) -> Path:
    """Tokenizer + pretrained base of ``sizes.family``, cached."""
    import torch
    from transformers import AutoModelForCausalLM

    recipe = {"what": "base", **{k: v for k, v in asdict(sizes).items()
                                 if k not in ("ft_steps", "n")}}
    if sizes.family == "llama":  # recorded before there were families: caches stay valid
        del recipe["family"]
    folder = cache / "base"
    if _recorded(folder, recipe):
        return folder
    tmp = cache / ".base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = _train_tokenizer(data["pretrain"][0], sizes.vocab)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(sizes, tok))
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp)  # config + random weights, so the task can read the folder
    blocks = _Blocks(_task(tmp, sizes).encode([(None, t) for t in data["pretrain"][0]]))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[setup] base: {n_params / 1e6:.2f}M parameters, {len(blocks)} blocks of {sizes.seq} "
        f"tokens, {sizes.pretrain_steps} steps")
    _trainer(model, blocks, steps=sizes.pretrain_steps, lr=sizes.pretrain_lr, batch=sizes.batch,
             seed=0, out=tmp / "trainer").train()
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    model.save_pretrained(tmp)
    _finish(tmp, folder, recipe)
    return folder


def _task(folder: Path, sizes: Sizes):
    from upcycle.tasks.causal_lm import CausalLMTask

    return CausalLMTask(folder, max_length=sizes.seq)


def _mix_texts(data: dict, mix: list[int], seed: int) -> list[str]:
    """The fine-tune pool resampled so class c has weight mix[c] (the heaviest class whole)."""
    texts, labels = data["finetune"]
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    top = max(mix)
    chosen = []
    for c, w in enumerate(mix):
        idx = np.flatnonzero(labels == c)
        k = int(round(len(idx) * w / top))
        chosen += rng.choice(idx, size=k, replace=False).tolist()
    rng.shuffle(chosen)
    return [texts[i] for i in chosen]


def make_ingredients(cache: Path, sizes: Sizes, data: dict, base: Path, log=print) -> list[Path]:
    """Fine-tune the base once per recipe (cached); return the ingredient folders."""
    import torch
    from transformers import AutoModelForCausalLM

    base_recipe = json.loads((base / "recipe.json").read_text())
    folders = []
    for recipe in recipes(sizes.n):
        full = {**recipe, "steps": sizes.ft_steps, "batch": sizes.batch, "base": base_recipe}
        folder = cache / "ingredients" / recipe["name"]
        folders.append(folder)
        if _recorded(folder, full):
            continue
        tmp = folder.parent / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        task = _task(base, sizes)
        blocks = _Blocks(task.encode([(None, t) for t in _mix_texts(data, recipe["mix"],
                                                                   recipe["seed"])]))
        torch.manual_seed(recipe["seed"])
        model = AutoModelForCausalLM.from_pretrained(base)
        if recipe["kind"] == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, _lora_config(sizes, recipe))
        log(f"[setup] fine-tune {recipe['name']} ({recipe['kind']}, mix {recipe['mix']}, lr "
            f"{recipe['lr']:g}): {len(blocks)} blocks, {sizes.ft_steps} steps")
        _trainer(model, blocks, steps=sizes.ft_steps, lr=recipe["lr"], batch=sizes.batch,
                 seed=recipe["seed"], out=tmp / "trainer").train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        if recipe["kind"] == "full":
            task.tokenizer.save_pretrained(tmp)
        _finish(tmp, folder, full)
    return folders


def prepare(cache: Path, sizes: Sizes, log=print) -> dict:
    """Base, ingredients and the held-out / test files; returns their paths."""
    import torch

    from upcycle.io.writing import atomic_file

    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(os.environ.get("UPCYCLE_THREADS", "1"))))
    data = splits(sizes)
    base = make_base(cache, sizes, data, log)
    folders = make_ingredients(cache, sizes, data, base, log)
    files = {}
    for split in ("held_out", "test"):
        path = cache / f"{split}.jsonl"
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in data[split][0]))
        files[split] = str(path)
    return {"base": str(base), "ingredients": [str(f) for f in folders], **files}
