"""The PNG plots of a comparison (matplotlib, Agg)."""

from __future__ import annotations

import os

import numpy as np

from .tables import _fmt, sweep_edge

VERDICT_COLORS = {"better": "tab:blue", "worse": "tab:red", "no detectable difference": "0.45"}


def _short(label: str, n: int = 40) -> str:
    return label if len(label) <= n else label[: n - 1] + "~"


def make_plots(res: dict, out: str) -> list[str]:
    """Write the plots of a finished comparison to ``out``; return their file names."""
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


