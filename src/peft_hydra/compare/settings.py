"""The comparison config (YAML): defaults, validation with clear errors."""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any

import yaml

from .errors import ConfigError
from .methods import METHODS

REQUIRED = ("model", "data", "methods", "steps")
DEFAULTS: dict[str, Any] = {
    "name": None,
    "dtype": "float32",
    "device": "auto",
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "top_layers": 4,  # adapt the same modules of the top L layers only (null: all layers)
    "cache_lower_layers": True,  # run the frozen lower layers once per example and reuse their output
    "cache_dir": "~/.cache/peft_hydra/compare",  # keep cached hidden states on disk for reruns (null: off)
    "budget": None,  # target trainable parameters (null: every method at rank `r`)
    "budget_tolerance": 0.05,
    "r": 8,
    "alpha_over_r": 2.0,
    "num_experts": 3,  # int or "auto" (peft_hydra.suggest_num_experts on the training texts)
    "num_experts_k_max": 10,
    "method_options": {},
    "reference": "lora",
    "seeds": [0],
    "batch_size": 8,
    "eval_batch_size": 16,
    "lr": 1e-3,  # used when lr_sweep is empty
    "lr_sweep": [],
    "sweep_steps": None,  # default: `steps`
    "lr_extend": 3,  # a chosen rate at an edge of lr_sweep: add up to this many rates on that side (0: never)
    "lr_extend_factor": 3.0,  # each added rate is the edge rate x (or /) this factor
    "num_experts_fallback": 3,  # num_experts: auto without a clear elbow (paper's range 2-4)
    "generate": False,  # also score short-answer sources by greedy generation with a stop rule (full forward, slow)
    "generate_max_new_tokens": 24,
    "warmup": 0.1,
    "schedule": "linear",  # after warmup: linear or cosine decay to 0
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "bootstrap": 2000,
    "router_plot": True,
    "forgetting": 24,  # held-out Wikipedia paragraphs (Dolly contexts) scored before / after training (0: off)
    "analysis": None,  # `peft-hydra analyze` options: {groups, inits, steps, lr, seed} (see compare/analyze.py)
}
DATA_DEFAULTS = {
    "train_per_category": 100, "val_per_category": 10, "eval_per_category": 20, "max_length": 128,
    "max_answer_tokens": 64, "seed": 0,
}  # fmt: skip


def load_config(path: str, overrides: dict | None = None) -> dict[str, Any]:
    """Read, validate and complete a config. Relative data paths (``data.sources[].path``, a local ``dataset``
    folder) are resolved against the folder of the config file, not the working directory."""
    if not os.path.exists(path):
        raise ConfigError(
            f"Config file {path!r} does not exist (resolved: {os.path.abspath(path)}); see configs/smoke.yaml, "
            "default.yaml, full.yaml."
        )
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping.")
    raw.update(overrides or {})
    cfg = normalize(raw)
    cfg["name"] = cfg["name"] or os.path.splitext(os.path.basename(path))[0]
    resolve_paths(cfg, os.path.dirname(os.path.abspath(path)))
    return cfg


def resolve_paths(cfg: dict, base_dir: str) -> None:
    """Make relative ``path`` (and existing local ``dataset`` folders) of data sources absolute against base_dir."""
    for src in cfg["data"]["sources"]:
        if not isinstance(src, dict):
            continue
        if isinstance(src.get("path"), str) and not os.path.isabs(os.path.expanduser(src["path"])):
            src["path"] = os.path.normpath(os.path.join(base_dir, src["path"]))
        ds = src.get("dataset")
        if isinstance(ds, str) and not os.path.isabs(ds) and os.path.isdir(os.path.join(base_dir, ds)):
            src["dataset"] = os.path.normpath(os.path.join(base_dir, ds))


def unknown_keys(given, allowed, what: str) -> None:
    """Raise one error naming every unknown key (with the nearest allowed name when it looks like a typo)."""
    unknown = sorted(set(given) - set(allowed), key=str)
    if not unknown:
        return
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), [str(a) for a in allowed], n=1, cutoff=0.6)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"Unknown {what} {', '.join(parts)}; allowed: {sorted(allowed)}.")


def normalize(raw: dict) -> dict[str, Any]:
    unknown_keys(raw, set(REQUIRED) | set(DEFAULTS), "config field(s)")  # typos first: `stpes` before "missing steps"
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"The config is missing required field(s) {missing} (required: {list(REQUIRED)}).")
    cfg = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(raw)}
    model = cfg["model"]
    cfg["model"] = {"name": model} if isinstance(model, str) else dict(model)
    if "name" not in cfg["model"]:
        raise ConfigError("`model` must be a name (smollm2, tiny-random, a path or Hub id) or a mapping with `name`.")
    data = cfg["data"]
    if not isinstance(data, dict) or not data.get("sources"):
        raise ConfigError("`data` must be a mapping with `sources` (e.g. [bbh27, dolly8, gsm8k] or {path: ...}).")
    unknown_keys(data, set(DATA_DEFAULTS) | {"sources"}, "data field(s)")
    cfg["data"] = {**DATA_DEFAULTS, **data}
    if not isinstance(cfg["methods"], list) or not cfg["methods"]:
        raise ConfigError(f"`methods` must be a non-empty list; known methods: {sorted(METHODS)}.")
    for m in cfg["methods"]:
        base = m if isinstance(m, str) else (m.get("base", m.get("name")) if isinstance(m, dict) else None)
        if base not in METHODS:
            raise ConfigError(f"Unknown method {base!r} in `methods`; known methods: {sorted(METHODS)}.")
    names = [m if isinstance(m, str) else m["name"] for m in cfg["methods"]]
    if cfg["reference"] not in names:
        raise ConfigError(f"`reference: {cfg['reference']}` must be one of the listed methods {names}.")
    for key in ("steps", "batch_size", "eval_batch_size", "r", "bootstrap"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"`{key}` must be an integer >= 1, got {cfg[key]!r}.")
    if cfg["budget"] is not None and (not isinstance(cfg["budget"], int) or cfg["budget"] < 1):
        raise ConfigError(f"`budget` must be null or a positive integer (trainable parameters), got {cfg['budget']!r}.")
    ne = cfg["num_experts"]
    if not (ne == "auto" or (isinstance(ne, int) and ne >= 1)):
        raise ConfigError(f"`num_experts` must be an integer >= 1 or 'auto', got {ne!r}.")
    if not isinstance(cfg["seeds"], list) or not cfg["seeds"] or not all(isinstance(s, int) for s in cfg["seeds"]):
        raise ConfigError(f"`seeds` must be a non-empty list of integers, got {cfg['seeds']!r}.")
    for key in ("lr", "lr_extend_factor"):
        cfg[key] = float(cfg[key])
    cfg["lr_sweep"] = sorted({float(x) for x in (cfg["lr_sweep"] or [])})
    if any(x <= 0 for x in cfg["lr_sweep"]) or cfg["lr"] <= 0:
        raise ConfigError(f"Learning rates must be > 0, got lr={cfg['lr']} and lr_sweep={cfg['lr_sweep']}.")
    if isinstance(cfg["lr_extend"], bool) or not isinstance(cfg["lr_extend"], int) or cfg["lr_extend"] < 0:
        raise ConfigError(f"`lr_extend` must be an integer >= 0 (0: never extend the grid), got {cfg['lr_extend']!r}.")
    if cfg["lr_extend_factor"] <= 1:
        raise ConfigError(f"`lr_extend_factor` must be > 1, got {cfg['lr_extend_factor']}.")
    nf = cfg["num_experts_fallback"]
    if not isinstance(nf, int) or nf < 1:
        raise ConfigError(f"`num_experts_fallback` must be an integer >= 1, got {nf!r}.")
    for key in ("num_experts_k_max", "generate_max_new_tokens"):
        if not isinstance(cfg[key], int) or cfg[key] < (3 if key == "num_experts_k_max" else 1):
            raise ConfigError(f"`{key}` must be an integer >= {3 if key == 'num_experts_k_max' else 1}, got {cfg[key]!r}.")
    if cfg["schedule"] not in ("linear", "cosine"):
        raise ConfigError(f"`schedule` must be linear or cosine, got {cfg['schedule']!r}.")
    if not isinstance(cfg["generate"], bool):
        raise ConfigError(f"`generate` must be true or false, got {cfg['generate']!r}.")
    fg = cfg["forgetting"]
    if isinstance(fg, bool) or not isinstance(fg, int) or fg < 0:
        raise ConfigError(f"`forgetting` must be an integer >= 0 (general-text paragraphs; 0: off), got {fg!r}.")
    tl = cfg["top_layers"]
    if tl is not None and (not isinstance(tl, int) or tl < 1):
        raise ConfigError(f"`top_layers` must be null (all layers) or an integer >= 1, got {tl!r}.")
    if cfg["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"`dtype` must be float32, bfloat16 or float16, got {cfg['dtype']!r}.")
    return cfg
