"""Tiny causal LMs and a byte-level BPE tokenizer built in the test (offline, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "stocks fell as the market opened lower on monday",
    "the team won the match after a late goal in the second half",
    "a new phone was launched with a larger screen and a faster chip",
    "the minister said the budget would cut taxes for small firms",
    "the film won three awards at the ceremony on sunday night",
] * 4


def tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def tiny_lm(kind: str = "gpt2", *, tie: bool = True, vocab_size: int = 320, positions: int = 64,
            seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random 2-layer, hidden-32 causal LM (GPT-2 or Llama)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab_size,
                         n_positions=positions, tie_word_embeddings=tie, eos_token_id=0,
                         bos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab_size,
                          max_position_embeddings=positions, tie_word_embeddings=tie,
                          eos_token_id=0, bos_token_id=0, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def save_lm(model, folder: Path, tokenizer=None) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
