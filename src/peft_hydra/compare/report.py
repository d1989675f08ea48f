"""results.json and results.md of a comparison: one run's record, writing (statistics, tables, plots), re-rendering
from results.json (``peft-hydra report``) and merging runs of disjoint seeds (``peft-hydra report --merge``)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import numpy as np

from .errors import ConfigError
from .stats import PAIRED_TEST, forgetting_stats, mean, paired_stats, routing_stats, summarize
from .tables import markdown


def run_record(spec, seed, lr, out, ev, eval_examples, budget_entry) -> dict[str, Any]:
    """The record of one (method, seed) run in results.json: its losses and accuracies overall, per source and per
    category, its cost, its training curve and every eval example's loss (the paired statistics need them)."""
    losses, exact = ev["losses"], ev["exact"]
    by_cat, by_src, acc_cat = defaultdict(list), defaultdict(list), defaultdict(list)
    for ex, loss, ok in zip(eval_examples, losses, exact):
        by_cat[ex["category"]].append(loss)
        by_src[ex["source"]].append(loss)
        if ex["short_answer"]:
            acc_cat[ex["category"]].append(float(ok))
    acc_all = [a for v in acc_cat.values() for a in v]
    rec = {
        "method": spec.name,
        "seed": seed,
        "lr": lr,
        "r": budget_entry["r"],
        "factor": budget_entry["factor"] if spec.kind == "lokr" else None,
        "max_rank": budget_entry["max_rank"],
        "trainable_params": out["trainable_params"],
        "eval_loss": mean(losses),
        "eval_loss_by_source": {k: mean(v) for k, v in by_src.items()},
        "eval_loss_by_category": {k: mean(v) for k, v in by_cat.items()},
        "accuracy": mean(acc_all) if acc_all else None,
        "accuracy_by_category": {k: mean(v) for k, v in acc_cat.items()},
        "s_per_step": out["s_per_step"],
        "train_s": out["train_s"],
        "peak_mem_mb": out["peak_mem_mb"],
        "final_train_loss": mean(out["train_loss_curve"][-20:]),
        "train_loss_curve": [round(x, 5) for x in out["train_loss_curve"]],
        "eval_example_losses": [round(x, 6) for x in losses],
    }
    if "generated_correct" in ev:
        gen_cat = defaultdict(list)
        for ex, ok in zip(eval_examples, ev["generated_correct"]):
            if ok is not None:
                gen_cat[ex["category"]].append(float(ok))
        rec["gen_accuracy"] = mean([a for v in gen_cat.values() for a in v]) if gen_cat else None
        rec["gen_accuracy_by_category"] = {k: mean(v) for k, v in gen_cat.items()}
    if "router" in ev:
        rec["router_by_category"] = ev["router"]
    if "routing" in ev:
        rec["routing"] = ev["routing"]
    return rec




def add_statistics(results: dict, eval_examples: list[dict], cfg: dict) -> None:
    """(Re)compute every statistic of ``results`` from its runs (``compare.stats``)."""
    results["summary"] = summarize(results)
    ref = cfg["reference"]
    if any(r["method"] == ref for r in results["runs"]):
        results["paired_vs_reference"] = {"reference": ref, **paired_stats(results, eval_examples, ref, cfg["bootstrap"])}
    results["forgetting_by_method"] = forgetting_stats(results, cfg["bootstrap"])
    results["routing_by_method"] = routing_stats(results)
    results["paired_test"] = PAIRED_TEST


def eval_examples_of(results: dict) -> list[dict]:
    """The eval examples of a results.json as far as the statistics need them (id and source)."""
    return [{"id": i, "source": i.split("/")[0]} for i in results["data"]["eval_ids"]]


def write_results(results: dict, eval_examples: list[dict], output_dir: str, cfg: dict, final: bool = False) -> None:
    """Write results.json and results.md (and, when ``final``, the plots) of a comparison, statistics recomputed."""
    add_statistics(results, eval_examples, cfg)
    results["finished"] = final
    tmp = os.path.join(output_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, os.path.join(output_dir, "results.json"))
    if final:
        from .plots import make_plots

        plots = make_plots(results, output_dir)
    else:
        plots = []
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown(results, plots))


def rewrite(output_dir: str) -> list[str]:
    """Recompute the statistics and rewrite results.md and the plots from an existing results.json."""
    path = os.path.join(output_dir, "results.json")
    with open(path) as f:
        results = json.load(f)
    write_results(results, eval_examples_of(results), output_dir, results["config"], final=bool(results.get("finished")))
    return sorted(p for p in os.listdir(output_dir) if p.endswith((".png", ".md", ".json")))


def merge_runs(dirs: list[str], output_dir: str) -> dict:
    """One comparison from several runs of the same config with disjoint seeds (e.g. seeds run as parallel
    processes: ``--seeds 0`` and ``--seeds 1``): the runs are concatenated and every statistic recomputed. Refused
    unless the configs (seeds aside), the eval examples, the base model's general-text losses and every method's
    learning rate agree. ``wall_s`` is the sum of the runs' wall times; ``merged_from`` lists the runs."""
    parts = []
    for d in dirs:
        with open(os.path.join(d, "results.json")) as f:
            parts.append(json.load(f))
    first = parts[0]
    strip = lambda c: {k: v for k, v in c.items() if k != "seeds"}  # noqa: E731
    seen_seeds: set = set()
    for d, p in zip(dirs, parts):
        if strip(p["config"]) != strip(first["config"]):
            diff = sorted(k for k in set(p["config"]) | set(first["config"])
                          if k != "seeds" and p["config"].get(k) != first["config"].get(k))  # fmt: skip
            raise ConfigError(f"merge: {d} has a different config from {dirs[0]} (fields {diff}).")
        if p["data"]["eval_ids"] != first["data"]["eval_ids"]:
            raise ConfigError(f"merge: {d} was evaluated on other examples than {dirs[0]}.")
        fg, fg0 = p.get("forgetting") or {}, first.get("forgetting") or {}
        if fg.get("before_example_losses") is not None and not np.allclose(
                fg["before_example_losses"], fg0["before_example_losses"], atol=1e-5):  # fmt: skip
            raise ConfigError(f"merge: {d}'s base-model general-text losses differ from {dirs[0]}'s.")
        seeds = {r["seed"] for r in p["runs"]}
        if seeds & seen_seeds:
            raise ConfigError(f"merge: seed(s) {sorted(seeds & seen_seeds)} of {d} are already in an earlier run.")
        seen_seeds |= seeds
        lrs = {r["method"]: r["lr"] for r in p["runs"]}
        lrs0 = {r["method"]: r["lr"] for r in first["runs"]}
        if any(m in lrs0 and lrs0[m] != lr for m, lr in lrs.items()):
            raise ConfigError(f"merge: {d} trained a method at another learning rate than {dirs[0]}.")
    merged = dict(first)
    merged["runs"] = sorted((r for p in parts for r in p["runs"]), key=lambda r: r["seed"])
    merged["config"] = dict(first["config"], seeds=sorted(seen_seeds))
    merged["command"] = " ; ".join(p["command"] for p in parts)
    merged["wall_s"] = sum(p["wall_s"] for p in parts)
    merged["merged_from"] = [{"dir": d, "command": p["command"], "wall_s": p["wall_s"],
                              "seeds": sorted({r["seed"] for r in p["runs"]}), "finished": bool(p.get("finished"))}
                             for d, p in zip(dirs, parts)]  # fmt: skip
    os.makedirs(output_dir, exist_ok=True)
    write_results(merged, eval_examples_of(merged), output_dir, merged["config"], final=all(p.get("finished") for p in parts))
    return merged

