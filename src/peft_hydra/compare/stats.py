"""The statistics of a comparison, recomputed from its runs whenever results.json is written.

Paired differences against the reference: per eval example, method loss - reference loss, averaged over the seeds
both ran. Over the examples of a group (all, or one data source): the mean difference with its percentile bootstrap
95% CI (``scipy.stats.bootstrap``), and the two-sided p-value of a paired sign-flip permutation test of the mean
difference (``scipy.stats.permutation_test``, ``permutation_type="samples"`` on the differences: under the null
hypothesis each example's difference is as likely to have either sign; :data:`PERMUTATIONS` random sign flips, exact
when all 2^n fit). The p-values are Holm-corrected across the methods of a group. A method is called better or worse only when the corrected p < 0.05, the CI excludes 0 and every
seed's mean difference has the same sign.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from scipy import stats

#: how results.md names the paired test (the report states it next to the p-values)
PAIRED_TEST = "paired sign-flip permutation test of the mean difference"
#: random sign flips of the paired test: its smallest two-sided p is 2 / (PERMUTATIONS + 1), so that even 20 methods
#: can be called after Holm's correction (the bootstrap count of a config does not limit it)
PERMUTATIONS = 9999
VERDICT_ALPHA = 0.05


def _values(xs) -> list[float]:
    return [x for x in xs if x is not None and x == x]


def mean(xs):
    """Mean of the values that are not None / NaN (None when there are none)."""
    v = _values(xs)
    return float(np.mean(v)) if v else None


def std(xs):
    """Sample standard deviation (ddof 1) of the values that are not None / NaN; 0 for one value, None for none."""
    v = _values(xs)
    return float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else None)


def holm(pvals: dict[str, float]) -> dict[str, float]:
    """Holm's step-down correction of a family of p-values (controls the family-wise error rate)."""
    items = sorted(pvals.items(), key=lambda kv: kv[1])
    m, out, running = len(items), {}, 0.0
    for k, (name, p) in enumerate(items):
        running = max(running, min(1.0, (m - k) * p))
        out[name] = running
    return out


def bootstrap_ci(samples: np.ndarray, n_resamples: int, rng) -> np.ndarray:
    """Percentile bootstrap 95% CI of the mean along the last axis, ``(..., 2)``: every row is resampled with the same
    indices. A single value has a zero-width CI."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[-1] < 2:
        return np.stack([samples.mean(-1), samples.mean(-1)], -1)
    ci = stats.bootstrap((samples,), np.mean, axis=-1, n_resamples=n_resamples, method="percentile", rng=rng,
                         vectorized=True).confidence_interval  # fmt: skip
    return np.stack([np.asarray(ci.low), np.asarray(ci.high)], -1)


def paired_pvalue(diffs: np.ndarray, rng, n_resamples: int = PERMUTATIONS) -> np.ndarray:
    """Two-sided p of the paired sign-flip permutation test of mean(diffs) = 0 along the last axis (exact when
    2^n <= n_resamples; 1 for fewer than two differences)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.shape[-1] < 2:
        return np.ones(diffs.shape[:-1])
    res = stats.permutation_test((diffs,), np.mean, permutation_type="samples", n_resamples=n_resamples,
                                 vectorized=True, axis=-1, rng=rng, batch=1000)  # fmt: skip
    return np.asarray(res.pvalue)


def bootstrap_mean(xs, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean of ``xs`` with its percentile bootstrap 95% CI over the values."""
    a = np.asarray(xs, dtype=np.float64)
    lo, hi = bootstrap_ci(a, n_boot, np.random.default_rng(seed))
    return {"mean": float(a.mean()), "ci95": [float(lo), float(hi)], "n": int(len(a))}


def paired_stats(results: dict, eval_examples: list[dict], reference: str, n_boot: int, seed: int = 0) -> dict:
    """Per group (all, each source) and method: the paired differences against ``reference`` (module docstring)."""
    runs = results["runs"]
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["method"], r["seed"]): np.array(r["eval_example_losses"]) for r in runs}
    methods = [m for m in OrderedDict.fromkeys(r["method"] for r in runs) if m != reference]
    groups = {"all": np.arange(len(eval_examples))}
    for src in OrderedDict.fromkeys(ex["source"] for ex in eval_examples):
        groups[src] = np.array([i for i, ex in enumerate(eval_examples) if ex["source"] == src])
    boot_rng, perm_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    out: dict[str, Any] = {}
    for g, idx in groups.items():
        diffs = {}  # method -> (seeds, examples)
        for m in methods:
            common = [s for s in seeds if (m, s) in by and (reference, s) in by]
            if common:
                diffs[m] = (common, np.stack([by[(m, s)][idx] - by[(reference, s)][idx] for s in common]))
        if not diffs:
            continue
        d = np.stack([x.mean(0) for _, x in diffs.values()])  # (methods, examples): averaged over seeds
        cis, ps = bootstrap_ci(d, n_boot, boot_rng), paired_pvalue(d, perm_rng)
        rows = {}
        for k, (m, (common, x)) in enumerate(diffs.items()):
            rows[m] = {"mean_diff": float(d[k].mean()), "ci95": [float(v) for v in cis[k]], "p": float(ps[k]),
                       "per_seed_mean_diff": [float(v) for v in x.mean(1)], "seeds": common,
                       "n_examples": int(len(idx))}  # fmt: skip
        adj = holm({m: row["p"] for m, row in rows.items()})
        for m, row in rows.items():
            row["p_holm"] = adj[m]
            ci_excl = row["ci95"][0] > 0 or row["ci95"][1] < 0
            agree = all(x < 0 for x in row["per_seed_mean_diff"]) or all(x > 0 for x in row["per_seed_mean_diff"])
            if row["p_holm"] < VERDICT_ALPHA and ci_excl and agree:
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
                "head_abs_cosine_median", "head_subspace_median",
                *(f"{v}_mi{s}_median" for v in ("token", "target", "position")
                  for s in ("", "_shuffled", "_excess", "_given_category_excess")))  # fmt: skip


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
            row[k] = mean(vals)
            row[k + "_per_seed"] = vals
        row["dead_heads"] = [r["routing"]["summary"]["dead_heads"] for r in rs]
        row["heads"] = rs[0]["routing"]["summary"]["heads"]
        names = list(rs[0]["routing"]["layers"])
        row["mi_by_layer"] = {n: mean([r["routing"]["layers"].get(n, {}).get("mi_normalized") for r in rs])
                              for n in names}  # fmt: skip
        health: dict[str, list] = {}
        for r in rs:
            for kind in r["routing"].get("health", {}):
                health.setdefault(kind, []).append(r["seed"])
        row["health"] = health
        out[m] = row
    return out


def _mean_std(values) -> list:
    return [mean(values), std(values)]


def summarize(results: dict) -> dict:
    """Per method: mean (and standard deviation) over seeds of every figure of its runs."""
    by_method: dict[str, list] = OrderedDict()
    for r in results["runs"]:
        by_method.setdefault(r["method"], []).append(r)
    out = OrderedDict()
    for m, rs in by_method.items():
        el, acc, gen, fg = (_mean_std([r.get(k) for r in rs]) for k in ("eval_loss", "accuracy", "gen_accuracy",
                                                                         "forgetting"))  # fmt: skip
        out[m] = {
            "seeds": [r["seed"] for r in rs],
            **{k: rs[0][k] for k in ("lr", "trainable_params", "r", "factor", "max_rank")},
            "eval_loss_mean": el[0], "eval_loss_std": el[1],
            **{f"eval_loss_by_{part}": {k: _mean_std([r[f"eval_loss_by_{part}"][k] for r in rs])
                                        for k in rs[0][f"eval_loss_by_{part}"]} for part in ("source", "category")},
            "accuracy_mean": acc[0], "accuracy_std": acc[1],
            "gen_accuracy_mean": gen[0], "gen_accuracy_std": gen[1],
            "gen_accuracy_by_category": {c: mean([r.get("gen_accuracy_by_category", {}).get(c) for r in rs])
                                         for c in rs[0].get("gen_accuracy_by_category", {})},
            "forgetting_mean": fg[0], "forgetting_std": fg[1],
            "general_loss_mean": mean([r.get("general_loss") for r in rs]),
            "s_per_step_mean": mean([r["s_per_step"] for r in rs]),
            "peak_mem_mb_mean": mean([r["peak_mem_mb"] for r in rs]),
        }  # fmt: skip
    return out
