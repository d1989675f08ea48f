"""results.json, results.md and the plots of a comparison; paired bootstrap statistics against the reference."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict, defaultdict
from typing import Any

import numpy as np


def _mean(xs):
    xs = [x for x in xs if x is not None and x == x]
    return float(sum(xs) / len(xs)) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None and x == x]
    if len(xs) < 2:
        return 0.0 if xs else None
    m = sum(xs) / len(xs)
    return float(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)))


def run_record(spec, seed, lr, out, ev, eval_examples, budget_entry) -> dict[str, Any]:
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
        "eval_loss": _mean(losses),
        "eval_loss_by_source": {k: _mean(v) for k, v in by_src.items()},
        "eval_loss_by_category": {k: _mean(v) for k, v in by_cat.items()},
        "accuracy": _mean(acc_all) if acc_all else None,
        "accuracy_by_category": {k: _mean(v) for k, v in acc_cat.items()},
        "s_per_step": out["s_per_step"],
        "train_s": out["train_s"],
        "peak_mem_mb": out["peak_mem_mb"],
        "final_train_loss": _mean(out["train_loss_curve"][-20:]),
        "train_loss_curve": [round(x, 5) for x in out["train_loss_curve"]],
        "eval_example_losses": [round(x, 6) for x in losses],
    }
    if "generated_correct" in ev:
        gen_cat = defaultdict(list)
        for ex, ok in zip(eval_examples, ev["generated_correct"]):
            if ok is not None:
                gen_cat[ex["category"]].append(float(ok))
        rec["gen_accuracy"] = _mean([a for v in gen_cat.values() for a in v]) if gen_cat else None
        rec["gen_accuracy_by_category"] = {k: _mean(v) for k, v in gen_cat.items()}
    if "router" in ev:
        rec["router_by_category"] = ev["router"]
    if "routing" in ev:
        rec["routing"] = ev["routing"]
    return rec


# ------------------------------------------------------------------------------------------- statistics
def holm(pvals: dict[str, float]) -> dict[str, float]:
    items = sorted(pvals.items(), key=lambda kv: kv[1])
    m, out, running = len(items), {}, 0.0
    for k, (name, p) in enumerate(items):
        running = max(running, min(1.0, (m - k) * p))
        out[name] = running
    return out


def percentile_ci(boots) -> list[float]:
    """The percentile 95% CI of bootstrap replicates (the one CI rule of every report)."""
    return [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def bootstrap_mean(xs, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean of ``xs`` with its percentile bootstrap 95% CI over the values (a single value: a zero-width CI)."""
    a = np.asarray(xs, dtype=np.float64)
    boots = a[np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))].mean(1) if len(a) > 1 else a
    return {"mean": float(a.mean()), "ci95": percentile_ci(boots), "n": int(len(a))}


def paired_stats(results: dict, eval_examples: list[dict], reference: str, n_boot: int, seed: int = 0) -> dict:
    """Per-example paired differences (method - reference, loss per token) averaged over seeds; bootstrap over
    examples: mean, percentile 95% CI, two-sided p of a z-test with the bootstrap standard error; Holm-corrected across methods within each group (all, each source)."""
    runs = results["runs"]
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["method"], r["seed"]): np.array(r["eval_example_losses"]) for r in runs}
    methods = [m for m in OrderedDict.fromkeys(r["method"] for r in runs) if m != reference]
    groups = {"all": np.arange(len(eval_examples))}
    for src in OrderedDict.fromkeys(ex["source"] for ex in eval_examples):
        groups[src] = np.array([i for i, ex in enumerate(eval_examples) if ex["source"] == src])
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for g, idx in groups.items():
        boot_idx = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        rows, pvals = {}, {}
        for m in methods:
            common = [s for s in seeds if (m, s) in by and (reference, s) in by]
            if not common:
                continue
            diffs = np.stack([by[(m, s)][idx] - by[(reference, s)][idx] for s in common])  # (S, n)
            d = diffs.mean(0)
            boots = d[boot_idx].mean(1)
            se = float(boots.std(ddof=1))
            p = float(math.erfc(abs(d.mean()) / se / math.sqrt(2))) if se > 0 else (0.0 if d.mean() != 0 else 1.0)
            per_seed = diffs.mean(1)
            rows[m] = {
                "mean_diff": float(d.mean()),
                "ci95": percentile_ci(boots),
                "p": float(p),
                "per_seed_mean_diff": [float(x) for x in per_seed],
                "seeds": common,
                "n_examples": int(len(idx)),
            }
            pvals[m] = p
        adj = holm(pvals)
        for m, row in rows.items():
            row["p_holm"] = adj[m]
            ci_excl = row["ci95"][0] > 0 or row["ci95"][1] < 0
            agree = all(x < 0 for x in row["per_seed_mean_diff"]) or all(x > 0 for x in row["per_seed_mean_diff"])
            if row["p_holm"] < 0.05 and ci_excl and agree:
                row["verdict"] = "better" if row["mean_diff"] < 0 else "worse"
            else:
                row["verdict"] = "no detectable difference"
        out[g] = rows
    return out


def forgetting_stats(results: dict, n_boot: int, seed: int = 0) -> dict:
    """Per method: the change of the loss on general text (adapter on after training - base model before), per
    paragraph averaged over seeds, mean with its percentile bootstrap 95% CI over paragraphs."""
    fg = results.get("forgetting")
    if not fg:
        return {}
    before = np.asarray(fg["before_example_losses"])
    by: dict[str, list] = OrderedDict()
    for r in results["runs"]:
        if "general_example_losses" in r:
            by.setdefault(r["method"], []).append(np.asarray(r["general_example_losses"]) - before)
    out = OrderedDict()
    for m, diffs in by.items():
        d = np.stack(diffs).mean(0)
        out[m] = {**bootstrap_mean(d, n_boot, seed), "per_seed": [float(x.mean()) for x in diffs]}
    return out


ROUTING_KEYS = ("mi_normalized_median", "mi_normalized_max", "token_entropy_median", "usage_entropy_median",
                "head_abs_cosine_median", "head_subspace_median")  # fmt: skip


def routing_stats(results: dict) -> dict:
    """Per routed method: the routing report's summary figures (``peft_hydra.routing``) as mean and per-seed values,
    dead heads, the normalised MI per layer (mean over seeds) and the health warnings by kind with their seeds."""
    by: dict[str, list] = OrderedDict()
    for r in results["runs"]:
        if r.get("routing"):
            by.setdefault(r["method"], []).append(r)
    out = OrderedDict()
    for m, rs in by.items():
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "num_experts": rs[0]["routing"]["num_experts"]}
        for k in ROUTING_KEYS:
            vals = [r["routing"]["summary"].get(k) for r in rs]
            row[k] = _mean(vals)
            row[k + "_per_seed"] = vals
        row["dead_heads"] = [r["routing"]["summary"]["dead_heads"] for r in rs]
        row["heads"] = rs[0]["routing"]["summary"]["heads"]
        names = list(rs[0]["routing"]["layers"])
        row["mi_by_layer"] = {n: _mean([r["routing"]["layers"].get(n, {}).get("mi_normalized") for r in rs])
                              for n in names}  # fmt: skip
        health: dict[str, list] = {}
        for r in rs:
            for kind in r["routing"].get("health", {}):
                health.setdefault(kind, []).append(r["seed"])
        row["health"] = health
        out[m] = row
    return out


HEALTH_WORDS = {"uniform": "the gates stay uniform (per-token gate entropy >= 0.98 of log N, median over layers)",
                "collapse": "the routing collapses onto one head (largest mean gate >= 0.9, median over layers)"}


def summarize(results: dict) -> dict:
    summ: dict[str, Any] = OrderedDict()
    for r in results["runs"]:
        summ.setdefault(r["method"], []).append(r)
    out = OrderedDict()
    for m, rs in summ.items():
        cats = list(rs[0]["eval_loss_by_category"])
        srcs = list(rs[0]["eval_loss_by_source"])
        out[m] = {
            "seeds": [r["seed"] for r in rs],
            "lr": rs[0]["lr"],
            "trainable_params": rs[0]["trainable_params"],
            "r": rs[0]["r"],
            "factor": rs[0]["factor"],
            "max_rank": rs[0]["max_rank"],
            "eval_loss_mean": _mean([r["eval_loss"] for r in rs]),
            "eval_loss_std": _std([r["eval_loss"] for r in rs]),
            "eval_loss_by_source": {s: [_mean([r["eval_loss_by_source"][s] for r in rs]),
                                        _std([r["eval_loss_by_source"][s] for r in rs])] for s in srcs},
            "eval_loss_by_category": {c: [_mean([r["eval_loss_by_category"][c] for r in rs]),
                                          _std([r["eval_loss_by_category"][c] for r in rs])] for c in cats},
            "accuracy_mean": _mean([r["accuracy"] for r in rs]),
            "accuracy_std": _std([r["accuracy"] for r in rs]),
            "gen_accuracy_mean": _mean([r.get("gen_accuracy") for r in rs]),
            "gen_accuracy_std": _std([r.get("gen_accuracy") for r in rs]),
            "gen_accuracy_by_category": {c: _mean([r.get("gen_accuracy_by_category", {}).get(c) for r in rs])
                                         for c in rs[0].get("gen_accuracy_by_category", {})},
            "forgetting_mean": _mean([r.get("forgetting") for r in rs]),
            "forgetting_std": _std([r.get("forgetting") for r in rs]),
            "general_loss_mean": _mean([r.get("general_loss") for r in rs]),
            "s_per_step_mean": _mean([r["s_per_step"] for r in rs]),
            "peak_mem_mb_mean": _mean([r["peak_mem_mb"] for r in rs]),
        }  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- summary
def _ci(row) -> str:
    return f"{row['mean_diff']:+.4f} [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]"


def sweep_edge(sw: dict):
    """None, "low" or "high": the chosen rate's position at an edge of the rates tried (runs before grid extension
    have no ``at_edge`` field: it is derived from the rates they tried)."""
    if "at_edge" in sw:
        return sw["at_edge"]
    lrs = sorted(float(x) for x in sw["val_loss"])
    if len(lrs) < 2 or float(sw["chosen"]) not in (lrs[0], lrs[-1]):
        return None
    return "low" if float(sw["chosen"]) == lrs[0] else "high"


def caveats(res: dict) -> list[str]:
    """Everything the run itself knows that limits what its numbers say."""
    out = []
    cfg = res["config"]
    if not res.get("finished"):
        out.append("The run did not finish: these are partial results.")
    for m, sw in (res.get("lr_sweep") or {}).items():
        lrs = sorted(float(x) for x in sw["val_loss"])
        grid = ", ".join(f"{x:g}" for x in sw.get("grid", lrs))
        side = sweep_edge(sw)
        if "at_edge" not in sw and side:  # a run before grid extension
            out.append(f"`{m}`: its chosen rate {float(sw['chosen']):g} is at the {side} edge of its grid [{grid}] "
                       "(this run predates grid extension): a better rate may lie beyond.")
        elif sw.get("all_diverged"):
            out.append(f"`{m}`: every learning rate of its grid [{grid}] diverged; its rate is the lowest tried.")
        elif sw.get("at_edge"):
            out.append(f"`{m}`: its chosen rate {sw['chosen']:g} is still at the {sw['at_edge']} edge of its grid "
                       f"[{grid}] (after {len(sw.get('extended', []))} extension(s)): a better rate may lie beyond.")
    if len(cfg.get("lr_sweep") or []) <= 1:
        out.append("No learning-rate sweep: every method used the same fixed rate, which may suit some more than others.")
    for m, b in res["budget"]["methods"].items():
        if b.get("note") and res["budget"].get("target") and not b.get("within_tolerance", True):
            out.append(f"`{m}`: {b['note']} (budget {res['budget']['target']:,}, tolerance {res['budget']['tolerance']:.0%}).")
    pv = res.get("paired_vs_reference") or {}
    for g, rows in pv.items():
        if g == "reference":
            continue
        for m, row in rows.items():
            ps = row["per_seed_mean_diff"]
            ci_excl = row["ci95"][0] > 0 or row["ci95"][1] < 0
            mixed = len(ps) > 1 and not (all(x < 0 for x in ps) or all(x > 0 for x in ps))
            if ci_excl and row["verdict"] == "no detectable difference":
                why = ([f"the Holm-corrected p is {row['p_holm']:.3g}"] if row["p_holm"] >= 0.05 else []) + (
                    [f"the seeds disagree in sign ({', '.join(f'{x:+.4f}' for x in ps)})"] if mixed else [])  # fmt: skip
                out.append(f"`{m}` on {g}: the 95% CI {_ci(row)} excludes 0 but {' and '.join(why)}: not called "
                           "better or worse.")
    for m, row in (res.get("routing_by_method") or {}).items():
        for kind, seeds_ in row.get("health", {}).items():
            out.append(f"`{m}`: {HEALTH_WORDS.get(kind, kind)} in seed(s) {seeds_}: its router does not route "
                       "(see the routing section).")
    seeds = sorted({r["seed"] for r in res["runs"]})
    if len(seeds) == 1:
        out.append("One seed only: seed-to-seed variation is not measured; the CIs cover the eval examples only.")
    ne = res.get("num_experts") or {}
    if ne.get("auto") and ne.get("curve") and ne["curve"].get("fallback_used"):
        out.append(f"`num_experts: auto`: {ne['curve']['reason']}.")
    c = res.get("cache") or {}
    if c.get("reused_from_disk"):
        out.append("The wall time excludes computing the frozen lower layers' hidden states (reused from the disk cache).")
    return out


def summary_lines(res: dict) -> list[str]:
    """Who is better, worse or indistinguishable from the reference (overall and per source), with CIs."""
    pv = res.get("paired_vs_reference")
    L = []
    if not pv:
        L.append("No paired comparison (the reference method has no finished run).")
    else:
        ref = pv["reference"]
        groups = [g for g in pv if g not in ("reference", "all")]
        L.append(f"Against `{ref}` (eval loss per answer token, method - {ref}, negative = better; mean [95% CI]):")
        for m, row in pv.get("all", {}).items():
            extra = [f"{pv[g][m]['verdict']} on {g} {_ci(pv[g][m])}" for g in groups
                     if m in pv[g] and pv[g][m]["verdict"] != "no detectable difference"]  # fmt: skip
            L.append(f"- `{m}`: {row['verdict']} overall {_ci(row)}" + (f"; {'; '.join(extra)}" if extra else ""))
    rt = res.get("routing_by_method") or {}
    if rt:
        L.append("")
        L.append("Routing (mutual information between category and the soft gates / log N, median [max] over the "
                 "adapted layers, mean over seeds; 0 = the routing ignores the category): "
                 + "; ".join(f"`{m}` {_fmt(row['mi_normalized_median'], 3)} [{_fmt(row['mi_normalized_max'], 3)}]"
                             for m, row in rt.items()))  # fmt: skip
    fg = res.get("forgetting_by_method") or {}
    if fg:
        L.append("")
        L.append(f"Forgetting (loss per token on {res['forgetting']['n_texts']} held-out Wikipedia paragraphs, adapter "
                 f"on after training - base model {res['forgetting']['before_loss']:.4f}; mean [95% CI]): "
                 + "; ".join(f"`{m}` {row['mean']:+.4f} [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]"
                             for m, row in fg.items()))  # fmt: skip
    cav = caveats(res)
    if cav:
        L.append("")
        L.append("Caveats:")
        L.extend(f"- {c}" for c in cav)
    return L


# ---------------------------------------------------------------------------------------------- writing
def write_results(results: dict, eval_examples: list[dict], output_dir: str, cfg: dict, final: bool = False) -> None:
    results["summary"] = summarize(results)
    ref = cfg["reference"]
    if any(r["method"] == ref for r in results["runs"]):
        results["paired_vs_reference"] = {"reference": ref, **paired_stats(results, eval_examples, ref, cfg["bootstrap"])}
    results["forgetting_by_method"] = forgetting_stats(results, cfg["bootstrap"])
    results["routing_by_method"] = routing_stats(results)
    results["finished"] = final
    tmp = os.path.join(output_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, os.path.join(output_dir, "results.json"))
    plots = make_plots(results, output_dir) if final else []
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown(results, plots))


def rewrite(output_dir: str) -> list[str]:
    """Recompute the statistics and rewrite results.md and the plots from an existing results.json."""
    path = os.path.join(output_dir, "results.json")
    with open(path) as f:
        results = json.load(f)
    examples = [{"id": i, "source": i.split("/")[0]} for i in results["data"]["eval_ids"]]
    write_results(results, examples, output_dir, results["config"], final=bool(results.get("finished")))
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
            raise ValueError(f"merge: {d} has a different config from {dirs[0]} (fields {diff}).")
        if p["data"]["eval_ids"] != first["data"]["eval_ids"]:
            raise ValueError(f"merge: {d} was evaluated on other examples than {dirs[0]}.")
        fg, fg0 = p.get("forgetting") or {}, first.get("forgetting") or {}
        if fg.get("before_example_losses") is not None and not np.allclose(
                fg["before_example_losses"], fg0["before_example_losses"], atol=1e-5):  # fmt: skip
            raise ValueError(f"merge: {d}'s base-model general-text losses differ from {dirs[0]}'s.")
        seeds = {r["seed"] for r in p["runs"]}
        if seeds & seen_seeds:
            raise ValueError(f"merge: seed(s) {sorted(seeds & seen_seeds)} of {d} are already in an earlier run.")
        seen_seeds |= seeds
        lrs = {r["method"]: r["lr"] for r in p["runs"]}
        lrs0 = {r["method"]: r["lr"] for r in first["runs"]}
        if any(m in lrs0 and lrs0[m] != lr for m, lr in lrs.items()):
            raise ValueError(f"merge: {d} trained a method at another learning rate than {dirs[0]}.")
    merged = dict(first)
    merged["runs"] = sorted((r for p in parts for r in p["runs"]), key=lambda r: r["seed"])
    merged["config"] = dict(first["config"], seeds=sorted(seen_seeds))
    merged["command"] = " ; ".join(p["command"] for p in parts)
    merged["wall_s"] = sum(p["wall_s"] for p in parts)
    merged["merged_from"] = [{"dir": d, "command": p["command"], "wall_s": p["wall_s"],
                              "seeds": sorted({r["seed"] for r in p["runs"]}), "finished": bool(p.get("finished"))}
                             for d, p in zip(dirs, parts)]  # fmt: skip
    os.makedirs(output_dir, exist_ok=True)
    examples = [{"id": i, "source": i.split("/")[0]} for i in merged["data"]["eval_ids"]]
    write_results(merged, examples, output_dir, merged["config"], final=all(p.get("finished") for p in parts))
    return merged


def _fmt(x, nd=4):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(res: dict, plots: list[str]) -> str:
    cfg, summ = res["config"], res["summary"]
    L = []
    L.append(f"# Comparison `{cfg['name']}`" + ("" if res.get("finished") else " (IN PROGRESS: partial results)"))
    L.append("")
    L.append("## Summary")
    L.extend(summary_lines(res))
    L.append("")
    L.append("## Set-up")
    L.append(f"- Model: {res['model']}")
    m = res["machine"]
    L.append(f"- Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} CPUs, torch threads "
             f"{m['torch_threads']}, device {m['device']}, torch {m['torch']}, Python {m['python']}")  # fmt: skip
    L.append(f"- Command: `{res['command']}`")
    L.append(f"- Wall time of the whole run: {res['wall_s']:.0f} s ({res['wall_s'] / 60:.1f} min)")
    for part in res.get("merged_from") or []:
        L.append(f"  - merged (`peft-hydra report --merge`) from `{part['dir']}`: seeds {part['seeds']}, "
                 f"{part['wall_s']:.0f} s, `{part['command']}`" + ("" if part["finished"] else " (UNFINISHED)"))
    d = res["data"]
    L.append(f"- Data: sources {d['sources']}; {d['n']['train']} train / {d['n']['val']} validation (carved from "
             f"train, used only for the lr sweep) / {d['n']['eval']} eval examples over {len(d['categories'])} "
             f"categories; max length {d['max_length']} tokens, answers cut at {d['max_answer_tokens']} tokens.")  # fmt: skip
    c = res["cache"]
    tl = cfg["top_layers"]
    L.append(f"- Adapted: modules {cfg['target_modules']} of the top {tl or 'all'} layers (identical for every method)."
             + (f" Frozen layers below {c['first_top_layer']} were run once per example and cached "
                f"({c['seconds']:.0f} s, {c['size_mb']:.0f} MB"
                + (f"; {c['reused_from_disk']} of {d['n']['train'] + d['n']['val'] + d['n']['eval']} examples' hidden "
                   "states reused from the disk cache of an earlier run, so the wall time above excludes computing "
                   "them" if c.get("reused_from_disk") else "")
                + "; cached vs full forward loss max |diff| "
                f"{c['max_abs_loss_diff_vs_full_forward']:.1e}); the LM head runs on answer tokens only."
                if c["enabled"] else " Plain full forward (no caching)."))  # fmt: skip
    L.append(f"- Training: {cfg['steps']} steps, batch {cfg['batch_size']}, AdamW (weight decay "
             f"{cfg.get('weight_decay', 0.0):g}), linear warmup {cfg['warmup']:.0%} then {cfg.get('schedule', 'linear')} decay, grad-norm clip {cfg['max_grad_norm']}, seeds {cfg['seeds']} "
             f"(a seed fixes the adapter init and the data order, the same for every method), "
             f"alpha = {cfg['alpha_over_r']} x r.")  # fmt: skip
    ne = res["num_experts"]
    L.append(f"- HydraLoRA heads N = {ne['value']}" + (" (chosen by `num_experts: auto`, "
             "`peft_hydra.suggest_num_experts`: TF-IDF + k-means elbow on the training texts"
             + (f": {ne['curve']['reason']}" if ne.get("curve", {}).get("reason") else "") + ")" if ne["auto"] else ""))
    L.append("- Loss: causal-LM loss per answer token (prompt masked); an example's loss is its mean over its answer "
             "tokens; eval loss = mean over examples. Accuracy (short-answer sources only): greedy decoding would "
             "emit exactly the answer tokens and then EOS (computed exactly from the teacher-forced argmax).")
    L.append("- s/step: training wall time / steps (evaluation excluded). Peak memory: increase of the process RSS "
             "over the run's start, sampled every 20 ms (includes the model copy for the run); on CUDA "
             "`torch.cuda.max_memory_allocated`.")
    L.append("")
    L.append("## Methods")
    for name, desc in res["methods"].items():
        L.append(f"- `{name}`: {desc}")
    L.append("")
    if res["lr_sweep"]:
        L.append("## Learning-rate sweep (validation split carved from train, seed "
                 f"{cfg['seeds'][0]}, {next(iter(res['lr_sweep'].values()))['steps']} steps)")
        L.append(f"Initial grid {[float(x) for x in cfg['lr_sweep']]}; when a method's best rate is at an edge of its "
                 f"grid, the next rate on that side (x or / {cfg.get('lr_extend_factor', 3.0):g}) is tried, at most "
                 f"{cfg.get('lr_extend', 0)} per side. `-`: not tried for that method.")  # fmt: skip
        L.append("")
        lrs = sorted({float(x) for sw in res["lr_sweep"].values() for x in sw["val_loss"]})
        L.append("| method | " + " | ".join(f"lr {x:g}" for x in lrs) + " | chosen | final grid |")
        L.append("|---" * (len(lrs) + 3) + "|")
        for mth, sw in res["lr_sweep"].items():
            vals = {float(k): v for k, v in sw["val_loss"].items()}
            cells = [("**" + _fmt(vals[x]) + "**") if x == float(sw["chosen"]) else _fmt(vals.get(x)) for x in lrs]
            flag = f" (at {sweep_edge(sw)} edge)" if sweep_edge(sw) else ""
            grid = sw.get("grid") or sorted(vals)
            L.append(f"| {mth} | " + " | ".join(cells) + f" | {float(sw['chosen']):g}{flag} | "
                     f"{', '.join(f'{x:g}' for x in grid)}" + (f" (extended by {', '.join(f'{x:g}' for x in sw['extended'])})"
                                                             if sw.get("extended") else "") + " |")  # fmt: skip
        L.append("")
    L.append("## Results (mean +- std over seeds)")
    tgt = res["budget"]["target"]
    L.append(f"Budget: {tgt:,} trainable parameters, tolerance {res['budget']['tolerance']:.0%}." if tgt else
             "No budget: every method at the configured rank.")  # fmt: skip
    L.append("")
    srcs = list(next(iter(summ.values()))["eval_loss_by_source"]) if summ else []
    L.append("| method | trainable params (vs budget) | r | max rank of update | lr | s/step | peak mem MB | eval loss "
             "| " + " | ".join(f"{s} loss" for s in srcs) + " | accuracy |")  # fmt: skip
    L.append("|---" * (9 + len(srcs)) + "|")
    for mth, s in summ.items():
        b = res["budget"]["methods"][mth]
        dev = f" ({100 * (s['trainable_params'] - tgt) / tgt:+.1f}%)" if tgt else ""
        note = " *" if b["note"] else ""
        rk = f"{s['r']}" + (f", factor {s['factor']}" if s["factor"] is not None else "")
        mr = b["max_rank"]
        mr_s = (f"{mr['value']} ({mr['formula']})" if mr["value"] is not None else mr["formula"])
        acc = "-" if s["accuracy_mean"] is None else f"{100 * s['accuracy_mean']:.1f} +- {100 * s['accuracy_std']:.1f}%"
        L.append(
            f"| {mth} | {s['trainable_params']:,}{dev}{note} | {rk} | {mr_s} | {s['lr']:g} | {_fmt(s['s_per_step_mean'], 2)} "
            f"| {_fmt(s['peak_mem_mb_mean'], 0)} | {_fmt(s['eval_loss_mean'])} +- {_fmt(s['eval_loss_std'])} | "
            + " | ".join(f"{_fmt(v[0])} +- {_fmt(v[1])}" for v in s["eval_loss_by_source"].values())
            + f" | {acc} |"
        )  # fmt: skip
    notes = [f"{m_}: {b['note']}" for m_, b in res["budget"]["methods"].items() if b["note"]]
    if notes:
        L.append("")
        L.append("\\* " + "; ".join(notes))
    L.append("")
    pv = res.get("paired_vs_reference")
    if pv:
        ref = pv["reference"]
        L.append(f"## Paired differences against `{ref}` (eval loss per token, method - {ref}; negative = better)")
        L.append("Per-example differences averaged over seeds; bootstrap over examples "
                 f"({cfg['bootstrap']} resamples): percentile 95% CI, and the two-sided p of a z-test with the bootstrap standard error, Holm-corrected across methods within each "
                 "group. A method is called better/worse only when the Holm-corrected p < 0.05, the 95% CI excludes 0 "
                 "and every seed's mean difference has the same sign.")  # fmt: skip
        L.append("")
        L.append("| group | method | mean diff | 95% CI | p (Holm) | per-seed mean diffs | verdict |")
        L.append("|---|---|---|---|---|---|---|")
        for g, rows in pv.items():
            if g == "reference":
                continue
            for mth, row in rows.items():
                L.append(f"| {g} | {mth} | {row['mean_diff']:+.4f} | [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}] "
                         f"| {row['p_holm']:.3g} | " + ", ".join(f"{x:+.4f}" for x in row["per_seed_mean_diff"])
                         + f" | {row['verdict']} |")  # fmt: skip
        L.append("")
    rt = res.get("routing_by_method") or {}
    if rt:
        L.append("## Routing: does the router specialise?")
        L.append("`peft_hydra.routing` on the eval set after training, per adapted layer, from the soft gates: the "
                 "mutual information between category and head, I(C; H) with p(h | c) the category's mean gate, "
                 "divided by log N (0: the routing carries no information about the category; 1: one head per "
                 "category; its ceiling is log min(C, N) / log N); the per-token gate entropy and the entropy of the "
                 "mean gate, both / log N (1 = uniform; usage entropy 0 = one head takes everything); dead heads "
                 "(mean gate < 0.1 / N); how alike the B heads are (mean pairwise |cosine| and subspace similarity). "
                 "Median over the layers, mean over seeds (per-seed values in results.json).")  # fmt: skip
        L.append("")
        L.append("| method | N | MI / log N median | MI / log N max | token entropy | usage entropy | dead heads "
                 "(per seed) | B heads abs. cos | B heads subspace | warnings |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for mth, row in rt.items():
            warn = "; ".join(f"{k} (seeds {v})" for k, v in row["health"].items()) or "-"
            L.append(f"| {mth} | {row['num_experts']} | {_fmt(row['mi_normalized_median'], 3)} | "
                     f"{_fmt(row['mi_normalized_max'], 3)} | {_fmt(row['token_entropy_median'], 3)} | "
                     f"{_fmt(row['usage_entropy_median'], 3)} | {', '.join(str(x) for x in row['dead_heads'])} of "
                     f"{row['heads']} | {_fmt(row['head_abs_cosine_median'], 3)} | "
                     f"{_fmt(row['head_subspace_median'], 3)} | {warn} |")  # fmt: skip
        L.append("")
    fg = res.get("forgetting_by_method") or {}
    if fg:
        f0 = res["forgetting"]
        L.append("## Forgetting: loss on general text that no method trains on")
        L.append(f"{f0['n_texts']} Wikipedia paragraphs from the `context` fields of the shipped Dolly file that no "
                 f"train, validation or eval prompt of this run contains, cut to {f0['max_length']} tokens, every "
                 "token after the first scored (causal-LM loss per token, mean over paragraphs). Before: the base "
                 f"model (adapter off, before training): {f0['before_loss']:.4f}. After: the trained adapter on. "
                 "Change = after - before, per paragraph averaged over seeds; 95% bootstrap CI over paragraphs. "
                 "Positive = the method forgot (general text got harder), as PEFT's method comparison reports it.")
        L.append("")
        L.append("| method | loss after (mean over seeds) | change (after - before) | 95% CI | per-seed changes |")
        L.append("|---|---|---|---|---|")
        for mth, row in fg.items():
            L.append(f"| {mth} | {_fmt(summ.get(mth, {}).get('general_loss_mean'))} | {row['mean']:+.4f} | "
                     f"[{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}] | "
                     + ", ".join(f"{x:+.4f}" for x in row["per_seed"]) + " |")  # fmt: skip
        L.append("")
    if summ:
        L.append("## Eval loss per category (mean over seeds)")
        mths = list(summ)
        L.append("| category | source | " + " | ".join(mths) + " |")
        L.append("|---" * (len(mths) + 2) + "|")
        for cat, info in res["data"]["categories"].items():
            vals = [summ[m_]["eval_loss_by_category"].get(cat, [None])[0] for m_ in mths]
            if all(v is None for v in vals):
                continue
            best = min(v for v in vals if v is not None)
            L.append(f"| {cat} | {info['source']} | " + " | ".join(
                ("**" + _fmt(v) + "**") if v == best else _fmt(v) for v in vals) + " |")  # fmt: skip
        L.append("")
    if summ and any(v.get("gen_accuracy_mean") is not None for v in summ.values()):
        mths = list(summ)
        L.append("## Accuracy by greedy generation (mean over seeds)")
        L.append("Greedy decoding from the prompt with the full model (KV cache), stopped at EOS or by the source's "
                 "rule: short answers (BBH) stop at the first line break and must equal the answer exactly (stripped); "
                 "GSM8K stops once `#### <number>` ends a line and scores the final number (after `####`, else the "
                 f"last number). At most {cfg.get('generate_max_new_tokens', 24)} new tokens (GSM8K: 8x).")  # fmt: skip
        L.append("")
        L.append("| category | " + " | ".join(mths) + " |")
        L.append("|---" * (len(mths) + 1) + "|")
        L.append("| **all scored** | " + " | ".join(
            "-" if summ[m_]["gen_accuracy_mean"] is None else
            f"{100 * summ[m_]['gen_accuracy_mean']:.1f} +- {100 * summ[m_]['gen_accuracy_std']:.1f}%" for m_ in mths) + " |")  # fmt: skip
        for cat in summ[mths[0]].get("gen_accuracy_by_category", {}):
            L.append(f"| {cat} | " + " | ".join(_fmt(None if summ[m_]["gen_accuracy_by_category"].get(cat) is None
                     else 100 * summ[m_]["gen_accuracy_by_category"][cat], 1) for m_ in mths) + " |")  # fmt: skip
        L.append("")
    if plots:
        L.append("## Plots")
        for p in plots:
            L.append(f"![{p}]({p})")
        L.append("")
    return "\n".join(L) + "\n"


VERDICT_COLORS = {"better": "tab:blue", "worse": "tab:red", "no detectable difference": "0.45"}


def _short(label: str, n: int = 40) -> str:
    return label if len(label) <= n else label[: n - 1] + "~"


def make_plots(res: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    summ = res["summary"]
    if not summ:
        return files
    mths = list(summ)
    ref = res["config"]["reference"]
    pv = res.get("paired_vs_reference") or {}
    # 1. eval loss per method (axis from 0) and the paired differences against the reference with 95% CIs
    groups = [g for g in pv if g != "reference"]
    others = [m for m in mths if m != ref and m in pv.get("all", {})]
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(12 if others else 6, 0.45 * len(mths) + 2.2),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 1.6]} if others else None)  # fmt: skip
    ax = axes[0][0]
    y = np.arange(len(mths))
    ax.barh(y, [summ[m]["eval_loss_mean"] for m in mths], xerr=[summ[m]["eval_loss_std"] for m in mths],
            color=["tab:green" if m == ref else "tab:gray" for m in mths], capsize=3)  # fmt: skip
    ax.set_yticks(y, mths)
    ax.invert_yaxis()
    ax.set_xlim(0, None)
    ax.set_xlabel("eval loss / answer token (mean +- std over seeds)")
    ax.set_title("Eval loss (axis from 0)", fontsize=10)
    if others:
        ax = axes[0][1]
        ax.axvline(0, color="k", lw=0.8)
        offs = np.linspace(-0.3, 0.3, len(groups)) if len(groups) > 1 else [0.0]
        markers = ["o", "s", "^", "D", "v", "P"]
        for gi, g in enumerate(groups):
            for j, m in enumerate(others):
                row = pv[g].get(m)
                if row is None:
                    continue
                lo, hi = row["ci95"]
                col = VERDICT_COLORS[row["verdict"]]
                ax.errorbar(row["mean_diff"], j + offs[gi], xerr=[[row["mean_diff"] - lo], [hi - row["mean_diff"]]],
                            fmt=markers[gi % len(markers)], color=col, ms=5 if g == "all" else 4, capsize=2,
                            lw=2 if g == "all" else 1)  # fmt: skip
        ax.set_yticks(range(len(others)), others)
        ax.invert_yaxis()
        ax.set_xlabel(f"eval loss - {ref} (per token; < 0 = better than {ref})")
        handles = [plt.Line2D([], [], ls="", marker=markers[i % len(markers)], color="k", label=g)
                   for i, g in enumerate(groups)]  # fmt: skip
        handles += [plt.Line2D([], [], ls="-", color=c, label=v) for v, c in VERDICT_COLORS.items()]
        ax.legend(handles=handles, fontsize=7, loc="best")
        ax.set_title(f"Paired difference vs {ref}, 95% bootstrap CI (colour = verdict)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "eval_loss.png"), dpi=110)
    plt.close(fig)
    files.append("eval_loss.png")
    # 2. per-category difference vs reference: categories as rows, grouped by source
    if ref in summ and len(mths) > 1:
        src_of = {c: info["source"] for c, info in res["data"]["categories"].items()}
        cats = sorted(summ[ref]["eval_loss_by_category"], key=lambda c: (list(dict.fromkeys(src_of.values())).index(
            src_of.get(c, "")) if c in src_of else 99, c))  # fmt: skip
        others2 = [m for m in mths if m != ref]
        M = np.array([[summ[m]["eval_loss_by_category"][c][0] - summ[ref]["eval_loss_by_category"][c][0]
                       for m in others2] for c in cats])  # fmt: skip
        v = float(np.nanpercentile(np.abs(M), 98)) or 1e-3  # a few outliers do not wash out the rest
        fig, ax = plt.subplots(figsize=(1.0 * len(others2) + 4.5, 0.24 * len(cats) + 1.8))
        im = ax.imshow(M, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
        ax.set_yticks(range(len(cats)), [_short(c) for c in cats], fontsize=7)
        ax.set_xticks(range(len(others2)), others2, rotation=35, ha="right", fontsize=8)
        ax.xaxis.tick_top()
        plt.setp(ax.get_xticklabels(), rotation=35, ha="left")
        prev = None
        for i, c in enumerate(cats):
            if src_of.get(c) != prev:
                if i:
                    ax.axhline(i - 0.5, color="k", lw=1.2)
                n_in = sum(1 for c2 in cats if src_of.get(c2) == src_of.get(c))
                ax.text(len(others2) - 0.4, i - 0.5 + n_in / 2, src_of.get(c, "?"), rotation=-90, va="center",
                        ha="left", fontsize=8, fontweight="bold")  # fmt: skip
                prev = src_of.get(c)
        fig.colorbar(im, ax=ax, label=f"eval loss - {ref} (blue = better; clipped at the 98th percentile)", pad=0.08,
                     extend="both")  # fmt: skip
        ax.set_title(f"Per-category eval loss difference vs {ref} (mean over seeds)", fontsize=9, pad=40)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "category_delta.png"), dpi=110)
        plt.close(fig)
        files.append("category_delta.png")
    # 3. training curves (first seed)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    seen = set()
    for r in res["runs"]:
        if r["method"] in seen:
            continue
        seen.add(r["method"])
        c = np.array(r["train_loss_curve"])
        k = max(1, len(c) // 30)
        sm = np.convolve(c, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(sm)) + k - 1, sm, label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (moving mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "train_curves.png"), dpi=110)
    plt.close(fig)
    files.append("train_curves.png")
    # 4. lr sweep: log x; the y-axis shows the range that decides the choice, diverged points are drawn at the top
    if res["lr_sweep"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        allv = [v for sw in res["lr_sweep"].values() for v in sw["val_loss"].values() if v == v and np.isfinite(v)]
        lo = min(allv) if allv else 0.0
        keep = [v for v in allv if v <= 1.5 * lo] or [lo + 1]
        top = max(keep) + 0.08 * (max(keep) - lo + 1e-3)
        for i, (mth, sw) in enumerate(res["lr_sweep"].items()):
            xs = sorted(float(x) for x in sw["val_loss"])
            ys = [{float(k): v for k, v in sw["val_loss"].items()}[x] for x in xs]
            yc = [min(v, top) if (v == v and np.isfinite(v)) else top for v in ys]
            edge = f" (at {sweep_edge(sw)} edge!)" if sweep_edge(sw) else ""
            (line,) = ax.plot(xs, yc, marker="o", ms=4, label=f"{mth}: {float(sw['chosen']):g}{edge}")
            for x, v, c in zip(xs, ys, yc):
                if c >= top:
                    ax.plot([x], [top], marker="^", color=line.get_color(), ms=8)
                    ax.annotate(f"{v:.1f}" if v == v and np.isfinite(v) else "nan", (x, top), fontsize=6,
                                xytext=(2, -9), textcoords="offset points", color=line.get_color())  # fmt: skip
            ch = float(sw["chosen"])
            ax.plot([ch], [min(dict(zip(xs, ys))[ch], top)], marker="*", ms=14, color=line.get_color(), mec="k")
        ax.set_xscale("log")
        ax.set_ylim(lo - 0.08 * (top - lo), top + 0.02 * (top - lo))
        ax.set_xlabel("learning rate (log)")
        ax.set_ylabel("validation loss")
        ax.set_title("lr sweep (star = chosen; ^ = above the axis, value written)", fontsize=9)
        ax.legend(fontsize=7, title="method: chosen lr", title_fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "lr_sweep.png"), dpi=110)
        plt.close(fig)
        files.append("lr_sweep.png")
    # 5. elbow curve, with its chord and the verdict
    ne = res["num_experts"]
    if ne.get("curve"):
        cv = ne["curve"]
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot(cv["k"], cv["sse"], marker="o", label="SSE (whole corpus)")
        ax.plot([cv["k"][0], cv["k"][-1]], [cv["sse"][0], cv["sse"][-1]], "k:", lw=1, label="chord (no elbow)")
        elbow = cv.get("elbow", cv["num_experts"])
        ax.axvline(elbow, color="r", ls="--", label=f"elbow k={elbow}" + ("" if cv.get("clear", True) else " (not clear)"))
        ax.set_xlabel("k (clusters)")
        ax.set_ylabel("k-means SSE (TF-IDF)")
        if "clear" in cv:
            verdict = ("clear elbow" if cv["clear"] else "no clear elbow") + f": gap {cv['gap']:.3f} (margin " \
                f"{cv['margin']}), folds {cv['fold_elbows']}"
        else:
            verdict = ""
        ax.set_title(f"num_experts: auto -> N = {ne['value']}\n{verdict}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "num_experts_elbow.png"), dpi=110)
        plt.close(fig)
        files.append("num_experts_elbow.png")
    # 6. routing: normalised mutual information between category and gates per adapted layer, one line per method
    rt = res.get("routing_by_method") or {}
    if rt:
        names = list(dict.fromkeys(n for row in rt.values() for n in row["mi_by_layer"]))
        short = [".".join(p for p in n.split(".") if p.isdigit() or p.endswith("proj"))[-14:] for n in names]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 3.8))
        for mth, row in rt.items():
            ys = [row["mi_by_layer"].get(n) for n in names]
            ax.plot(range(len(names)), [np.nan if y is None else y for y in ys], marker="o", ms=3,
                    label=f"{mth} (median {_fmt(row['mi_normalized_median'], 3)})")  # fmt: skip
        ax.set_xticks(range(len(names)), short, rotation=90, fontsize=6)
        ax.set_ylim(0, None)
        ax.set_ylabel("I(category; head) / log N")
        ax.set_title("Routing specialisation per adapted layer (mean over seeds; 0 = ignores the category)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "routing_mi.png"), dpi=110)
        plt.close(fig)
        files.append("routing_mi.png")
    # 7. routing heatmaps: mean gate per head for each category, one panel per decoder layer
    for r in res["runs"]:
        rb = r.get("router_by_category")
        if not rb:
            continue
        fname = f"routing_{r['method']}.png"
        if fname in files:
            continue
        cats = list(rb)
        layer_of = lambda name: int(name.split("layers.")[1].split(".")[0]) if "layers." in name else -1  # noqa: E731
        layers = sorted({layer_of(n) for n in rb[cats[0]]})
        fig, axes = plt.subplots(1, len(layers), figsize=(2.2 * len(layers) + 1.5, 0.22 * len(cats) + 1.8),
                                 squeeze=False, sharey=True)  # fmt: skip
        mats = {layer: np.array([np.mean([g for n, g in rb[c].items() if layer_of(n) == layer], axis=0) for c in cats])
                for layer in layers}  # fmt: skip
        n_heads = next(iter(mats.values())).shape[1]
        if n_heads < 2 or all(float(np.abs(M - 1.0 / n_heads).max()) < 1e-6 for M in mats.values()):
            plt.close(fig)  # fixed gates (uniform or N = 1): nothing routed, nothing to show
            continue
        dev = max(1e-3, max(float(np.abs(M - 1.0 / n_heads).max()) for M in mats.values()))
        for ax, layer in zip(axes[0], layers):
            M = mats[layer]
            im = ax.imshow(M, aspect="auto", cmap="RdBu_r", vmin=1.0 / n_heads - dev, vmax=1.0 / n_heads + dev)
            ax.set_title(f"layer {layer}", fontsize=8)
            ax.set_xticks(range(M.shape[1]), [f"h{i}" for i in range(M.shape[1])], fontsize=7)
        axes[0][0].set_yticks(range(len(cats)), cats, fontsize=6)
        fig.colorbar(im, ax=axes[0].tolist(), label=f"mean gate (white = uniform 1/{n_heads})")
        fig.suptitle(f"{r['method']} (seed {r['seed']}): mean gate per head per category", fontsize=9)
        fig.savefig(os.path.join(out, fname), dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(fname)
    return files


def runs_table(dirs: list[str]) -> str:
    """One markdown table of several comparison folders: protocol, scale, lr grid (extensions, edges), verdicts vs
    the reference with 95% CIs, wall time (``peft-hydra report --table results/*``)."""
    rows = []
    for d in dirs:
        with open(os.path.join(d, "results.json")) as f:
            r = json.load(f)
        c, pv = r["config"], r.get("paired_vs_reference") or {}
        g0 = sorted(float(x) for x in c["lr_sweep"])
        tried = {float(x) for sw in r["lr_sweep"].values() for x in sw["val_loss"]}
        ext = sorted(tried - set(g0))
        edge = [m for m, sw in r["lr_sweep"].items() if sweep_edge(sw)]
        lr = (", ".join(f"{x:g}" for x in g0) or f"fixed {c['lr']:g}") + (
            f" (added: {', '.join(f'{x:g}' for x in ext)})" if ext else "") + (
            f"; still at an edge: {', '.join(edge)}" if edge else "")  # fmt: skip
        verdicts = []
        for m, row in pv.get("all", {}).items():
            extra = [f"{g}: {pv[g][m]['verdict']} {_ci(pv[g][m])}" for g in pv if g not in ("reference", "all")
                     and m in pv[g] and pv[g][m]["verdict"] != "no detectable difference"]  # fmt: skip
            v = "n.d." if row["verdict"] == "no detectable difference" else row["verdict"]
            verdicts.append(f"`{m}` {v} {_ci(row)}" + (f" ({'; '.join(extra)})" if extra else ""))
        n = r["data"]["n"]
        prot = (f"{r['model'].split(' (')[0]}, top {c['top_layers'] or 'all'} layers, {len(c['target_modules'])} "
                f"modules, alpha {c['alpha_over_r']:g} r, {c['steps']} steps x {c['batch_size']}, seeds "
                f"{len(c['seeds'])}, N={r['num_experts']['value']}")  # fmt: skip
        wall = f"{r['wall_s']:.0f} s" + ("" if r.get("finished") else " (UNFINISHED)")
        rows.append(f"| `{d.rstrip('/')}` | {prot} | {n['train']} / {n['eval']} | {lr} | {'<br>'.join(verdicts)} | "
                    f"{wall} |")  # fmt: skip
    ref = "the reference"
    head = ("| run | protocol | train / eval examples | lr grid | vs " + ref + ": eval loss per token, mean [95% CI] "
            "(n.d. = no detectable difference) | wall |\n|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows) + "\n"
