"""The markdown of a comparison: its summary, caveats and tables (results.md) and the table of several runs
(``peft-hydra report --table``). Every table goes through :func:`md_table`."""

from __future__ import annotations

import json
import os

from .stats import PAIRED_TEST, PERMUTATIONS


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]  # fmt: skip


def _fmt(x, nd=4):
    return "-" if x is None else f"{x:.{nd}f}"


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




HEALTH_WORDS = {"uniform": "the gates stay uniform (per-token gate entropy >= 0.98 of log N, median over layers)",
                "collapse": "the routing collapses onto one head (largest mean gate >= 0.9, median over layers)"}


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
        tok = {m: row for m, row in rt.items() if row.get("token_mi_median") is not None}
        if tok:
            L.append("")
            L.append("What else the gates track (MI with the input token / the target token / the position bucket, "
                     "/ log N, plug-in minus its shuffled-values baseline, median over layers, mean over seeds; "
                     "~0 = no more than estimation bias): "
                     + "; ".join(f"`{m}` " + " / ".join(_fmt(row.get(f"{v}_mi_excess_median"), 3)
                                                       for v in ("token", "target", "position"))
                                 for m, row in tok.items()))  # fmt: skip
    for m, om in (res.get("oracle") or {}).items():
        L.append("")
        L.append(f"Oracle routing `{m}` (gates = one-hot of the category's head; {om['rule']}): "
                 + ", ".join(f"{c} -> {h}" for c, h in om["heads"].items()) + ".")
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
        rows = []
        for mth, sw in res["lr_sweep"].items():
            vals = {float(k): v for k, v in sw["val_loss"].items()}
            cells = [("**" + _fmt(vals[x]) + "**") if x == float(sw["chosen"]) else _fmt(vals.get(x)) for x in lrs]
            flag = f" (at {sweep_edge(sw)} edge)" if sweep_edge(sw) else ""
            grid = ", ".join(f"{x:g}" for x in sw.get("grid") or sorted(vals))
            ext = f" (extended by {', '.join(f'{x:g}' for x in sw['extended'])})" if sw.get("extended") else ""
            rows.append([mth, *cells, f"{float(sw['chosen']):g}{flag}", grid + ext])
        L += md_table(["method", *(f"lr {x:g}" for x in lrs), "chosen", "final grid"], rows)
        L.append("")
    L.append("## Results (mean +- std over seeds)")
    tgt = res["budget"]["target"]
    L.append(f"Budget: {tgt:,} trainable parameters, tolerance {res['budget']['tolerance']:.0%}." if tgt else
             "No budget: every method at the configured rank.")  # fmt: skip
    L.append("")
    srcs = list(next(iter(summ.values()))["eval_loss_by_source"]) if summ else []
    rows = []
    for mth, s in summ.items():
        b = res["budget"]["methods"][mth]
        dev = f" ({100 * (s['trainable_params'] - tgt) / tgt:+.1f}%)" if tgt else ""
        rk = f"{s['r']}" + (f", factor {s['factor']}" if s["factor"] is not None else "")
        mr = b["max_rank"]
        acc = "-" if s["accuracy_mean"] is None else f"{100 * s['accuracy_mean']:.1f} +- {100 * s['accuracy_std']:.1f}%"
        rows.append([mth, f"{s['trainable_params']:,}{dev}" + (" *" if b["note"] else ""), rk,
                     f"{mr['value']} ({mr['formula']})" if mr["value"] is not None else mr["formula"], f"{s['lr']:g}",
                     _fmt(s["s_per_step_mean"], 2), _fmt(s["peak_mem_mb_mean"], 0),
                     f"{_fmt(s['eval_loss_mean'])} +- {_fmt(s['eval_loss_std'])}",
                     *(f"{_fmt(v[0])} +- {_fmt(v[1])}" for v in s["eval_loss_by_source"].values()), acc])  # fmt: skip
    L += md_table(["method", "trainable params (vs budget)", "r", "max rank of update", "lr", "s/step", "peak mem MB",
                   "eval loss", *(f"{s} loss" for s in srcs), "accuracy"], rows)  # fmt: skip
    notes = [f"{m_}: {b['note']}" for m_, b in res["budget"]["methods"].items() if b["note"]]
    if notes:
        L.append("")
        L.append("\\* " + "; ".join(notes))
    L.append("")
    pv = res.get("paired_vs_reference")
    if pv:
        ref = pv["reference"]
        L.append(f"## Paired differences against `{ref}` (eval loss per token, method - {ref}; negative = better)")
        L.append("Per-example differences averaged over seeds, over the examples of each group: the percentile "
                 f"bootstrap 95% CI of the mean ({cfg['bootstrap']} resamples) and the two-sided p of a {PAIRED_TEST} "
                 f"({PERMUTATIONS} random sign flips; exact for small groups), Holm-corrected across methods within "
                 "each group. A method is called better/worse only when the Holm-corrected p < 0.05, the 95% CI "
                 "excludes 0 and every seed's mean difference has the same sign.")  # fmt: skip
        L.append("")
        rows = [[g, mth, f"{row['mean_diff']:+.4f}", f"[{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]",
                 f"{row['p_holm']:.3g}", ", ".join(f"{x:+.4f}" for x in row["per_seed_mean_diff"]), row["verdict"]]
                for g, group in pv.items() if g != "reference" for mth, row in group.items()]  # fmt: skip
        L += md_table(["group", "method", "mean diff", "95% CI", "p (Holm)", "per-seed mean diffs", "verdict"], rows)
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
        rows = [[mth, row["num_experts"], *(_fmt(row[k], 3) for k in ("mi_normalized_median", "mi_normalized_max",
                 "token_entropy_median", "usage_entropy_median")),
                 f"{', '.join(str(x) for x in row['dead_heads'])} of {row['heads']}",
                 _fmt(row["head_abs_cosine_median"], 3), _fmt(row["head_subspace_median"], 3),
                 "; ".join(f"{k} (seeds {v})" for k, v in row["health"].items()) or "-"]
                for mth, row in rt.items()]  # fmt: skip
        L += md_table(["method", "N", "MI / log N median", "MI / log N max", "token entropy", "usage entropy",
                       "dead heads (per seed)", "B heads abs. cos", "B heads subspace", "warnings"], rows)  # fmt: skip
        L.append("")
        tok = {m: row for m, row in rt.items() if row.get("token_mi_median") is not None}
        if tok:
            L.append("What else the gates track, token by token: the mutual information between the soft gates and "
                     "the input token id, the target (next) token id and the position (buckets of 8 tokens), "
                     "/ log N, estimated like the category MI (plug-in, p(h | v) = mean gate of the tokens with value "
                     "v). With many distinct tokens and few tokens each, the plug-in estimate is biased upward, so each "
                     "is shown as plug-in (shuffled) = excess: 'shuffled' is the same estimate with the values "
                     "permuted at random across the eval tokens (mean of 8 seeded permutations: the bias when gates "
                     "and values are independent), 'excess' the difference, the part that is routing. 'beyond the "
                     "category': I(V; H | C) / log N, excess over values shuffled within each category. Padding is "
                     "left out. The oracle's figures come from the gates it is given.")  # fmt: skip
            L.append("")
            cell = lambda row, v: (f"{_fmt(row.get(f'{v}_mi_median'), 3)} ({_fmt(row.get(f'{v}_mi_shuffled_median'), 3)}) "
                                   f"= {_fmt(row.get(f'{v}_mi_excess_median'), 3)}")  # noqa: E731
            rows = [[mth, *(cell(row, v) for v in ("token", "target", "position")),
                     *(_fmt(row.get(f"{v}_mi_given_category_excess_median"), 3) for v in ("token", "target", "position"))]
                    for mth, row in tok.items()]  # fmt: skip
            L += md_table(["method", "token: plug-in (shuffled) = excess", "target", "position",
                           "token beyond category (excess)", "target beyond category", "position beyond category"],
                          rows)  # fmt: skip
            L.append("")
    for m, om in (res.get("oracle") or {}).items():
        L.append(f"## Oracle routing: `{m}`")
        L.append("HydraLoRA at the same budget without a router: every sample's gates are the one-hot of its "
                 "category's head (the upper bound of routing by task), given through `override_gates` in training, "
                 "evaluation and generation. Its routing row above comes from these gates (every adapted layer "
                 f"alike). Category -> head map ({om['rule']}):")
        L.append("")
        L += md_table(["category", "head"], [[c, h] for c, h in om["heads"].items()])
        L.append("")
        L.append("Training examples per head: " + ", ".join(f"{h}: {n}" for h, n in enumerate(om["load"])) + ".")
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
        rows = [[mth, _fmt(summ.get(mth, {}).get("general_loss_mean")), f"{row['mean']:+.4f}",
                 f"[{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]", ", ".join(f"{x:+.4f}" for x in row["per_seed"])]
                for mth, row in fg.items()]  # fmt: skip
        L += md_table(["method", "loss after (mean over seeds)", "change (after - before)", "95% CI",
                       "per-seed changes"], rows)  # fmt: skip
        L.append("")
    if summ:
        L.append("## Eval loss per category (mean over seeds)")
        mths = list(summ)
        rows = []
        for cat, info in res["data"]["categories"].items():
            vals = [summ[m_]["eval_loss_by_category"].get(cat, [None])[0] for m_ in mths]
            if all(v is None for v in vals):
                continue
            best = min(v for v in vals if v is not None)
            rows.append([cat, info["source"], *(("**" + _fmt(v) + "**") if v == best else _fmt(v) for v in vals)])
        L += md_table(["category", "source", *mths], rows)
        L.append("")
    if summ and any(v.get("gen_accuracy_mean") is not None for v in summ.values()):
        mths = list(summ)
        L.append("## Accuracy by greedy generation (mean over seeds)")
        L.append("Greedy decoding from the prompt with the full model (KV cache), stopped at EOS or by the source's "
                 "rule: short answers (BBH) stop at the first line break and must equal the answer exactly (stripped); "
                 "GSM8K stops once `#### <number>` ends a line and scores the final number (after `####`, else the "
                 f"last number). At most {cfg.get('generate_max_new_tokens', 24)} new tokens (GSM8K: 8x).")  # fmt: skip
        L.append("")
        rows = [["**all scored**", *("-" if summ[m_]["gen_accuracy_mean"] is None else
                 f"{100 * summ[m_]['gen_accuracy_mean']:.1f} +- {100 * summ[m_]['gen_accuracy_std']:.1f}%" for m_ in mths)]]
        rows += [[cat, *(_fmt(None if summ[m_]["gen_accuracy_by_category"].get(cat) is None
                  else 100 * summ[m_]["gen_accuracy_by_category"][cat], 1) for m_ in mths)]
                 for cat in summ[mths[0]].get("gen_accuracy_by_category", {})]  # fmt: skip
        L += md_table(["category", *mths], rows)
        L.append("")
    if plots:
        L.append("## Plots")
        for p in plots:
            L.append(f"![{p}]({p})")
        L.append("")
    return "\n".join(L) + "\n"



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
        rows.append([f"`{d.rstrip('/')}`", prot, f"{n['train']} / {n['eval']}", lr, "<br>".join(verdicts), wall])
    header = ["run", "protocol", "train / eval examples", "lr grid",
              "vs the reference: eval loss per token, mean [95% CI] (n.d. = no detectable difference)", "wall"]
    return "\n".join(md_table(header, rows)) + "\n"
