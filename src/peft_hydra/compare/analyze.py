"""Observation II of the HydraLoRA paper (arXiv 2404.19245, Figure 2): LoRAs trained on different sub-tasks end with
similar A matrices and different B matrices. ``peft-hydra analyze --config <comparison config>``.

One PEFT LoRA (rank ``r`` of the config, the config's modules, layers, steps, batch and learning rate) is trained per
group of categories (default: one group per data source), under two initialisations: ``same`` (every group's LoRA
starts from the same seed, so the same A) and ``different`` (group g uses seed + g). For every adapted module and
every pair of groups it measures

- the subspace similarity of the A's row spaces and of the B's column spaces: the mean squared cosine of their
  principal angles, ``||Q_1^T Q_2||_F^2 / r`` (1 = same subspace; two random r-dim subspaces of R^d give about r/d);
- the cosine similarity of the flattened matrices (what the paper's t-SNE of flattened weights sees);

against a random baseline (Gaussian matrices of the same shapes), plus how far A moved from its initialisation
(``||A - A_0|| / ||A_0||``). The paper's t-SNE picture (authors' ``Motivation/tsen_lora.py``: one point per
flattened weight tensor, coloured by task) is drawn for the A's and B's of the modules sharing a shape.
"""

from __future__ import annotations

import json
import os
import time
from itertools import combinations
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .tables import md_table

ANALYSIS_DEFAULTS = {"groups": "source", "inits": ["same", "different"], "steps": None, "lr": None, "seed": 0}


def subspace_similarity(X: np.ndarray, Y: np.ndarray) -> float:
    """Mean squared cosine of the principal angles between the column spaces of X (d x r1) and Y (d x r2)."""
    qx, _ = np.linalg.qr(np.asarray(X, dtype=np.float64))
    qy, _ = np.linalg.qr(np.asarray(Y, dtype=np.float64))
    return float(np.sum((qx.T @ qy) ** 2) / min(qx.shape[1], qy.shape[1]))


def cosine(X: np.ndarray, Y: np.ndarray) -> float:
    x, y = np.ravel(X).astype(np.float64), np.ravel(Y).astype(np.float64)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    return float(x @ y / (nx * ny)) if nx > 0 and ny > 0 else 0.0


def pair_metrics(mats: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, list[float]]:
    """``mats[group][module] = {"A": (r, in), "B": (out, r)}`` -> per (module, group pair) similarities."""
    groups = list(mats)
    out: dict[str, list[float]] = {"A_subspace": [], "B_subspace": [], "A_cosine": [], "B_cosine": []}
    for g, h in combinations(groups, 2):
        for mod in mats[g]:
            a1, a2, b1, b2 = mats[g][mod]["A"], mats[h][mod]["A"], mats[g][mod]["B"], mats[h][mod]["B"]
            out["A_subspace"].append(subspace_similarity(a1.T, a2.T))
            out["B_subspace"].append(subspace_similarity(b1, b2))
            out["A_cosine"].append(cosine(a1, a2))
            out["B_cosine"].append(cosine(b1, b2))
    return out


def random_baseline(shapes: dict[str, dict[str, tuple]], n_groups: int, seed: int = 0) -> dict[str, list[float]]:
    """The same metrics for independent Gaussian matrices of the same shapes (no shared structure at all)."""
    rng = np.random.default_rng(seed)
    mats = {f"g{g}": {m: {k: rng.standard_normal(shp) for k, shp in s.items()} for m, s in shapes.items()}
            for g in range(n_groups)}  # fmt: skip
    return pair_metrics(mats)


def lora_matrices(wrapper) -> dict[str, dict[str, np.ndarray]]:
    """{module name: {"A": (r, in), "B": (out, r)}} of a PEFT LoRA model's default adapter."""
    out = {}
    for name, mod in wrapper.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            short = name.split("model.layers.", 1)[-1] if "model.layers." in name else name
            out[short] = {"A": mod.lora_A["default"].weight.detach().cpu().float().numpy().copy(),
                          "B": mod.lora_B["default"].weight.detach().cpu().float().numpy().copy()}  # fmt: skip
    if not out:
        raise ConfigError("No LoRA modules found in the trained model: the config's `target_modules` match no module.")
    return out


def resolve_groups(spec, train: list[dict]) -> dict[str, list[str]]:
    """``"source"``: one group per data source; ``"category"``: one per category; or ``{name: [categories]}``."""
    cats_of_src: dict[str, list[str]] = {}
    for ex in train:
        cats_of_src.setdefault(ex["source"], [])
        if ex["category"] not in cats_of_src[ex["source"]]:
            cats_of_src[ex["source"]].append(ex["category"])
    all_cats = [c for cs in cats_of_src.values() for c in cs]
    if spec == "source":
        groups = dict(cats_of_src)
    elif spec == "category":
        groups = {c: [c] for c in all_cats}
    elif isinstance(spec, dict) and spec:
        groups = {str(k): list(v) for k, v in spec.items()}
        unknown = sorted({c for v in groups.values() for c in v} - set(all_cats))
        if unknown:
            raise ConfigError(f"analysis.groups: categories {unknown} are not in the training data "
                                      f"(it has {all_cats}).")  # fmt: skip
    else:
        raise ConfigError(
            f"analysis.groups must be 'source', 'category' or a mapping {{group: [categories]}}, got {spec!r}."
        )
    if len(groups) < 2:
        raise ConfigError(f"Observation II needs at least 2 groups of categories, got {list(groups)}.")
    return groups


def analysis_options(raw) -> dict[str, Any]:
    """The config's ``analysis:`` mapping with its defaults, every value checked (a clear error, nothing ignored)."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"`analysis` must be a mapping of {sorted(ANALYSIS_DEFAULTS)}, got {raw!r}.")
    acfg = {**ANALYSIS_DEFAULTS, **(raw or {})}
    unknown = sorted(set(acfg) - set(ANALYSIS_DEFAULTS))
    if unknown:
        raise ConfigError(f"Unknown analysis field(s) {unknown}; allowed: {sorted(ANALYSIS_DEFAULTS)}.")
    inits = acfg["inits"]
    if not isinstance(inits, list) or not inits or len(set(inits)) != len(inits) or set(inits) - {"same", "different"}:
        raise ConfigError(f"analysis.inits must list 'same' and/or 'different', each once, got {inits!r}.")
    steps, lr, seed = acfg["steps"], acfg["lr"], acfg["seed"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"analysis.steps must be null (the config's steps) or an integer >= 1, got {steps!r}.")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(f"analysis.lr must be null (the middle of lr_sweep) or a number > 0, got {lr!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"analysis.seed must be an integer, got {seed!r}.")
    groups = acfg["groups"]
    if isinstance(groups, dict):
        seen: dict[str, str] = {}
        for name, cats in groups.items():
            if not isinstance(cats, list) or not cats:
                raise ConfigError(f"analysis.groups[{name!r}] must be a non-empty list of categories, got {cats!r}.")
            for c in cats:
                if c in seen:
                    raise ConfigError(
                        f"analysis.groups: category {c!r} is in both {seen[c]!r} and {name!r}; groups must be disjoint."
                    )
                seen[c] = name
    return acfg


def run_analysis(cfg: dict, output_dir: str, command: str, log=print) -> dict[str, Any]:
    import peft

    from .methods import MethodSpec
    from .stats import bootstrap_mean
    from .run import machine_info, prepare
    from .train import train_run

    t0 = time.time()
    acfg = analysis_options(cfg.get("analysis"))

    def _summ(xs):  # mean and bootstrap 95% CI over (module, group pair) values
        return bootstrap_mean(xs, cfg["bootstrap"])

    os.makedirs(output_dir, exist_ok=True)
    P = prepare(cfg, log)
    train = P["tokd"]["train"]
    groups = resolve_groups(acfg["groups"], train)
    steps = int(cfg["steps"] if acfg["steps"] is None else acfg["steps"])
    default_lr = cfg["lr_sweep"][len(cfg["lr_sweep"]) // 2] if cfg["lr_sweep"] else cfg["lr"]
    lr = float(default_lr if acfg["lr"] is None else acfg["lr"])
    r = int(cfg["r"])
    common = P["common"]
    pc = peft.LoraConfig(r=r, lora_alpha=float(cfg["alpha_over_r"]) * r, target_modules=common["target_modules"],
                         layers_to_transform=common["layers_to_transform"])  # fmt: skip
    spec = MethodSpec(name="lora", kind="lora")
    run_cfg = {"device": P["device"], "batch_size": cfg["batch_size"], "eval_batch_size": cfg["eval_batch_size"],
               "warmup": cfg["warmup"], "max_grad_norm": cfg["max_grad_norm"], "weight_decay": cfg["weight_decay"], "schedule": cfg["schedule"],
               "steps": steps}  # fmt: skip
    base_seed = int(acfg["seed"])
    results: dict[str, Any] = {"command": command, "model": P["model_desc"], "machine": machine_info(P["device"]),
                               "config": cfg, "analysis": {**acfg, "steps": steps, "lr": lr, "r": r},
                               "groups": groups, "conditions": {}}  # fmt: skip
    trained: dict[str, dict] = {}
    for init in acfg["inits"]:
        mats, inits, evals = {}, {}, {}
        for gi, (g, cats) in enumerate(groups.items()):
            seed = base_seed if init == "same" else base_seed + gi
            tr = [ex for ex in train if ex["category"] in cats]
            ev = [ex for ex in P["tokd"]["eval"] if ex["category"] in cats]
            torch.manual_seed(seed)  # the same init as train_run's (manual_seed, then get_peft_model)
            import copy

            inits[g] = lora_matrices(peft.get_peft_model(copy.deepcopy(P["model"]), pc))
            out = train_run(P["model"], spec, pc, common, tr, {"eval": ev}, P["cache"], P["first_top_arg"], run_cfg,
                            seed, lr, desc=f"analyze {init} {g}", extract=lora_matrices)  # fmt: skip
            mats[g] = out["extracted"]
            el = out["evals"]["eval"]["losses"]
            evals[g] = {"n_train": len(tr), "n_eval": len(ev), "eval_loss": float(np.mean(el)) if el else None,
                        "final_train_loss": float(np.mean(out["train_loss_curve"][-10:])), "seed": seed}  # fmt: skip
            log(f"analyze init={init} group={g}: {len(tr)} train examples, seed {seed}, eval loss "
                f"{evals[g]['eval_loss']:.4f}")  # fmt: skip
        pm = pair_metrics(mats)
        shapes = {m: {"A": v["A"].shape, "B": v["B"].shape} for m, v in next(iter(mats.values())).items()}
        rb = random_baseline(shapes, len(groups), seed=base_seed)
        moved = {
            "A_rel_change_from_init": _summ([float(np.linalg.norm(mats[g][m]["A"] - inits[g][m]["A"]) /
                                                   np.linalg.norm(inits[g][m]["A"])) for g in mats for m in mats[g]]),
            "A_init_subspace_similarity": _summ(pair_metrics(inits)["A_subspace"]),
        }  # fmt: skip
        results["conditions"][init] = {
            "groups": evals,
            "metrics": {k: _summ(v) for k, v in pm.items()},
            "random_baseline": {k: _summ(v) for k, v in rb.items()},
            "init": moved,
            "per_module": pm,
        }
        trained[init] = mats
    results["verdict"] = verdict(results)
    results["wall_s"] = time.time() - t0
    with open(os.path.join(output_dir, "analysis.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    plots = tsne_plot(trained, os.path.join(output_dir, "observation2_tsne.png"))
    plots += similarity_plot(results, os.path.join(output_dir, "observation2_similarity.png"))
    with open(os.path.join(output_dir, "analysis.md"), "w") as f:
        f.write(markdown(results, plots))
    for line in results["verdict"]["lines"]:
        log(line)
    log(f"wrote {output_dir}/analysis.md, analysis.json and plots (wall {results['wall_s']:.0f}s)")
    return results


def verdict(res: dict) -> dict[str, Any]:
    """"A alike, B different" holds under an init when A's similarity is clearly above both B's and the random
    baseline's (95% CIs apart) and B's is not (B close to the random baseline or below A)."""
    lines, holds = [], {}
    for init, c in res["conditions"].items():
        m, rb = c["metrics"], c["random_baseline"]
        a_above_b = m["A_subspace"]["ci95"][0] > m["B_subspace"]["ci95"][1]
        a_above_rand = m["A_subspace"]["ci95"][0] > rb["A_subspace"]["ci95"][1]
        holds[init] = bool(a_above_b and a_above_rand)
        lines.append(
            f"init={init}: A subspace similarity {m['A_subspace']['mean']:.3f} {_ci(m['A_subspace'])} (random "
            f"{rb['A_subspace']['mean']:.3f}), B {m['B_subspace']['mean']:.3f} {_ci(m['B_subspace'])} (random "
            f"{rb['B_subspace']['mean']:.3f}); A cosine {m['A_cosine']['mean']:.3f}, B cosine "
            f"{m['B_cosine']['mean']:.3f}; A moved {c['init']['A_rel_change_from_init']['mean']:.1%} from its init "
            f"-> 'A alike, B different' {'holds' if holds[init] else 'does not hold'}"
        )
    return {"holds": holds, "lines": lines}


def _ci(s: dict) -> str:
    return f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def markdown(res: dict, plots: list[str]) -> str:
    a = res["analysis"]
    cfg = res["config"]
    L = [f"# Observation II (A alike, B different): `{cfg['name']}`", ""]
    L.append("## Summary")
    L += [f"- {x}" for x in res["verdict"]["lines"]]
    L.append("")
    L.append("## Set-up")
    L.append(f"- Model: {res['model']}; machine: {res['machine'].get('cpu_model', res['machine']['processor'])}, "
             f"{res['machine']['cpu_count']} CPUs, device {res['machine']['device']}")  # fmt: skip
    L.append(f"- Command: `{res['command']}`; wall time {res['wall_s']:.0f} s")
    L.append(f"- One PEFT LoRA per group: r = {a['r']}, alpha = {cfg['alpha_over_r']} x r, modules "
             f"{cfg['target_modules']} of the top {cfg['top_layers'] or 'all'} layers, {a['steps']} steps, batch "
             f"{cfg['batch_size']}, lr {a['lr']:g}, AdamW, warmup {cfg['warmup']:.0%} + linear decay.")  # fmt: skip
    L.append("- Inits: `same` = every group's LoRA starts from the same seed (identical A at step 0, B = 0); "
             "`different` = group g uses seed + g (independent A's at step 0).")
    L.append("- Subspace similarity: mean squared cosine of the principal angles between the A's row spaces (B's "
             "column spaces) of two groups' LoRAs for the same module (1 = same subspace). Cosine: of the flattened "
             "matrices. Mean over every (module, group pair) with a bootstrap 95% CI over them. Random baseline: "
             "independent Gaussian matrices of the same shapes.")
    L.append("")
    L.append("## Groups")
    rows = []
    for init, c in res["conditions"].items():
        for g, info in c["groups"].items():
            cats = res["groups"][g]
            rows.append([init, g, ", ".join(cats) if len(cats) <= 4 else f"{len(cats)} categories", info["n_train"],
                         info["seed"], "-" if info["eval_loss"] is None else f"{info['eval_loss']:.4f}"])  # fmt: skip
    L += md_table(["init", "group", "categories", "train examples", "seed", "eval loss (own group)"], rows)
    L.append("")
    L.append("## Similarities across groups (mean [95% CI] over modules x group pairs)")
    rows = []
    for init, c in res["conditions"].items():
        m, rb, i = c["metrics"], c["random_baseline"], c["init"]
        rows.append([init, *(f"{m[k]['mean']:.3f} {_ci(m[k])}" for k in ("A_subspace", "B_subspace", "A_cosine",
                     "B_cosine")), f"{rb['A_subspace']['mean']:.3f}", f"{rb['B_subspace']['mean']:.3f}",
                     f"{i['A_rel_change_from_init']['mean']:.1%}", f"{i['A_init_subspace_similarity']['mean']:.3f}"])  # fmt: skip
    L += md_table(["init", "A subspace", "B subspace", "A cosine", "B cosine", "random A subspace",
                   "random B subspace", "A moved from init", "A subspace at init"], rows)  # fmt: skip
    L.append("")
    if plots:
        L.append("## Plots")
        L += [f"![{p}]({p})" for p in plots]
        L.append("")
    return "\n".join(L) + "\n"


def tsne_plot(trained: dict, path: str) -> list[str]:
    """The paper's Figure 2: t-SNE of the flattened A's (and B's) of modules sharing a shape, coloured by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    inits = list(trained)
    fig, axes = plt.subplots(len(inits), 2, figsize=(10, 4.2 * len(inits)), squeeze=False)
    for row, init in enumerate(inits):
        mats = trained[init]
        for col, key in enumerate(("A", "B")):
            ax = axes[row][col]
            shapes = [v[key].shape for v in next(iter(mats.values())).values()]
            shape = max(set(shapes), key=shapes.count)  # the most common shape: comparable flattened vectors
            pts, labels = [], []
            for g, mods in mats.items():
                for m, v in mods.items():
                    if v[key].shape == shape:
                        pts.append(v[key].ravel())
                        labels.append(g)
            X = np.stack(pts)
            perp = float(max(2, min(30, (len(X) - 1) // 3)))
            Y = TSNE(n_components=2, init="pca", random_state=42, perplexity=perp).fit_transform(X)
            for gi, g in enumerate(mats):
                sel = [i for i, lab in enumerate(labels) if lab == g]
                ax.scatter(Y[sel, 0], Y[sel, 1], label=g, s=22, marker="osD^v*"[gi % 6], edgecolors="gray",
                           linewidths=0.3)  # fmt: skip
            ax.set_title(f"{key} matrices, init={init} ({len(X)} tensors of shape {shape})", fontsize=9)
            ax.legend(fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("t-SNE of flattened LoRA weights per group (paper's Observation II: A's overlap, B's separate)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path)]


def similarity_plot(res: dict, path: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = list(res["conditions"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    keys = ["A_subspace", "B_subspace", "A_cosine", "B_cosine"]
    w = 0.8 / (len(inits) + 1)
    for i, init in enumerate(inits + ["random"]):
        src = (res["conditions"][inits[0]]["random_baseline"] if init == "random"
               else res["conditions"][init]["metrics"])  # fmt: skip
        means = [src[k]["mean"] for k in keys]
        err = np.array([[src[k]["mean"] - src[k]["ci95"][0], src[k]["ci95"][1] - src[k]["mean"]] for k in keys]).T
        ax.bar(np.arange(len(keys)) + (i - len(inits) / 2) * w, means, w, yerr=err, capsize=3,
               label=f"init={init}" if init != "random" else "random Gaussian", color=None if init != "random" else "0.6")  # fmt: skip
    ax.set_xticks(range(len(keys)), ["A subspace", "B subspace", "A cosine", "B cosine"])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("similarity across groups")
    ax.set_title("Across-group similarity of LoRA A's and B's (mean, 95% CI over modules x pairs)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path)]

