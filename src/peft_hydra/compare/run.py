"""Orchestration of a comparison: data, model, cache, budgets, N, learning-rate sweep, runs, report."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Any, Optional

import torch

from . import data as D
from .methods import build_peft_config, check_budgets, max_rank, method_specs, oracle_head_map, solve_budget
from .errors import ConfigError
from .train import compute_cache, decoder_parts, load_model, num_layers, token_losses, train_run


def machine_info(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cached_hidden_states(model, examples, first_top, cfg, model_desc, device):
    """Hidden states entering layer ``first_top``; with ``cache_dir`` they are also kept on disk, per example (keyed
    by model, layer and token ids), so that a rerun or another config on the same model reuses them."""
    import hashlib

    cache_dir = cfg.get("cache_dir")
    if not cache_dir:
        return compute_cache(model, examples, first_top, int(cfg["eval_batch_size"]), device), 0
    key = hashlib.sha1(json.dumps([model_desc, cfg["model"], cfg["dtype"], first_top], sort_keys=True,
                                  default=str).encode()).hexdigest()[:16]  # fmt: skip
    path = os.path.join(os.path.expanduser(cache_dir), f"hidden_{key}.pt")
    store = torch.load(path, map_location="cpu") if os.path.exists(path) else {}
    ids = [hashlib.sha1(json.dumps(ex["input_ids"]).encode()).hexdigest() for ex in examples]
    missing = [i for i, h in enumerate(ids) if h not in store]
    if missing:
        sub = [dict(examples[i]) for i in missing]
        for h, hs in zip([ids[i] for i in missing], compute_cache(model, sub, first_top, int(cfg["eval_batch_size"]), device)):
            store[h] = hs.cpu()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(store, path + ".tmp")
        os.replace(path + ".tmp", path)
    return [store[h].to(device) for h in ids], len(examples) - len(missing)


def verify_cache(model, examples, cache, first_top: int, device, tol: float = 1e-4) -> float:
    """Check on a few examples that the cached path's loss equals the plain full forward's; return the max diff."""
    batch = examples[: min(4, len(examples))]
    with torch.no_grad():
        full, _, _ = token_losses(model, batch, cache, None, device)
        cached, _, _ = token_losses(model, batch, cache, first_top, device)
    diff = float((full - cached).abs().max())
    if not diff <= tol * max(1.0, float(full.abs().max())):
        raise ConfigError(
            f"The cached lower-layer path does not reproduce the full forward (max |diff| = {diff:.2e}): this model's "
            "decoder is not Llama-like enough for `cache_lower_layers: true`; set it to false."
        )
    return diff


def _nice(x: float) -> float:
    return float(f"{x:.3g}")


def sweep_learning_rate(score, grid, factor: float = 3.0, max_extend: int = 3, log=None) -> dict[str, Any]:
    """Score every rate of ``grid`` (``score(lr)`` -> validation loss, lower is better; NaN/inf = diverged). While the
    best rate is the lowest or highest rate tried, add the next rate on that side (edge / factor or edge x factor),
    at most ``max_extend`` per side. Returns ``{"val_loss": {lr: loss}, "chosen", "grid" (final, sorted),
    "initial_grid", "extended" (added rates, in order), "at_edge" (None, "low" or "high": still at an edge)}``."""
    res = {float(lr): float(score(float(lr))) for lr in grid}

    def best():
        finite = {k: v for k, v in res.items() if math.isfinite(v)}
        return min(finite, key=finite.get) if finite else min(res)  # all diverged: the lowest rate, flagged below

    added, n_low, n_high = [], 0, 0
    while len(res) > 1:
        b, lrs = best(), sorted(res)
        if b == lrs[-1] and n_high < max_extend:
            new, n_high = _nice(lrs[-1] * factor), n_high + 1
        elif b == lrs[0] and n_low < max_extend:
            new, n_low = _nice(lrs[0] / factor), n_low + 1
        else:
            break
        res[new] = float(score(new))
        added.append(new)
        if log:
            log(f"  lr {b:g} was at the edge of the grid: tried {new:g} -> {res[new]:.4f}")
    b, lrs = best(), sorted(res)
    edge = None
    if len(lrs) > 1 and b == lrs[0]:
        edge = "low"
    elif len(lrs) > 1 and b == lrs[-1]:
        edge = "high"
    return {"val_loss": {f"{k:g}": res[k] for k in lrs}, "chosen": b, "grid": lrs,
            "initial_grid": sorted(float(x) for x in grid), "extended": added, "at_edge": edge,
            "all_diverged": not any(math.isfinite(v) for v in res.values())}  # fmt: skip


def prepare(cfg: dict, log=print) -> dict[str, Any]:
    """Load the model and data, tokenise, and cache the frozen lower layers: what every run of a config shares."""
    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, model_desc = load_model(cfg["model"], cfg["dtype"])
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    dcfg = cfg["data"]
    splits = D.build_splits(dcfg, seed=int(dcfg["seed"]))
    if cfg.get("generate") and not any(D.generation_rule(ex) for ex in splits["eval"]):
        raise ConfigError(
            "`generate: true` but no eval example can be scored by generation (only gsm8k and sources with "
            "`short_answer: true` have a stop rule): set `short_answer: true` on a source or `generate: false`."
        )
    tokd = {s: D.tokenize(exs, tok, int(dcfg["max_length"]), int(dcfg["max_answer_tokens"])) for s, exs in splits.items()}
    if cfg["forgetting"]:
        used = [ex["prompt"] for exs in splits.values() for ex in exs]
        tokd["general"] = D.tokenize_general(D.general_texts(int(cfg["forgetting"]), used), tok, int(dcfg["max_length"]))
    all_ex = tokd["train"] + tokd["val"] + tokd["eval"] + tokd.get("general", [])
    for i, ex in enumerate(all_ex):
        ex["_i"] = i
    log(f"data: {len(tokd['train'])} train, {len(tokd['val'])} val, {len(tokd['eval'])} eval examples, "
        f"{len({e['category'] for s in ('train', 'val', 'eval') for e in tokd[s]})} categories"
        + (f", {len(tokd['general'])} general-text paragraphs (forgetting)" if tokd.get("general") else ""))  # fmt: skip

    L = num_layers(model)
    top = cfg["top_layers"] or L
    if top > L:
        raise ConfigError(f"`top_layers: {top}` exceeds the model's {L} layers.")
    first_top = L - top
    common = {
        "target_modules": list(cfg["target_modules"]),
        "layers_to_transform": list(range(first_top, L)),
        "alpha_over_r": cfg["alpha_over_r"],
    }
    cache, cache_info = None, {"enabled": False}
    first_top_arg: Optional[int] = None
    if cfg["cache_lower_layers"]:
        decoder_parts(model)
        t = time.time()
        cache, n_reused = cached_hidden_states(model, all_ex, first_top, cfg, model_desc, device)
        diff = verify_cache(model, tokd["eval"], cache, first_top, device)
        first_top_arg = first_top
        mb = sum(h.numel() * h.element_size() for h in cache) / 2**20
        cache_info = {"enabled": True, "first_top_layer": first_top, "seconds": time.time() - t, "size_mb": mb,
                      "reused_from_disk": n_reused, "max_abs_loss_diff_vs_full_forward": diff}  # fmt: skip
        log(f"cached layers 0..{first_top - 1} for {len(all_ex)} examples ({n_reused} from disk) in {cache_info['seconds']:.1f}s "
            f"({mb:.0f} MB); cached vs full forward loss max |diff| = {diff:.2e}")  # fmt: skip
    forgetting = None
    if tokd.get("general"):  # the base model (no adapter) on the general text: the "before" of every method
        with torch.no_grad():
            before = [float(token_losses(model, [ex], cache, first_top_arg, device)[0].mean()) for ex in tokd["general"]]
        forgetting = {"n_texts": len(before), "source": "dolly8 contexts (Wikipedia paragraphs) unused by the run",
                      "max_length": int(dcfg["max_length"]), "before_example_losses": [round(x, 6) for x in before],
                      "before_loss": sum(before) / len(before)}  # fmt: skip
        log(f"forgetting: {len(before)} general-text paragraphs, base model loss {forgetting['before_loss']:.4f}")
    return {"device": device, "model": model, "tok": tok, "model_desc": model_desc, "splits": splits, "tokd": tokd,
            "common": common, "cache": cache, "cache_info": cache_info, "first_top_arg": first_top_arg,
            "forgetting": forgetting}  # fmt: skip


def run_comparison(cfg: dict, output_dir: str, command: str, log=print) -> dict[str, Any]:
    from . import report
    from .tables import summary_lines

    t_start = time.time()
    os.makedirs(output_dir, exist_ok=True)
    P = prepare(cfg, log)
    device, model, tok, model_desc, splits, tokd = (P[k] for k in ("device", "model", "tok", "model_desc", "splits", "tokd"))
    common, cache, cache_info, first_top_arg = P["common"], P["cache"], P["cache_info"], P["first_top_arg"]
    dcfg = cfg["data"]

    # number of heads
    ne_info: dict[str, Any] = {"auto": cfg["num_experts"] == "auto"}
    if cfg["num_experts"] == "auto":
        import peft_hydra

        n, curve = peft_hydra.suggest_num_experts(D.training_texts(tokd["train"]), k_max=int(cfg["num_experts_k_max"]),
                                                  fallback=int(cfg["num_experts_fallback"]), return_curve=True)  # fmt: skip
        n = max(2, n)
        ne_info.update(value=n, curve=curve, clear=curve["clear"], note=curve["reason"])
        log(f"num_experts: auto -> N = {n} ({curve['reason']})")
    else:
        ne_info["value"] = int(cfg["num_experts"])
    common["num_experts"] = ne_info["value"]

    # budgets
    specs = method_specs(cfg["methods"], cfg["method_options"] or {})
    with torch.device("meta"):
        meta = type(model)(model.config)
    budget = {"target": cfg["budget"], "tolerance": cfg["budget_tolerance"], "methods": {}}
    solved = {}
    for spec in specs:
        s = solve_budget(meta, spec, cfg["budget"], common, cfg["budget_tolerance"], default_r=cfg["r"])
        solved[spec.name] = s
        mr = max_rank(spec, s.r, s.factor, common, ne_info["value"])
        budget["methods"][spec.name] = {"r": s.r, "factor": s.factor, "params": s.params,
                                        "within_tolerance": s.within_tolerance, "note": s.note, "max_rank": mr}
        log(f"budget {spec.name}: r={s.r}" + (f" factor={s.factor}" if spec.kind == "lokr" else "")
            + f" -> {s.params:,} trainable params {s.note}")  # fmt: skip
    del meta
    check_budgets(cfg["budget"], solved, specs, cfg["budget_tolerance"])

    # oracle routing: the category -> head map of every oracle method (per its N)
    oracle_maps = {}
    for spec in specs:
        if spec.oracle:
            oracle_maps[spec.name] = oracle_head_map(tokd["train"], int(spec.options.get("num_experts", ne_info["value"])))
            log(f"oracle {spec.name}: {oracle_maps[spec.name]['rule']}; category -> head "
                + ", ".join(f"{c}: {h}" for c, h in oracle_maps[spec.name]["heads"].items()))  # fmt: skip

    results: dict[str, Any] = {
        "model": model_desc,
        "data": {"sources": dcfg["sources"], **D.describe(splits), "max_length": dcfg["max_length"],
                 "max_answer_tokens": dcfg["max_answer_tokens"], "eval_ids": [e["id"] for e in tokd["eval"]]},
        "command": command,
        "machine": machine_info(device),
        "config": cfg,
        "cache": cache_info,
        "num_experts": ne_info,
        "budget": budget,
        "methods": {s.name: s.description for s in specs},
        "oracle": oracle_maps,
        "lr_sweep": {},
        "forgetting": P["forgetting"],
        "runs": [],
        "wall_s": None,
    }  # fmt: skip

    def write(final=False):
        results["wall_s"] = time.time() - t_start
        report.write_results(results, tokd["eval"], output_dir, cfg, final=final)

    run_cfg = {"device": device, "batch_size": cfg["batch_size"], "eval_batch_size": cfg["eval_batch_size"],
               "warmup": cfg["warmup"], "max_grad_norm": cfg["max_grad_norm"], "weight_decay": cfg["weight_decay"], "schedule": cfg["schedule"],
               "generate": cfg["generate"], "generate_max_new_tokens": cfg["generate_max_new_tokens"], "tokenizer": tok}  # fmt: skip

    def one(spec, seed, lr, steps, eval_sets, router):
        s = solved[spec.name]
        pc = build_peft_config(spec, s.r, s.factor, common, total_steps=steps)
        rc = dict(run_cfg, steps=steps)
        return train_run(model, spec, pc, common, tokd["train"], eval_sets, cache, first_top_arg, rc, seed, lr,
                         desc=f"{spec.name} seed={seed} lr={lr:g}", router_by_category=router,
                         oracle=oracle_maps.get(spec.name))  # fmt: skip

    # learning-rate sweep on the validation split (carved from train), one seed
    chosen = {}
    sweep_steps = int(cfg["sweep_steps"] or cfg["steps"])
    if len(cfg["lr_sweep"]) > 1:
        if not tokd["val"]:
            raise ConfigError("`lr_sweep` needs validation examples: set `data.val_per_category` >= 1.")
        for spec in specs:

            def score(lr, spec=spec):
                out = one(spec, cfg["seeds"][0], lr, sweep_steps, {"val": tokd["val"]}, False)
                vl = out["evals"]["val"]["losses"]
                v = sum(vl) / len(vl)
                log(f"sweep {spec.name} lr={lr:g}: val loss {v:.4f} ({out['s_per_step']:.2f} s/step)")
                return v

            sw = sweep_learning_rate(score, cfg["lr_sweep"], cfg["lr_extend_factor"], cfg["lr_extend"], log=log)
            chosen[spec.name] = sw["chosen"]
            results["lr_sweep"][spec.name] = {**sw, "steps": sweep_steps}
            if sw["at_edge"]:
                log(f"WARNING: {spec.name}'s best rate {sw['chosen']:g} is still at the {sw['at_edge']} edge of its "
                    f"grid {[f'{x:g}' for x in sw['grid']]} (lr_extend: {cfg['lr_extend']})")  # fmt: skip
    else:
        lr0 = cfg["lr_sweep"][0] if cfg["lr_sweep"] else cfg["lr"]
        chosen = {spec.name: lr0 for spec in specs}

    for seed in cfg["seeds"]:
        for spec in specs:
            lr = chosen[spec.name]
            sets = {"eval": tokd["eval"], **({"general": tokd["general"]} if tokd.get("general") else {})}
            out = one(spec, seed, lr, int(cfg["steps"]), sets, cfg["router_plot"])
            evals = out.pop("evals")
            ev = evals["eval"]
            rec = report.run_record(spec, seed, lr, out, ev, tokd["eval"], budget["methods"][spec.name])
            if "general" in evals:
                rec["general_example_losses"] = [round(x, 6) for x in evals["general"]["losses"]]
                rec["general_loss"] = sum(evals["general"]["losses"]) / len(evals["general"]["losses"])
                rec["forgetting"] = rec["general_loss"] - results["forgetting"]["before_loss"]
            results["runs"].append(rec)
            log(f"run {spec.name} seed={seed} lr={lr:g}: eval loss {rec['eval_loss']:.4f}, "
                f"{rec['s_per_step']:.2f} s/step, {rec['trainable_params']:,} params"
                + (f", routing MI/log N median {rec['routing']['summary']['mi_normalized_median']:.3f}"
                   if rec.get("routing") else ""))  # fmt: skip
            for kind, message in (rec.get("routing") or {}).get("health", {}).items():
                log(f"WARNING: {spec.name} seed={seed}: {message}")
            write()
    write(final=True)
    log("")
    log("\n".join(summary_lines(results)))
    log(f"wrote {output_dir}/results.md, results.json and plots (wall {results['wall_s']:.0f}s)")
    return results
