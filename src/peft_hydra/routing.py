"""Does the router specialise? Routing statistics of a HydraLoRA model on labelled batches.

:func:`routing_report` runs a model on batches labelled by category (task, dataset, domain: one label per batch)
and returns, for every routed layer:

- ``mi`` / ``mi_normalized``: the mutual information between category and routing, from the soft gates:
  ``I(C; H) = sum_c p(c) KL(p(h | c) || p(h))`` with ``p(h | c)`` the category's mean gate and ``p(c)`` the
  category's share of the tokens; normalised by ``log N`` (0: the routing carries no information about the
  category; 1: every category has its own head, which needs at least N categories: the maximum is
  ``log min(C, N) / log N``, reported as ``mi_max``).
- ``usage``: the mean gate per head over all tokens, ``p(h)``; ``dead_heads``: the heads with usage below
  ``dead_fraction / N`` (:data:`DEAD_HEAD_FRACTION` = 0.1 by default: a head that gets less than a tenth of its
  uniform share).
- ``token_entropy``: the mean per-token entropy of the gates, and ``usage_entropy``: the entropy of the mean gate,
  both divided by ``log N`` (1 = uniform). Per-token entropy near 1 = the router does not route (every token gets
  uniform gates); usage entropy near 0 = collapse onto one head.
- ``head_abs_cosine`` / ``head_subspace``: how alike the B heads are, the mean over pairs of heads of the absolute
  cosine of the flattened heads and of the subspace similarity ``||U_i^T U_j||_F^2 / min(rank_i, rank_j)`` of
  their column spaces (1 = the same output subspace; about ``r / out`` for random heads); ``None`` while the heads
  are zero (the paper's init before training).

plus ``summary``: median and max over layers. :func:`format_routing_report` renders it as markdown.

The statistics come from the model's router statistics (``HydraLoraModel.router_stats``: forward hooks on the
routers, registered while a report runs), gathered by :func:`observe_routing`, so a report costs one forward per
batch. Every token the layer sees is counted, padding included (as in :func:`peft_hydra.measure_mean_gates`).

The math is in plain functions on tensors (:func:`mutual_information`, :func:`head_similarity`,
:func:`layer_routing`, :func:`summarize`), testable without a model. The training-time checks on the same
statistics (gates that stay uniform or collapse) are :func:`peft_hydra.integrations.router_health`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Iterable, Mapping, Optional, Sequence

import torch

from .integrations import median, router_health, unwrap_hydra_tuner  # router_health: re-exported

__all__ = [
    "DEAD_HEAD_FRACTION",
    "format_routing_report",
    "head_similarity",
    "layer_routing",
    "mutual_information",
    "observe_routing",
    "report_from_observation",
    "router_health",
    "routing_report",
    "summarize",
]

#: A head is dead when its usage (mean gate over all tokens) is below ``DEAD_HEAD_FRACTION / N``.
DEAD_HEAD_FRACTION = 0.1
# --------------------------------------------------------------------------------------------- pure math
def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last dimension."""
    return torch.special.entr(p.double()).sum(-1)


def mutual_information(category_gates: torch.Tensor, category_weights: torch.Tensor) -> float:
    """``I(C; H)`` in nats, with ``p(h | c)`` = ``category_gates[c]`` (C, N; rows sum to 1) and ``p(c)`` proportional
    to ``category_weights`` (C,): ``H(sum_c p(c) p(h|c)) - sum_c p(c) H(p(h|c))``."""
    gates = category_gates.double()
    gates = gates / gates.sum(-1, keepdim=True)
    w = category_weights.double()
    w = w / w.sum()
    usage = w @ gates
    return max(float(entropy(usage) - (w * entropy(gates)).sum()), 0.0)


def head_similarity(B: torch.Tensor, rtol: float = 1e-6) -> dict[str, Any]:
    """How alike the N heads of ``B`` (out, N, r) are: ``{"abs_cosine": (N, N), "subspace": (N, N)}`` (float64).

    ``abs_cosine[i, j]``: |cosine| of the flattened heads i and j. ``subspace[i, j]``: ``||U_i^T U_j||_F^2 /
    min(k_i, k_j)`` with ``U_i`` the ``k_i`` left singular vectors of head i whose singular values exceed ``rtol``
    times the largest (1: one head's column space contains the other's; 0: orthogonal). Entries of a zero head are
    NaN.
    """
    heads = B.detach().double().cpu().permute(1, 0, 2)  # (N, out, r)
    n = heads.shape[0]
    flat = heads.reshape(n, -1)
    norms = flat.norm(dim=-1)
    cos = (flat @ flat.T) / (norms[:, None] * norms[None, :])
    bases = []
    for head in heads:
        u, s, _ = torch.linalg.svd(head, full_matrices=False)
        keep = s > rtol * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
        bases.append(u[:, keep])
    sub = torch.full((n, n), float("nan"), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            k = min(bases[i].shape[1], bases[j].shape[1])
            if k:
                sub[i, j] = (bases[i].T @ bases[j]).pow(2).sum() / k
    return {"abs_cosine": cos.abs(), "subspace": sub}


def _mean_off_diagonal(m: torch.Tensor) -> Optional[float]:
    n = m.shape[0]
    values = m[~torch.eye(n, dtype=torch.bool)]
    if n < 2 or torch.isnan(values).any():
        return None
    return float(values.mean())


def layer_routing(
    category_gates: Mapping[Hashable, Sequence[float]],
    category_tokens: Mapping[Hashable, float],
    category_entropy: Mapping[Hashable, float],
    heads: Optional[torch.Tensor] = None,
    dead_fraction: float = DEAD_HEAD_FRACTION,
    labelled: bool = True,
) -> dict[str, Any]:
    """The routing statistics of one layer (see the module docstring) from per-category sums.

    ``category_gates[c]``: the mean gate (N) over category c's tokens; ``category_tokens[c]``: their number;
    ``category_entropy[c]``: their mean per-token gate entropy (nats); ``heads``: the layer's B (out, N, r), for
    the head similarity. ``labelled=False`` (one unlabelled category): ``mi*`` are None.
    """
    cats = list(category_gates)
    gates = torch.tensor([list(category_gates[c]) for c in cats], dtype=torch.float64)
    tokens = torch.tensor([float(category_tokens[c]) for c in cats], dtype=torch.float64)
    n = gates.shape[-1]
    log_n = math.log(n)
    w = tokens / tokens.sum()
    usage = w @ gates
    token_entropy = float((w * torch.tensor([float(category_entropy[c]) for c in cats], dtype=torch.float64)).sum())
    out: dict[str, Any] = {"tokens": int(tokens.sum())}
    if labelled:
        mi = mutual_information(gates, tokens)
        out.update(mi=mi, mi_normalized=mi / log_n, mi_max=math.log(min(len(cats), n)) / log_n)
    else:
        out.update(mi=None, mi_normalized=None, mi_max=None)
    out.update(
        usage=usage.tolist(),
        dead_heads=[i for i, u in enumerate(usage.tolist()) if u < dead_fraction / n],
        token_entropy=token_entropy / log_n,
        usage_entropy=float(entropy(usage)) / log_n,
        category_gates={c: gates[i].tolist() for i, c in enumerate(cats)},
        category_tokens={c: int(tokens[i]) for i, c in enumerate(cats)},
    )
    if heads is not None:
        sim = head_similarity(heads)
        out["head_abs_cosine"] = _mean_off_diagonal(sim["abs_cosine"])
        out["head_subspace"] = _mean_off_diagonal(sim["subspace"])
    return out


def summarize(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Median and max over layers of the per-layer figures, and the number of dead heads in all layers."""
    summary: dict[str, Any] = {"layers": len(layers)}
    for key in ("mi_normalized", "token_entropy", "usage_entropy", "head_abs_cosine", "head_subspace"):
        values = [s[key] for s in layers.values() if s.get(key) is not None]
        summary[f"{key}_median"] = median(values) if values else None
        summary[f"{key}_max"] = max(values) if values else None
    summary["dead_heads"] = sum(len(s["dead_heads"]) for s in layers.values())
    summary["heads"] = sum(len(s["usage"]) for s in layers.values())
    return summary


# ------------------------------------------------------------------------------------------ the report
def _forward(model, batch) -> None:
    if isinstance(batch, Mapping):
        model(**{k: v for k, v in batch.items() if k != "labels"})
    else:
        model(input_ids=batch)


@torch.no_grad()
def observe_routing(
    model,
    batches: Iterable,
    labels: Optional[Sequence[Hashable]] = None,
    adapter_name: Optional[str] = None,
    forward: Optional[Callable[[Any, Any], Any]] = None,
) -> dict[str, dict[Hashable, dict[str, Any]]]:
    """Run ``model`` (a PeftModel with a HydraLoRA adapter) on ``batches`` with its router statistics on, and return
    them per routed layer and category: ``{layer: {label: {"mean_gate": [N], "entropy": nats, "tokens": int}}}``.

    The one place that runs batches with the routers observed: :func:`routing_report`,
    :func:`peft_hydra.measure_mean_gates` and the comparison's evaluation use it. The model runs in eval mode
    without grad; its training mode and router-statistics state are restored afterwards.

    Args:
        batches: model inputs, each a dict (an LM ``labels`` key is ignored) or an input-id tensor.
        labels: one category label per batch (a task or dataset name; not the LM labels); None: one category, None.
        adapter_name: the adapter (default: the active one).
        forward: ``forward(model, batch)`` runs one batch (default: ``model(**batch)`` without ``labels``, or
            ``model(input_ids=batch)``); e.g. to compute a loss on the same forward.

    Every token the layer sees is counted, padding included.
    """
    tuner = unwrap_hydra_tuner(model)
    adapter = tuner._known_adapter(adapter_name)
    batches = list(batches)
    if not batches:
        raise ValueError("observe_routing got no batches: pass a non-empty iterable of model inputs.")
    labels = list(labels) if labels is not None else [None] * len(batches)
    if len(labels) != len(batches):
        raise ValueError(f"got {len(batches)} batches but {len(labels)} labels: give one category label per batch.")
    sums: dict[str, dict[Hashable, list]] = {}  # layer -> category -> [gate sum (N), entropy sum, tokens]
    was_training = model.training
    model.eval()
    try:
        with tuner.collect_router_stats():
            for batch, label in zip(batches, labels):
                tuner.reset_router_stats()
                with tuner.observation_window():  # also when ``forward`` runs parts of the model directly
                    (forward or _forward)(model, batch)
                for name, s in tuner.router_stats(adapter)["layers"].items():
                    acc = sums.setdefault(name, {}).setdefault(label, [0.0, 0.0, 0])
                    acc[0] += torch.tensor(s["mean_gate"], dtype=torch.float64) * s["tokens"]
                    acc[1] += s["entropy"] * s["tokens"]
                    acc[2] += s["tokens"]
    finally:
        model.train(was_training)
    return {
        name: {c: {"mean_gate": (v[0] / v[2]).tolist(), "entropy": v[1] / v[2], "tokens": v[2]} for c, v in cats.items()}
        for name, cats in sums.items()
    }


def layer_heads(layer, adapter: str) -> torch.Tensor:
    """The B heads of ``adapter`` on a HydraLoRA layer as (out, N, r)."""
    return layer.hydra_B[adapter].weight.unflatten(1, (layer.num_experts[adapter], -1))


def report_from_observation(
    model, observed: Mapping[str, Mapping[Hashable, Mapping[str, Any]]], adapter_name: Optional[str] = None,
    labelled: bool = True, dead_fraction: float = DEAD_HEAD_FRACTION,
) -> dict[str, Any]:  # fmt: skip
    """The routing report (see :func:`routing_report`) from what :func:`observe_routing` returned."""
    tuner = unwrap_hydra_tuner(model)
    adapter = tuner._known_adapter(adapter_name)
    if not observed:
        raise ValueError(
            f"No routed layer of adapter '{adapter}' saw a token: the adapter has no learned router (num_experts=1 "
            "or fixed_gates), so there is no routing to report."
        )
    modules = dict(tuner.model.named_modules())
    layers = {
        name: layer_routing({c: v["mean_gate"] for c, v in per_cat.items()},
                            {c: v["tokens"] for c, v in per_cat.items()},
                            {c: v["entropy"] for c, v in per_cat.items()},
                            heads=layer_heads(modules[name], adapter), dead_fraction=dead_fraction, labelled=labelled)
        for name, per_cat in observed.items()
    }  # fmt: skip
    categories = list(dict.fromkeys(c for per_cat in observed.values() for c in per_cat)) if labelled else []
    return {
        "layers": layers,
        "summary": summarize(layers),
        "num_experts": len(next(iter(layers.values()))["usage"]),
        "categories": categories,
        "dead_fraction": dead_fraction,
    }


def routing_report(
    model,
    batches: Iterable,
    labels: Optional[Sequence[Hashable]] = None,
    adapter_name: Optional[str] = None,
    dead_fraction: float = DEAD_HEAD_FRACTION,
) -> dict[str, Any]:
    """Routing statistics of ``model`` (a PeftModel with a HydraLoRA adapter) on ``batches``.

    Args:
        model: the model; run in eval mode without grad (its training mode and router-statistics state are
            restored afterwards).
        batches: model inputs, each a dict (an LM ``labels`` key is ignored) or an input-id tensor.
        labels: one category label per batch (a task or dataset name; not the LM labels), or None (no categories:
            the mutual information is None). Put one category's examples in a batch.
        adapter_name: the adapter (default: the active one).
        dead_fraction: a head is dead when its usage is below ``dead_fraction / N``.

    Returns ``{"layers": {layer_name: stats}, "summary": {...}, "num_experts": N, "categories": [...]}``; ``stats``
    as described in :mod:`peft_hydra.routing`. Layers without a learned router are left out.
    """
    if not isinstance(batches, (list, tuple)):
        batches = list(batches)
    if not batches:
        raise ValueError("routing_report got no batches: pass a non-empty iterable of model inputs.")
    if labels is not None and len(list(labels)) != len(batches):
        raise ValueError(
            f"routing_report got {len(batches)} batches but {len(list(labels))} labels: give one category label per batch."
        )
    observed = observe_routing(model, batches, labels, adapter_name)
    return report_from_observation(model, observed, adapter_name, labelled=labels is not None,
                                   dead_fraction=dead_fraction)  # fmt: skip


def format_routing_report(report: Mapping[str, Any], max_layers: Optional[int] = None) -> str:
    """The report as markdown: the summary, then one table row per layer (``max_layers``: only the first ones)."""

    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    s = report["summary"]
    n = report["num_experts"]
    lines = [
        f"Routing over {s['layers']} routed layers, N = {n} heads, {len(report['categories'])} categories.",
        "",
        "| figure | median | max |",
        "|---|---|---|",
        f"| mutual information category/head (/ log N) | {f(s['mi_normalized_median'])} | {f(s['mi_normalized_max'])} |",
        f"| per-token gate entropy (/ log N; 1 = uniform) | {f(s['token_entropy_median'])} | {f(s['token_entropy_max'])} |",
        f"| entropy of the mean gate (/ log N; 0 = one head) | {f(s['usage_entropy_median'])} | {f(s['usage_entropy_max'])} |",
        f"| B heads, mean pairwise abs. cosine | {f(s['head_abs_cosine_median'])} | {f(s['head_abs_cosine_max'])} |",
        f"| B heads, mean pairwise subspace similarity | {f(s['head_subspace_median'])} | {f(s['head_subspace_max'])} |",
        "",
        f"Dead heads (usage < {report.get('dead_fraction', DEAD_HEAD_FRACTION):g}/N): {s['dead_heads']} of {s['heads']}.",
        "",
        "| layer | MI (/ log N) | usage per head | token entropy | head abs. cos | head subspace | dead |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    items = list(report["layers"].items())
    for name, st in items[:max_layers] if max_layers else items:
        usage = " ".join(f"{u:.2f}" for u in st["usage"])
        lines.append(
            f"| {name} | {f(st['mi_normalized'])} | {usage} | {f(st['token_entropy'])} | "
            f"{f(st.get('head_abs_cosine'))} | {f(st.get('head_subspace'))} | {st['dead_heads'] or '-'} |"
        )
    if max_layers and len(items) > max_layers:
        lines.append(f"| ... {len(items) - max_layers} more layers | | | | | | |")
    return "\n".join(lines) + "\n"
