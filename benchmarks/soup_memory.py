"""Peak memory and time of Learned-Soup+ vs MEHL-Soup+ as the number of ingredients grows,
in two regimes.

    .venv/bin/python benchmarks/soup_memory.py                     # both regimes
    .venv/bin/python benchmarks/soup_memory.py --regime base       # weights dominate only
    .venv/bin/python benchmarks/soup_memory.py --regime minilm --quick
    python benchmarks/soup_memory.py --device cuda --memory-budget 70 --out ...  # on a GPU

Regimes:

* ``minilm`` (activations dominate): MiniLM-sized BERT classifiers (the real
  all-MiniLM-L6-v2 plus a 5-class head, 87 MB each), held-out 128 BBC News articles,
  128 tokens, batch 32, N in {4, 8, 16, 32}, K = 4.
* ``base`` (weights dominate, the paper's regime): BERT-base-sized classifiers (the real
  MiniLM grown losslessly with LEMON, ``upcycle.grow.expand``, to 12 layers x 768, 438 MB
  each), a small held-out set (16 articles, 64 tokens, batch 8), N in {4, 8, 16, 32},
  K = 4. Learned-Soup+ is skipped where its predicted need is over the memory budget.

Ingredients are perturbed copies (Gaussian noise of 1% of each tensor's std, seeded) saved
as .safetensors in the cache, built once. Every contender runs in a fresh subprocess
(:mod:`upcycle.jobs.bench`) under an address-space limit (``--memory-budget``, RLIMIT_AS), so an
over-budget run fails inside its own process and is recorded as "out of memory" rather than
waking the system OOM killer; a contender whose predicted need is clearly over the budget is
not started and the prediction is recorded. Each contender runs the same number of held-out
epochs (1 per MEHL round, 1 for learned+) and reports:

* peak RSS of its process and its peak above the RSS when the soup started (imports, one
  model, data);
* an allocator-independent figure, ``live tensors``: at the end of every forward, the bytes
  of all distinct tensor storages reachable from Python (the model, the ingredients /
  anchor / directions, the mixed weights, optimizer state) plus those saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``), the maximum over the run; ``saved for
  backward`` is the second part alone (the activations);
* time per held-out epoch (the measurement hooks' own time is subtracted).

MEHL+ runs with its directions resident (``--directions resident``: the anchor and K fp32
directions) and out of core (``--directions out-of-core``: no direction kept, each tensor's K
slices re-read from the ingredients' files at every step; the anchor a file too). The
floor is (K + 1) x model bytes + activations resident, 4 x the largest tensor or piece
(fp32: two slices in flight, the anchor's tensor, the combined tensor; a tensor over
``mehl_offload.PIECE`` elements is handled in pieces of that size) + activations out of
core: what
the method keeps on top of the model that holds the soup, plus the saved
activations measured in the same run; it is compared with the peak above start (which already
excludes the model). ``--directions`` picks one of them (default: both).
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from upcycle.jobs.bench import main  # noqa: E402

K = 4
GIB = 2**30
REGIMES = {
    # held-out examples, batch size, max tokens, sizes
    "minilm": {"held_out": 128, "batch": 32, "max_length": 128, "sizes": [4, 8, 16, 32]},
    "base": {"held_out": 16, "batch": 8, "max_length": 64, "sizes": [4, 8, 16, 32]},
}
# learned+ keeps N ingredients plus the mixed model (fp32) and its gradient; the rest of the
# process (torch, tokenizer, one model, activations) is about 1.5 GiB in both regimes.
LEARNED_FACTOR = 1.1
RUNTIME_GIB = 1.5
DIRECTIONS = {"both": ("resident", "out-of-core"), "resident": ("resident",),
              "out-of-core": ("out-of-core",)}


def cache_dir() -> Path:
    from upcycle.demo.bbc import default_cache

    return default_cache() / "bench-soup-memory"


def model_dir(regime: str) -> Path | str:
    """The HF folder (config, tokenizer) of the regime's model."""
    from upcycle.demo.data import minilm_path

    return minilm_path() if regime == "minilm" else cache_dir() / "bert-base-grown"


def ingredient_paths(regime: str, n: int) -> list[Path]:
    stem = "minilm-perturbed" if regime == "minilm" else "base-grown-perturbed"
    folder = cache_dir() / ("ingredients" if regime == "minilm" else "ingredients-base")
    return [folder / f"{stem}-{i:02d}.safetensors" for i in range(n)]


def _base_model():
    """The real MiniLM with a 5-class head, grown by LEMON to BERT-base size (12 x 768),
    saved once as a HF folder (config + tokenizer + weights)."""
    from upcycle.demo.data import minilm_path
    from upcycle.grow import expand
    from upcycle.tasks.classification import ClassificationTask

    folder = cache_dir() / "bert-base-grown"
    if not (folder / "config.json").is_file():
        task = ClassificationTask(minilm_path(), "text", num_labels=5)
        grown = expand(task.load_model(), hidden_size=768, num_layers=12, seed=0)
        tmp = folder.with_name(folder.name + ".tmp")
        grown.save_pretrained(tmp)
        task.tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    from upcycle.tasks.classification import ClassificationTask as Task

    return Task(folder, "text").load_model()


def make_ingredients(regime: str, n: int) -> list[Path]:
    """Perturbed copies of the regime's model, made once and cached."""
    import torch
    from safetensors.torch import save_file

    paths = ingredient_paths(regime, n)
    if all(p.is_file() for p in paths):
        return paths
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    if regime == "minilm":
        from upcycle.demo.data import minilm_path
        from upcycle.tasks.classification import ClassificationTask

        state = ClassificationTask(minilm_path(), "text", num_labels=5).load_model().state_dict()
    else:
        state = _base_model().state_dict()
    for i, p in enumerate(paths):
        if p.is_file():
            continue
        g = torch.Generator().manual_seed(i)
        noisy = {k: (v + 0.01 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=g))
                 if v.is_floating_point() and v.numel() > 1 else v.clone()
                 for k, v in state.items()}
        tmp = p.with_name(p.name + ".tmp")
        save_file({k: v.contiguous() for k, v in noisy.items()}, str(tmp))
        tmp.rename(p)
        print(f"[bench] wrote {p}", file=sys.stderr, flush=True)
    return paths


class LiveTensors:
    """Allocator-independent memory: at the end of each forward of ``model``, the bytes of
    the distinct storages of every tensor reachable from Python plus those saved for
    backward during that forward; the maximum over the run. Its own time is kept apart."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.saved: dict[int, int] = {}
        self.peak_live = 0
        self.peak_saved = 0
        self.peak_activations = 0
        self.overhead = 0.0
        self.fit_overhead = 0.0  # the part spent in forwards that build a graph (fit steps)
        self._hooks = [model.register_forward_pre_hook(self._pre),
                       model.register_forward_hook(self._post)]
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t) -> tuple[int, int]:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()

    def _pack(self, t):
        start = time.perf_counter()
        if t.device.type != "meta":
            ptr, size = self._key(t)
            if size:
                self.saved[ptr] = size
        self._count(time.perf_counter() - start)
        return t

    def _reachable(self) -> dict[int, int]:
        """Storage -> bytes of every tensor reachable from Python (this includes tensors
        saved for backward: the pack hook hands them to autograd as Python objects)."""
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, self.torch.Tensor) and obj.device.type != "meta":
                    try:
                        ptr, size = self._key(obj)
                    except RuntimeError:
                        continue
                    if size:
                        out[ptr] = size
        return out

    def _pre(self, module, args):
        start = time.perf_counter()
        self.saved = {}
        self.before = set(self._reachable())  # weights, ingredients, directions, inputs
        self._count(time.perf_counter() - start)

    def _post(self, module, args, output):
        start = time.perf_counter()
        reachable = self._reachable()
        # tensors saved for backward that did not exist before the forward: the activations
        activations = sum(v for k, v in self.saved.items() if k not in self.before)
        self.peak_live = max(self.peak_live, sum(reachable.values()))
        self.peak_saved = max(self.peak_saved, sum(self.saved.values()))
        self.peak_activations = max(self.peak_activations, activations)
        self._count(time.perf_counter() - start)

    def _count(self, seconds: float) -> None:
        self.overhead += seconds
        if self.torch.is_grad_enabled():
            self.fit_overhead += seconds

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for h in self._hooks:
            h.remove()


def _limit_address_space(budget: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        budget = min(budget, hard)
    resource.setrlimit(resource.RLIMIT_AS, (budget, hard))


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("can't allocate", "cannot allocate", "out of memory", "not enough memory"))


def run_worker(spec: dict) -> dict:
    if "skip" in spec:  # predicted over budget: not started
        return {"status": "out of memory (predicted; not run)", "why": spec["skip"]}
    device = spec.get("device", "cpu")
    if device == "cpu":  # CUDA reserves far more address space than it uses: no RLIMIT_AS there
        _limit_address_space(int(spec["budget_gib"] * GIB))
    import torch

    from upcycle.demo.data import bbc_news
    from upcycle.io.ingredients import open_ingredients
    from upcycle.runtime.memory import current_rss_mb, peak_rss_mb
    from upcycle.soup import LearnedConfig, MehlConfig, learned_soup, mehl_soup
    from upcycle.tasks.classification import ClassificationTask, LabeledData

    torch.manual_seed(0)
    regime = REGIMES[spec["regime"]]
    ingredients = open_ingredients(ingredient_paths(spec["regime"], spec["n"]))
    task = ClassificationTask(model_dir(spec["regime"]), "text", num_labels=5,
                              max_length=regime["max_length"])
    model = task.load_model().to(device)
    with torch.no_grad():  # materialise the weights in private memory before "start"
        for p in model.parameters():
            p.data = p.data.clone()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    texts, labels, _ = bbc_news()
    m = regime["held_out"]
    data = LabeledData(labels=torch.tensor(labels[:: len(labels) // m][:m]),
                       source="bbc", texts=texts[:: len(texts) // m][:m])
    batches = task.batches(data, regime["batch"])
    gc.collect()
    rss_before = current_rss_mb()
    out = {"rss_before_mb": rss_before, "model_mb": model_bytes / 2**20, "device": device}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        out["cuda_before_mb"] = torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    try:
        with LiveTensors(model) as live:
            if spec["method"] == "learned+":
                learned_soup(ingredients, model, batches, config=LearnedConfig(epochs=1),
                             device=device)
                epochs = 1
            else:
                result = mehl_soup(ingredients, model, batches,
                                   config=MehlConfig(model_batch=spec["k"], epochs=1,
                                                     directions=spec["directions"]),
                                   device=device)
                epochs = len(result.history)
    except Exception as exc:  # over the address-space budget: record it, don't crash
        if not _out_of_memory(exc):
            raise
        return {**out, "status": "out of memory", "why": f"{type(exc).__name__}: {exc}"[:300],
                "peak_rss_mb": peak_rss_mb(), "soup_peak_mb": peak_rss_mb() - rss_before,
                "seconds": time.perf_counter() - start}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start - live.overhead
    out.update({"status": "ok", "peak_rss_mb": peak_rss_mb(),
                "soup_peak_mb": peak_rss_mb() - rss_before, "seconds": seconds,
                "held_out_epochs": epochs, "s_per_epoch": seconds / epochs,
                "live_mb": live.peak_live / 2**20, "saved_mb": live.peak_saved / 2**20,
                "activations_mb": live.peak_activations / 2**20,
                "hook_seconds": live.overhead})
    if torch.device(device).type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["soup_peak_mb"] = out["peak_cuda_mb"] - out["cuda_before_mb"]
    if spec["method"] == "mehl+":
        if spec["directions"] == "resident":  # the anchor and K directions, fp32
            kept = (spec["k"] + 1) * model_bytes
        else:  # two slices in flight, the anchor's tensor and the combined one (fp32)
            from upcycle.soup.mehl_offload import PIECE

            kept = 4 * 4 * min(PIECE, max(p.numel() for p in model.parameters()))
        floor = kept + live.peak_activations
        out["floor_mb"] = floor / 2**20
        out["above_floor"] = out["soup_peak_mb"] / out["floor_mb"]
    return out


def model_bytes_estimate(regime: str) -> int:
    from safetensors import safe_open

    with safe_open(str(ingredient_paths(regime, 1)[0]), framework="pt") as f:
        total = 0
        for name in f.keys():
            sl = f.get_slice(name)
            n = 1
            for s in sl.get_shape():
                n *= s
            total += 4 * n
    return total


def contenders(args) -> list[dict]:
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    regimes.sort(key=lambda r: r != "base")  # the new regime first
    out = []
    for regime in regimes:
        sizes = REGIMES[regime]["sizes"]
        if args.sizes:
            sizes = [int(s) for s in args.sizes.split(",")]
        elif args.quick:
            sizes = sizes[:2]
        make_ingredients(regime, max(sizes))
        model = model_bytes_estimate(regime)
        for n in sorted(sizes):  # cheapest N first
            need = (LEARNED_FACTOR * (n + 2) * model + RUNTIME_GIB * GIB) / GIB
            spec = {"name": f"{regime}: learned+ N={n}", "regime": regime, "method": "learned+",
                    "n": n, "budget_gib": args.memory_budget, "predicted_gib": round(need, 1),
                    "device": args.device}
            if need > args.memory_budget:
                spec["skip"] = (f"predicted {need:.1f} GiB ((N + 2) x {model / GIB:.2f} GiB x "
                                f"{LEARNED_FACTOR} + {RUNTIME_GIB} GiB) > budget "
                                f"{args.memory_budget} GiB: out of memory")
            if not args.no_learned:
                out.append(spec)
            for directions in DIRECTIONS[args.directions]:
                out.append({"name": f"{regime}: mehl+ N={n} K={args.model_batch} {directions}",
                            "regime": regime, "method": "mehl+", "n": n, "k": args.model_batch,
                            "directions": directions, "budget_gib": args.memory_budget,
                            "device": args.device})
    return out


def summarize(rows: list[dict]) -> str:
    by = {(r["regime"], r["method"], r["n"], r.get("directions")): r for r in rows}
    lines = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        lines.append(f"{regime}:")
        for n in sorted({r["n"] for r in rows if r["regime"] == regime}):
            a = by.get((regime, "learned+", n, None))
            resident = by.get((regime, "mehl+", n, "resident"))
            ooc = by.get((regime, "mehl+", n, "out-of-core"))
            if (ooc or {}).get("status") == "ok" and (resident or {}).get("status") == "ok":
                lines.append(
                    f"  N={n}: out-of-core / resident mehl+: peak above start "
                    f"{ooc['soup_peak_mb']:.0f} vs {resident['soup_peak_mb']:.0f} MiB "
                    f"({resident['soup_peak_mb'] / max(1, ooc['soup_peak_mb']):.1f}x less), time "
                    f"per held-out epoch {ooc['s_per_epoch']:.1f} s vs "
                    f"{resident['s_per_epoch']:.1f} s "
                    f"({ooc['s_per_epoch'] / resident['s_per_epoch']:.2f}x)")
            for b in (resident, ooc):
                if b is not None and b.get("status") == "ok":
                    lines.append(_versus_learned(n, a, b))
    return "\n".join(lines)


def _versus_learned(n: int, a: dict | None, b: dict) -> str:
    """learned+ against one mehl+ contender ``b`` at N = ``n``."""
    kept = "(K+1) models" if b["directions"] == "resident" else "4 largest tensors or pieces"
    floor = (f"; mehl+ {b['directions']} peak above start / floor ({kept} + activations = "
             f"{b['floor_mb']:.0f} MiB) = {b['above_floor']:.2f}x")
    if a is None or a.get("status") != "ok":
        why = (a or {}).get("status", "not run")
        return (f"  N={n}: learned+ {why}; mehl+ {b['directions']} peak RSS "
                f"{b['peak_rss_mb']:.0f} MiB" + floor)
    cuda = ""
    if a.get("peak_cuda_mb") and b.get("peak_cuda_mb"):
        cuda = (f", CUDA max allocated {a['peak_cuda_mb']:.0f} vs "
                f"{b['peak_cuda_mb']:.0f} MiB ({a['peak_cuda_mb'] / b['peak_cuda_mb']:.1f}x)")
    return (
        f"  N={n}: learned+ / mehl+ {b['directions']} peak RSS = "
        f"{a['peak_rss_mb'] / b['peak_rss_mb']:.1f}x"
        f" (above start {a['soup_peak_mb'] / max(1, b['soup_peak_mb']):.1f}x, live "
        f"tensors {a['live_mb'] / b['live_mb']:.1f}x), time per held-out epoch "
        f"{a['s_per_epoch']:.1f} s vs {b['s_per_epoch']:.1f} s "
        f"({a['s_per_epoch'] / b['s_per_epoch']:.1f}x)" + cuda + floor)


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="the two smallest N of each regime")
    p.add_argument("--regime", choices=["both", *REGIMES], default="both")
    p.add_argument("--sizes", default=None, help="comma-separated N to run (overrides)")
    p.add_argument("--model-batch", "-K", type=int, default=K,
                   help=f"MEHL's K, ingredients per round (default {K}); its floor is K + 1 models")
    p.add_argument("--directions", choices=list(DIRECTIONS), default="both",
                   help="MEHL+'s directions: resident, out-of-core, or both contenders "
                        "(default)")
    p.add_argument("--no-learned", action="store_true",
                   help="run the MEHL+ contenders only")
    p.add_argument("--memory-budget", type=float, default=12.0, metavar="GIB",
                   help="address-space limit of each contender process, GiB (default 12: the "
                        "machine is shared); a learned+ predicted above it is not started")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N]; on CUDA the figures add torch.cuda.max_memory_allocated "
                        "and 'peak above start' is taken from it (no address-space limit there)")


if __name__ == "__main__":
    main(
        Path(__file__).resolve(), contenders, run_worker,
        columns=[("name", "contender", ""), ("status", "status", ""),
                 ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
                 ("soup_peak_mb", "peak above start (MiB)", ".0f"),
                 ("peak_cuda_mb", "CUDA max allocated (MiB)", ".0f"),
                 ("live_mb", "live tensors (MiB)", ".0f"),
                 ("activations_mb", "activations (MiB)", ".0f"),
                 ("floor_mb", "MEHL floor (MiB)", ".0f"),
                 ("s_per_epoch", "s / held-out epoch", ".1f"),
                 ("held_out_epochs", "held-out epochs", "d"), ("seconds", "total (s)", ".1f")],
        description=__doc__,
        out_json=Path(__file__).resolve().parent / "results" / "soup_memory.json",
        add_arguments=add_arguments,
        summarize=summarize,
    )
    sys.exit(0)
