"""torch.compile of a SNELL model against eager SNELL and peft LoRA (eager and compiled).

Each contender in a fresh subprocess (upcycle.jobs.bench): a random Llama-shaped causal LM
(default: hidden 1024, intermediate 2816, 2 layers, 16 heads, sequence 256, batch 1, a
vocabulary of 1024 so the head stays small), adapted on q, k, v, o, gate, up and down with
r = 8 and adapter dropout 0.1 (SNELL: sparsity 0.5, DropPath 0.1 as its defaults), trained
``--steps`` steps (forward, backward, AdamW) then evaluated twice (no_grad). Compiled
contenders wrap the model in ``torch.compile`` (``--backend``, default inductor); SNELL's
threshold search runs in its custom operators, outside the graph
(upcycle.tune.snell.autograd). ``snell compiled (graph breaks)`` measures the other option:
the autograd Function behind ``torch.compiler.disable``, a graph break at every layer.

Reported: graphs (dynamo frames compiled, training and evaluation), recompiles (graphs
compiled after the first training step and the first evaluation: 0 when nothing is
recompiled per step), graph breaks, compile seconds (the first step minus the steady step,
training plus evaluation), the steady seconds per training step (median of the steps after
the second) and per evaluation, the median CPU time of the process per training step (less
disturbed than wall time when other jobs share the CPU), and the peak RSS of the process.
One torch thread and one inductor compile thread (the CPU is shared).

    .venv/bin/python benchmarks/snell_compile.py                  # the Llama-shaped stack
    .venv/bin/python benchmarks/snell_compile.py --model small    # a tiny Llama (hidden 64)
    .venv/bin/python benchmarks/snell_compile.py --model bert     # a tiny BERT classifier

Writes benchmarks/results/snell_compile[_MODEL].{json,md}.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]
MODELS = {
    "llama": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 1024,
              "seq": 256},
    "small": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "seq": 64},
    "bert": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 256, "seq": 64},
}


def _model(kind: str):
    shape = dict(MODELS[kind])
    seq = shape.pop("seq")
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        model = BertForSequenceClassification(BertConfig(
            **shape, num_labels=3, max_position_embeddings=seq,
            problem_type="single_label_classification"))
        return model, BERT_TARGETS, seq
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=seq)), TARGETS, seq


def _batch(kind: str, vocab: int, seq: int, step: int, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    batch = {"input_ids": ids}
    if labels:
        batch["labels"] = ids if kind != "bert" else torch.randint(0, 3, (1,), generator=g)
    return batch


def run_worker(spec: dict) -> dict:
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from upcycle.tune.snell import autograd as snell_autograd

    torch.set_num_threads(1)
    torch.manual_seed(0)
    kind = spec["model"]
    model, targets, seq = _model(kind)
    vocab = MODELS[kind]["vocab_size"]
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=targets))
    else:
        from upcycle.tune.snell import SnellConfig, get_snell_model

        snell_autograd.TRACED_ROUTE = spec.get("route", "custom_op")
        model = get_snell_model(model, SnellConfig(r=8, sparsity=0.5, target_modules=targets,
                                                   compile=spec.get("kernel_compile", False)))
    counter = None
    run = model
    if spec["compiled"]:
        counter = CompileCounterWithBackend(spec["backend"])
        run = torch.compile(model, backend=counter)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    graphs = []

    def frames() -> int:
        return counter.frame_count if counter is not None else 0

    model.train()
    train_s, train_cpu = [], []
    for step in range(spec["steps"]):
        t, c = time.perf_counter(), time.process_time()
        run(**_batch(kind, vocab, seq, step)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s.append(time.perf_counter() - t)
        train_cpu.append(time.process_time() - c)
        graphs.append(frames())
    model.eval()
    eval_s = []
    with torch.no_grad():
        for step in range(spec["eval_steps"]):
            t = time.perf_counter()
            run(**_batch(kind, vocab, seq, step, labels=False))
            eval_s.append(time.perf_counter() - t)
            graphs.append(frames())
    steps = spec["steps"]
    steady = statistics.median(train_s[2:] or train_s[-1:])
    steady_eval = statistics.median(eval_s[1:] or eval_s)
    return {
        "graphs": graphs[-1],
        "recompiles": (graphs[steps - 1] - graphs[0]) + (graphs[-1] - graphs[steps]),
        "graph_breaks": sum(counters["graph_break"].values()),
        "compile_s": (train_s[0] - steady) + (eval_s[0] - steady_eval),
        "first_step_s": train_s[0],
        "s_per_step": steady,
        "cpu_s_per_step": statistics.median(train_cpu[2:] or train_cpu[-1:]),
        "eval_s": steady_eval,
        "train_s": train_s,
        "train_cpu_s": train_cpu,
    }


COLUMNS = [("name", "contender", ""), ("graphs", "graphs", "d"),
           ("recompiles", "recompiles", "d"), ("graph_breaks", "graph breaks", "d"),
           ("compile_s", "compile s", ".1f"), ("first_step_s", "first step s", ".2f"),
           ("s_per_step", "steady s/step", ".3f"), ("cpu_s_per_step", "CPU s/step", ".3f"),
           ("eval_s", "eval s/pass", ".3f"),
           ("peak_rss_mb", "peak RSS MiB", ".0f")]


def contenders(args) -> list[dict]:
    common = {"model": args.model, "steps": args.steps, "eval_steps": 3,
              "backend": args.backend}
    specs = [
        {"name": "snell eager", "method": "snell", "compiled": False},
        {"name": "snell compiled", "method": "snell", "compiled": True},
        {"name": "snell compiled (graph breaks)", "method": "snell", "compiled": True,
         "route": "disable"},
        {"name": "lora eager", "method": "lora", "compiled": False},
        {"name": "lora compiled", "method": "lora", "compiled": True},
    ]
    if args.kernel_compile:
        specs += [
            {"name": "snell eager, kernel compile=True", "method": "snell", "compiled": False,
             "kernel_compile": True},
            {"name": "snell compiled, kernel compile=True", "method": "snell",
             "compiled": True, "kernel_compile": True},
        ]
    return [{**common, **s, "name": s["name"] + (f" #{r + 1}" if args.rounds > 1 else "")}
            for r in range(args.rounds) for s in specs]


def _add_arguments(parser) -> None:
    parser.add_argument("--model", default="llama", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every contender this many times, round after round (a "
                             "shared CPU's timings vary)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--kernel-compile", action="store_true",
                        help="also SNELL with SnellConfig(compile=True)")


def main() -> None:
    from upcycle.io.writing import atomic_file
    from upcycle.jobs.bench import format_table
    from upcycle.jobs.bench import main as bench_main

    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "llama"
    out_json = RESULTS / ("snell_compile" + ("" if model == "llama" else f"_{model}") + ".json")
    rows = bench_main(__file__, contenders, run_worker, COLUMNS,
                      description=__doc__.split("\n\n")[0], out_json=out_json,
                      add_arguments=_add_arguments)
    if not rows or "--out" in sys.argv:  # a --worker run, or written elsewhere
        return
    shape = ", ".join(f"{k} {v}" for k, v in MODELS[model].items())
    text = (f"Command: `python benchmarks/snell_compile.py {' '.join(sys.argv[1:])}`\n\n"
            f"{model}: {shape}; batch 1; CPU, one thread, torch {torch.__version__}.\n\n"
            + format_table(rows, COLUMNS) + "\n")
    with atomic_file(out_json.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    print(f"table written to {out_json.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
