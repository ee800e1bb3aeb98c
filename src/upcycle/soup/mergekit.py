"""mergekit interop: read a mergekit YAML as ``upcycle soup`` settings, and write one that
reproduces a soup that is a per-tensor linear combination of its ingredients.

Reading (``upcycle soup --config mergekit.yml``): mergekit 0.1.5's schema (``merge_method``,
``base_model``, ``models: [{model, parameters: {weight, density}}]``, global ``parameters``,
``dtype``/``out_dtype``, ``tokenizer_source: base``) for the methods upcycle has (linear,
task_arithmetic, ties, dare_linear, dare_ties, slerp, model_stock), translated into the
command's flags with mergekit's defaults (e.g. ``ties`` normalizes, ``dare_*`` rescale to
the L1 norm). What upcycle cannot do as written (``slices``, per-tensor ``filter``s or
gradients, another tokenizer, an unknown method or parameter) is one error naming the key.
A model ``path+adapter`` is mergekit's LoRA syntax: the adapter becomes an ingredient on the
base ``path``.

Writing (:func:`mergekit_yaml`): the soup's coefficients C (rows: the ingredients, or the
base then the ingredients; columns: blocks) as a ``linear`` merge with ``normalize: false``;
with more than one block, every model's ``weight`` is a list of ``{filter: tensor, value}``
conditions, longest tensor name first (mergekit takes the first filter that is a substring of
the tensor's name, so no shorter name can capture a longer one), then the fallback for the
tensors outside the blocks (the buffers, averaged). Task arithmetic is written as mergekit's
``task_arithmetic``. :func:`yaml_weight` evaluates a weight setting as mergekit does.
LoRA ingredients are written as ``base+adapter``; mergekit merges each with peft first, which
needs ``--lora-merge-cache DIR`` (the header's command says so). peft 0.21's merge of a LoRA on
a tied embedding trained with ``ensure_weight_tying=True`` adds it twice (once per tied name),
so mergekit's tied tensor then differs from the soup's (which is the adapter's trained model):
the header names such adapters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UpcycleError
from ..io.model_files import tied_groups_of_folder
from .common import SoupResult

METHODS = {"linear": "linear", "task_arithmetic": "task-arithmetic", "ties": "ties",
           "dare_linear": "dare-linear", "dare_ties": "dare-ties", "slerp": "slerp",
           "model_stock": "model-stock"}
"""mergekit's merge_method -> upcycle's --method."""

_PARAMETERS = {  # method -> global parameters it takes (upcycle flag name)
    "linear": {"weight", "normalize"},
    "task_arithmetic": {"weight", "lambda", "normalize", "int8_mask"},
    "ties": {"weight", "density", "lambda", "normalize", "int8_mask"},
    "dare_linear": {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"},
    "dare_ties": {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"},
    "slerp": {"t"},
    "model_stock": set(),
}
_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False,
              "dare_ties": False}
"""mergekit's default ``normalize`` of each method (its registry)."""
_NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock"}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "tokenizer_source"}
_REFUSED = {"slices": "per-layer slices", "modules": "per-module merges",
            "tokenizer": "a tokenizer merge", "chat_template": "a chat template"}
WRITTEN_METHODS = ("uniform", "linear", "greedy", "learned", "learned+", "mehl", "mehl+",
                   "task-arithmetic")
"""The soups written with a ``mergekit_config.yml`` beside them."""
FITTED_LINEAR = ("learned", "learned+", "mehl", "mehl+")
"""Those whose coefficients apply to the model's parameters only (buffers: the mean)."""


def is_mergekit_config(raw) -> bool:
    """A parsed YAML is a mergekit config (it has ``merge_method``)."""
    return isinstance(raw, dict) and "merge_method" in raw


def _scalar(where: str, value, kind=float):
    if isinstance(value, (list, dict)):
        raise UpcycleError(f"{where}: upcycle takes one value here (no per-tensor filter or "
                           f"gradient list), got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise UpcycleError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpcycleError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _model_path(where: str, spec, folder: Path) -> tuple[str, str | None]:
    """(model path, LoRA adapter path or None) of a mergekit model reference, relative paths
    taken from the YAML's folder when they exist there."""
    if isinstance(spec, dict):
        raise UpcycleError(f"{where}: expected a local path (``path`` or ``path+adapter``), "
                           f"got a mapping")
    text = str(spec)
    parts = text.split("+", 1) if "+" in text and not Path(text).exists() else [text, None]

    def local(p: str) -> str:
        near = folder / p
        return str(near) if not Path(p).is_absolute() and near.exists() else p

    return local(parts[0]), None if parts[1] is None else local(parts[1])


def read_mergekit(raw: dict, path: str | Path) -> dict:
    """A mergekit config (parsed YAML) as ``upcycle soup`` flags (long names, dashes): the
    ingredients, ``method``, ``base``, ``weights``, ``normalize``, ``lambda``, ``density``,
    ``t``, ``rescale``, ``dtype``. Raises :class:`UpcycleError` naming the key at fault."""
    where = f"--config {path}"
    folder = Path(path).parent
    for key in raw:
        if key in _REFUSED:
            raise UpcycleError(f"{where}: {key!r} ({_REFUSED[key]}) is not supported by "
                               f"upcycle; merge whole models with 'models:'")
        if key not in _TOP_KEYS:
            raise UpcycleError(f"{where}: unsupported mergekit key {key!r} (upcycle reads "
                               f"{', '.join(sorted(_TOP_KEYS))})")
    method = raw["merge_method"]
    if method not in METHODS:
        raise UpcycleError(f"{where}: merge_method {method!r} is not supported by upcycle "
                           f"(it reads {', '.join(METHODS)})")
    source = raw.get("tokenizer_source")
    if source not in (None, "base"):
        raise UpcycleError(f"{where}: tokenizer_source {source!r} is not supported (upcycle "
                           f"keeps the ingredients' tokenizer; leave it out, or 'base')")
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise UpcycleError(f"{where}: 'models' must be a non-empty list of {{model: PATH}}")
    allowed = _PARAMETERS[method]
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise UpcycleError(f"{where}: 'parameters' must be a mapping")
    for key in params:
        if key not in allowed:
            raise UpcycleError(f"{where}: parameters.{key} is not a parameter upcycle's "
                               f"{METHODS[method]} takes (it takes "
                               f"{', '.join(sorted(allowed)) or 'none'})")
    base = base_lora = None
    if raw.get("base_model") is not None:
        base, base_lora = _model_path(f"{where}: base_model", raw["base_model"], folder)
        if base_lora is not None:
            raise UpcycleError(f"{where}: base_model {raw['base_model']!r}: a LoRA base is not "
                               f"supported (give the base model itself)")
    if method in _NEEDS_BASE and base is None:
        raise UpcycleError(f"{where}: merge_method {method!r} needs 'base_model'")
    ingredients, weights, densities = [], [], []
    default_weight = _scalar(f"{where}: parameters.weight", params.get("weight", 1.0))
    for i, entry in enumerate(models):
        at = f"{where}: models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise UpcycleError(f"{at}: expected {{model: PATH, parameters: {{...}}}}")
        for key in entry:
            if key not in ("model", "parameters"):
                raise UpcycleError(f"{at}: unsupported key {key!r}")
        model, lora = _model_path(f"{at}.model", entry["model"], folder)
        own = entry.get("parameters") or {}
        for key in own:
            if key not in allowed or key not in ("weight", "density"):
                raise UpcycleError(f"{at}.parameters.{key} is not a per-model parameter upcycle "
                                   f"takes for {method} (per model: weight"
                                   f"{', density' if 'density' in allowed else ''})")
        if lora is not None:
            if base is not None and Path(model).resolve() != Path(base).resolve():
                raise UpcycleError(f"{at}.model: a LoRA on {model}, but base_model is {base}: "
                                   f"upcycle merges adapters of one base")
            base = model
            model = lora
        elif base is not None and method != "linear" and Path(model).resolve() == Path(
                base).resolve():
            if method == "slerp":
                ingredients.insert(0, model)  # t = 0 is the base
                weights.insert(0, None)
            continue  # mergekit takes no task vector of the base itself
        ingredients.append(model)
        weights.append(_scalar(f"{at}.parameters.weight", own.get("weight", default_weight)))
        if "density" in allowed:
            densities.append(_scalar(f"{at}.parameters.density",
                                     own.get("density", params.get("density", 1.0))))
    flags: dict = {"ingredients": ingredients, "method": METHODS[method]}
    if method == "slerp":
        if len(ingredients) != 2 or Path(ingredients[0]).resolve() != Path(base).resolve():
            raise UpcycleError(f"{where}: slerp needs base_model and one other model in "
                               f"'models' (t = 0: the base, t = 1: the other)")
        flags["t"] = _scalar(f"{where}: parameters.t", params.get("t", 0.5))
    elif method == "model_stock":
        flags["base"] = base
    else:
        flags["weights"] = weights
        flags["normalize"] = _scalar(f"{where}: parameters.normalize",
                                     params.get("normalize", _NORMALIZE[method]), bool)
        if method != "linear":
            flags["base"] = base
            flags["lambda"] = _scalar(f"{where}: parameters.lambda", params.get("lambda", 1.0))
        if densities:
            if len(set(densities)) > 1:
                raise UpcycleError(f"{where}: models[].parameters.density differs between "
                                   f"models ({', '.join(map(str, densities))}); upcycle takes "
                                   f"one density for all")
            flags["density"] = densities[0]
        if method.startswith("dare"):
            flags["rescale"] = "l1" if _scalar(f"{where}: parameters.rescale",
                                               params.get("rescale", True), bool) else "none"
    if base is not None and "base" not in flags:
        flags["base"] = base  # LoRA adapters' base
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        flags["dtype"] = str(dtype)
    return flags


# -- writing ------------------------------------------------------------------------------------

def _number(x: float) -> float:
    """A float that YAML writes and reads back exactly (repr round-trips)."""
    return float(x)


def _model_ref(source) -> str:
    """How mergekit names a model: its path, a LoRA adapter as ``base+adapter``."""
    base = getattr(source, "base", None)
    return f"{base.path}+{source.path}" if base is not None else str(source.path)


def _twice_merged(source) -> list[str]:
    """The tied name a LoRA adapter trained with ``ensure_weight_tying`` has a LoRA on (empty:
    none): peft's ``merge_and_unload`` (which mergekit runs) adds that LoRA once per tied name."""
    config = getattr(source, "config", None)
    base = getattr(source, "base", None)
    if not isinstance(config, dict) or not config.get("ensure_weight_tying") or base is None \
            or base.hf_dir is None:
        return []
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex matched against the whole module name
        match = lambda module: re.fullmatch(targets, module) is not None  # noqa: E731
    else:
        match = lambda module: any(module == t or module.endswith("." + t)  # noqa: E731
                                   for t in targets)
    names = [n for g in tied_groups_of_folder(base.hf_dir) for n in g]
    return [n for n in names if match(n.removesuffix(".weight"))][:1]


def _header(method: str, ingredients: Sequence) -> str:
    """The YAML's comment: how to run it, and where mergekit would not reproduce the soup."""
    adapters = [ing for ing in ingredients if getattr(ing, "base", None) is not None]
    lines = [f"# mergekit config reproducing this {method} soup (written by upcycle):",
             "#   mergekit-yaml mergekit_config.yml OUT" +
             (" --lora-merge-cache DIR   (mergekit merges each base+adapter with peft first)"
              if adapters else "")]
    for ing in adapters:
        for name in _twice_merged(ing):
            lines.append(f"# note: {ing.path} has a LoRA on the tied {name!r} trained with "
                         f"ensure_weight_tying; peft's merge_and_unload (run by mergekit) adds "
                         f"it once per tied name, so mergekit's {name!r} differs from this "
                         f"soup's (the adapter's trained model)")
    return "\n".join(lines) + "\n"


def block_of_tensors(result: SoupResult, parameters=None) -> dict[str, int | None]:
    """Each tensor of the soup -> the column of C that made it (None: outside the blocks, the
    plain average). A tied alias takes its parameter's column. ``parameters``: the names C
    applies to (a fitted soup averages the other floating tensors, its buffers); None: all."""
    blocks = result.blocks or ["<model>"]
    if blocks == ["<model>"]:
        return {name: 0 if parameters is None or name in parameters else None
                for name in result.state}
    index = {b: j for j, b in enumerate(blocks)}
    owner = {id(result.state[b]): j for b, j in index.items() if b in result.state}
    return {name: index.get(name, owner.get(id(t))) for name, t in result.state.items()}


def mergekit_yaml(result: SoupResult, ingredients: Sequence, *, base=None,
                  dtype: torch.dtype | None = None, parameters=None) -> str | None:
    """mergekit's YAML for ``result`` (None when the soup is no per-tensor linear combination
    mergekit can write: other methods, no coefficients). ``parameters``: see
    :func:`block_of_tensors` (the model's parameter names, for the fitted soups)."""
    import yaml  # pyyaml, a dependency of the CLI's --config (deferred like there)

    if result.method not in WRITTEN_METHODS or result.coefficients is None:
        return None
    c = result.coefficients.to(torch.float64)
    base_path = None if base is None else str(base.path)
    refs = [_model_ref(ing) for ing in ingredients]
    floating = [t.dtype for t in result.state.values() if t.is_floating_point()]
    out_dtype = str(dtype or (floating[0] if floating else torch.float32)).removeprefix("torch.")
    config: dict = {}
    if result.method == "task-arithmetic":
        info = result.info
        config = {"merge_method": "task_arithmetic", "base_model": base_path,
                  "models": [{"model": r, "parameters": {"weight": _number(w)}}
                             for r, w in zip(refs, info["weights"])],
                  "parameters": {"lambda": _number(info["lambda"]),
                                 "normalize": bool(info["normalize"])}}
    else:
        if c.shape[0] != len(refs):
            return None
        of = block_of_tensors(result, parameters)
        models = []
        for i, ref in enumerate(refs):
            if all(j == 0 for j in of.values()):
                weight: object = _number(c[i, 0])
            else:
                names = sorted((n for n, j in of.items() if j is not None),
                               key=lambda n: (-len(n), n))
                weight = [{"filter": n, "value": _number(c[i, of[n]])} for n in names]
                weight.append({"value": _number(1.0 / len(refs))})  # buffers: the mean
            models.append({"model": ref, "parameters": {"weight": weight}})
        config = {"merge_method": "linear", "models": models,
                  "parameters": {"normalize": False}}
    config["dtype"] = out_dtype
    return _header(result.method, ingredients) + yaml.safe_dump(config, sort_keys=False,
                                                                width=100)


def mergekit_files(result: SoupResult, ingredients: Sequence, *, base=None,
                   dtype: torch.dtype | None = None, model=None) -> dict[str, str]:
    """``{"mergekit_config.yml": ...}`` for a soup :func:`mergekit_yaml` can write (empty
    otherwise); ``model``: the model a fitted soup was fitted on (its parameter names)."""
    parameters = None
    if result.method in FITTED_LINEAR and model is not None:  # their buffers: the mean
        parameters = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    text = mergekit_yaml(result, ingredients, base=base, dtype=dtype, parameters=parameters)
    return {} if text is None else {"mergekit_config.yml": text}


def yaml_weight(setting, tensor: str) -> float | None:
    """A mergekit parameter setting evaluated for one tensor name as mergekit's
    ``evaluate_setting`` does for t = 0: a number as is, a list of ``{filter, value}`` the
    first whose filter is absent, ``*`` or a substring of ``tensor``."""
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, list):
        if all(isinstance(e, (int, float)) for e in setting):
            return float(setting[0])
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor:
                return yaml_weight(cond["value"], tensor)
        return None
    raise UpcycleError(f"unexpected mergekit setting {setting!r}")
