"""SHERL on a causal LM against peft LoRA and full fine-tuning: perplexity, memory, step time.

    .venv/bin/python benchmarks/sherl_lm.py --quick    # lm_soup's quick base (minutes on a CPU)
    .venv/bin/python benchmarks/sherl_lm.py            # lm_soup's ~2.6M-parameter base

The base is the Llama-style model of ``benchmarks/lm_soup.py`` (a byte-level BPE and a small
Llama pretrained on BBC News, ``benchmarks/lm_setup.py``; cached and shared with lm_soup). Every
contender fine-tunes it with ``transformers.Trainer`` on lm_soup's fine-tune pool (all topics)
for the same steps, batch and blocks, each in a fresh subprocess:
SHERL M=1 (MTSA over every early layer, the last layer and the LM head frozen, started as
the base), SHERL M=1 with the late layer trained, peft LoRA r=8 on every projection (no
dropout), full fine-tuning. Reported: held-out and test perplexity, trainable parameters,
bytes saved for backward in one training step (every tensor autograd keeps, parameters
excluded: allocator-independent), the fresh process's peak RSS, and seconds per step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from upcycle.jobs.bench import main  # noqa: E402

CONTENDERS = {
    "base (no training)": {"kind": "base"},
    "SHERL M=1": {"kind": "sherl", "lr": 3e-3},
    "SHERL M=1, lr 1e-2": {"kind": "sherl", "lr": 1e-2},
    "SHERL M=1 + late layer": {"kind": "sherl", "lr": 1e-3, "train_late_layers": True},
    "LoRA r=8": {"kind": "lora", "lr": 3e-3},
    "full fine-tuning": {"kind": "full", "lr": 1e-3},
}


def saved_for_backward(model, batch) -> int:
    """Bytes autograd keeps for one forward + backward, each storage once, the model's
    parameters excluded (they are resident anyway)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def wrap(model, spec: dict):
    from lm_setup import LORA_TARGETS

    kind = spec["kind"]
    if kind == "sherl":
        from upcycle.tune.sherl import SherlConfig, get_sherl_model

        return get_sherl_model(model, SherlConfig(
            late_layers=1, train_late_layers=spec.get("train_late_layers", False)))
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=LORA_TARGETS))
    return model


def run_worker(spec: dict) -> dict:
    import torch
    from lm_setup import _Blocks, _trainer

    from upcycle.runtime.memory import peak_rss_mb
    from upcycle.tasks.causal_lm import CausalLMTask
    from upcycle.tune.adapter import count_parameters

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    paths = spec["paths"]
    task = CausalLMTask(paths["base"], max_length=spec["seq"])
    held = task.batches(task.read(paths["held_out"], split="held-out"), spec["batch"])
    test = task.batches(task.read(paths["test"], split="test"), spec["batch"])
    model = wrap(task.load_model(), spec)
    trainable, total = count_parameters(model)
    row = {"trainable_params": trainable, "all_params": total}
    if spec["kind"] != "base":
        blocks = _Blocks(task.encode([(None, json.loads(line)["text"]) for line in
                                      Path(paths["finetune"]).read_text().splitlines()]))
        probe = {k: torch.stack([blocks[i][k] for i in range(spec["batch"])])
                 for k in ("input_ids", "labels", "attention_mask")}
        row["saved_mb"] = saved_for_backward(model, probe) / 2**20
        trainer = _trainer(model, blocks, steps=spec["steps"], lr=spec["lr"],
                           batch=spec["batch"], seed=0, out=Path(spec["out"]))
        start = time.perf_counter()
        trainer.train()
        row["s_per_step"] = (time.perf_counter() - start) / spec["steps"]
        row["train_blocks"] = len(blocks)
    model.eval()
    row["held_out_ppl"] = task.evaluate(model, held)["perplexity"]
    row["test_ppl"] = task.evaluate(model, test)["perplexity"]
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def contenders(args) -> list[dict]:
    import torch
    from lm_setup import make_base, splits
    from lm_soup import sizes_of  # the same sizes and overrides as lm_soup

    from upcycle.io.writing import atomic_file

    sizes = sizes_of(args)
    cache = Path(args.cache or Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" /
                                                   "upcycle")) / ("lm_soup-quick" if args.quick
                                                                   else "lm_soup"))
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(os.environ.get("UPCYCLE_THREADS", "1"))))
    data = splits(sizes)
    paths = {"base": str(make_base(cache, sizes, data,
                                   log=lambda m: print(m, file=sys.stderr, flush=True)))}
    for split in ("finetune", "held_out", "test"):
        path = cache / f"sherl_lm-{split}.jsonl"
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in data[split][0]))
        paths[split] = str(path)
    common = {"paths": paths, "seq": sizes.seq, "batch": sizes.batch, "steps": sizes.ft_steps,
              "threads": int(os.environ.get("UPCYCLE_THREADS", "1")),
              "out": str(cache / "sherl_lm-trainer")}
    return [{"name": name, **common, **spec} for name, spec in CONTENDERS.items()]


def _arguments(parser) -> None:
    from lm_soup import add_size_arguments

    parser.add_argument("--quick", action="store_true", help="small sizes (lm_setup.QUICK)")
    parser.add_argument("--cache", default=None, help="where the base is cached (default "
                        "$UPCYCLE_CACHE/lm_soup[-quick], shared with lm_soup.py)")
    add_size_arguments(parser)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    main(
        Path(__file__).resolve(), contenders, run_worker,
        columns=[("name", "contender", ""), ("held_out_ppl", "held-out ppl", ".2f"),
                 ("test_ppl", "test ppl", ".2f"), ("trainable_params", "trainable", ",d"),
                 ("saved_mb", "saved for backward (MiB)", ".2f"),
                 ("peak_rss_mb", "peak RSS (MiB)", ".0f"), ("s_per_step", "s/step", ".3f")],
        description=__doc__,
        out_json=Path(__file__).resolve().parent / "results" /
        ("sherl_lm-quick.json" if quick else "sherl_lm.json"),
        add_arguments=_arguments,
    )
    sys.exit(0)
