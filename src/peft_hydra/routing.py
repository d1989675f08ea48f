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

- with ``token_routing=True``: what the gates track besides the category, token by token
  (:func:`token_information`): ``{v}_mi`` = ``I(V; H) / log N`` for V the input token id (``token``), the next token
  id (``target``) and the position in buckets of 8 (``position``), from the soft gates as for the category. The
  plug-in estimate is biased upward when values are many and tokens per value few, so each comes with
  ``{v}_mi_shuffled``, the same estimate with the values shuffled across the tokens (mean of 8 seeded
  permutations: the bias under independence), and ``{v}_mi_excess`` = the difference, the part that is routing;
  with categories also ``{v}_mi_given_category`` = ``I(V; H | C) / log N`` with its own within-category shuffle
  baseline and excess (what the gates track beyond the category).

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
    "gate_information",
    "head_similarity",
    "layer_routing",
    "mutual_information",
    "observe_routing",
    "report_from_observation",
    "router_health",
    "routing_report",
    "summarize",
    "token_information",
    "token_variables",
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


def gate_information(gates: torch.Tensor, values: torch.Tensor) -> float:
    """``I(V; H)`` in nats between a discrete per-token variable ``values`` (T,) (token id, position bucket, category,
    ...; non-negative integers) and the soft gates ``gates`` (T, N): the plug-in estimate with ``p(h | v)`` the mean
    gate of the tokens with value v and ``p(v)`` their share, as :func:`mutual_information` for categories."""
    values = values.long().reshape(-1)
    g = gates.double().reshape(values.shape[0], -1)
    if values.numel() == 0:
        return 0.0
    uniq, inv = torch.unique(values, return_inverse=True)
    sums = torch.zeros(len(uniq), g.shape[1], dtype=torch.float64).index_add_(0, inv, g)
    counts = torch.bincount(inv, minlength=len(uniq)).double()
    return mutual_information(sums / counts[:, None], counts)


def _shuffled(values: torch.Tensor, groups: Optional[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """``values`` permuted at random across tokens (within each group when ``groups`` is given)."""
    if groups is None:
        return values[torch.randperm(values.numel(), generator=gen)]
    key = groups.double() * 2 + torch.rand(values.numel(), generator=gen, dtype=torch.float64)
    src = torch.argsort(key)  # each group's tokens, in random order, group after group
    dst = torch.argsort(groups.double(), stable=True)  # each group's tokens in order, group after group
    out = torch.empty_like(values)
    out[dst] = values[src]
    return out


#: The per-token variables of :func:`token_information`.
TOKEN_VARIABLES = ("token", "target", "position")


def token_information(gates: torch.Tensor, variables: Mapping[str, torch.Tensor], groups: Optional[torch.Tensor] = None,
                      shuffles: int = 8, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """What the gates (T, N) track token by token: for each variable (name -> (T,) non-negative ints; a value < 0
    marks a token without one, e.g. the last token has no target), ``I(V; H) / log N`` (:func:`gate_information`) as
    ``{name}_mi``, the same with the values shuffled across the tokens (mean of ``shuffles`` permutations, seeded) as
    ``{name}_mi_shuffled``, and their difference ``{name}_mi_excess``.

    The plug-in estimate is biased upward when values are many and tokens per value few (a token id seen once has
    its own mean gate): the shuffled value is that bias under independence (same values, same gates, no link), so
    only the excess over it is routing by that variable. With ``groups`` (T,) (the category of each token), also
    the information beyond the category, ``I(V; H | C) = I((C, V); H) - I(C; H)``, with its own baseline (values
    shuffled within each category): ``{name}_mi_given_category`` (``_shuffled``, ``_excess``)."""
    n = gates.shape[-1]
    log_n = math.log(n) if n > 1 else 1.0
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"estimator": "plug-in, soft gates; baseline: values shuffled across tokens", "shuffles": shuffles}
    for name, values in variables.items():
        values = values.long().reshape(-1)
        keep = values >= 0
        g, v = gates.reshape(values.shape[0], -1)[keep], values[keep]
        c = groups.long().reshape(-1)[keep] if groups is not None else None
        out[f"{name}_values"] = int(torch.unique(v).numel())

        def mi(vv, cc=None):
            if cc is None:
                return gate_information(g, vv) / log_n
            joint = cc * (int(vv.max()) + 1 if vv.numel() else 1) + vv
            return (gate_information(g, joint) - gate_information(g, cc)) / log_n

        base = [mi(_shuffled(v, None, gen)) for _ in range(shuffles)]
        out[f"{name}_mi"] = mi(v)
        out[f"{name}_mi_shuffled"] = sum(base) / len(base) if base else None
        out[f"{name}_mi_excess"] = out[f"{name}_mi"] - out[f"{name}_mi_shuffled"] if base else None
        if c is not None:
            base = [mi(_shuffled(v, c, gen), c) for _ in range(shuffles)]
            out[f"{name}_mi_given_category"] = mi(v, c)
            out[f"{name}_mi_given_category_shuffled"] = sum(base) / len(base) if base else None
            out[f"{name}_mi_given_category_excess"] = (
                out[f"{name}_mi_given_category"] - out[f"{name}_mi_given_category_shuffled"] if base else None)
    return out


def token_variables(ids: torch.Tensor, position_bucket: int = 8) -> dict[str, torch.Tensor]:
    """The per-token variables of a right- or left-padded batch of token ids (B, S), -1 (any negative) at padding,
    flattened sample-major as the layers see the batch: ``token`` (the input id), ``target`` (the next token's id;
    -1 for a sample's last token), ``position`` (index among the sample's tokens // ``position_bucket``)."""
    ids = ids.long()
    valid = ids >= 0
    target = torch.full_like(ids, -1)
    target[:, :-1] = torch.where(valid[:, 1:], ids[:, 1:], -1)
    target[~valid] = -1
    pos = (valid.long().cumsum(1) - 1) // max(1, int(position_bucket))
    pos[~valid] = -1
    return {"token": ids.reshape(-1), "target": target.reshape(-1), "position": pos.reshape(-1)}


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
    for key in ("mi_normalized", "token_entropy", "usage_entropy", "head_abs_cosine", "head_subspace",
                *(f"{v}_mi{s}" for v in TOKEN_VARIABLES for s in ("", "_shuffled", "_excess", "_given_category",
                                                                   "_given_category_excess"))):  # fmt: skip
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
    token_ids: Optional[Sequence[torch.Tensor]] = None,
    position_bucket: int = 8,
):
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
        token_ids: per batch, the (B, S) token ids in the order the layers see the batch's tokens (sample-major),
            negative at padding; ``"auto"``: from the batches' ``input_ids`` (and ``attention_mask``). Then the gates
            of every token are logged too (``enable_router_logging``) and the return value is ``(observed,
            per_token)`` with ``per_token = {layer: {"gates": (T, N), "token", "target", "position", "category":
            (T,) each}}`` over the non-padding tokens (:func:`token_variables`; ``category``: the index of the batch's
            label), for :func:`token_information`.
        position_bucket: positions are counted in buckets of this many tokens.

    Every token the layer sees is counted, padding included (the per-token figures leave padding out).
    """
    tuner = unwrap_hydra_tuner(model)
    adapter = tuner._known_adapter(adapter_name)
    batches = list(batches)
    if not batches:
        raise ValueError("observe_routing got no batches: pass a non-empty iterable of model inputs.")
    labels = list(labels) if labels is not None else [None] * len(batches)
    if len(labels) != len(batches):
        raise ValueError(f"got {len(batches)} batches but {len(labels)} labels: give one category label per batch.")
    if isinstance(token_ids, str):
        if token_ids != "auto":
            raise ValueError(f"token_ids must be None, 'auto' or one (B, S) id tensor per batch; got {token_ids!r}.")
        token_ids = [_batch_ids(b) for b in batches]
    if token_ids is not None and len(token_ids) != len(batches):
        raise ValueError(f"got {len(batches)} batches but {len(token_ids)} token_ids: give one (B, S) tensor per batch.")
    label_index = {c: i for i, c in enumerate(dict.fromkeys(labels))}
    sums: dict[str, dict[Hashable, list]] = {}  # layer -> category -> [gate sum (N), entropy sum, tokens]
    per_token: dict[str, dict[str, list]] = {}
    was_training = model.training
    logging_before, log_before = tuner._logging, list(tuner._log)
    model.eval()
    try:
        if token_ids is not None:
            tuner.enable_router_logging()
        with tuner.collect_router_stats():
            for k, (batch, label) in enumerate(zip(batches, labels)):
                tuner.reset_router_stats()
                tuner.clear_router_log()
                with tuner.observation_window():  # also when ``forward`` runs parts of the model directly
                    (forward or _forward)(model, batch)
                for name, s in tuner.router_stats(adapter)["layers"].items():
                    acc = sums.setdefault(name, {}).setdefault(label, [0.0, 0.0, 0])
                    acc[0] += torch.tensor(s["mean_gate"], dtype=torch.float64) * s["tokens"]
                    acc[1] += s["entropy"] * s["tokens"]
                    acc[2] += s["tokens"]
                if token_ids is not None:
                    _log_tokens(per_token, tuner.get_router_log(), token_ids[k], label_index[label], position_bucket,
                                set(sums))  # fmt: skip
    finally:
        model.train(was_training)
        if token_ids is not None:
            tuner.clear_router_log()
            tuner._log.extend(log_before)
            if not logging_before:
                tuner.disable_router_logging()
    observed = {
        name: {c: {"mean_gate": (v[0] / v[2]).tolist(), "entropy": v[1] / v[2], "tokens": v[2]} for c, v in cats.items()}
        for name, cats in sums.items()
    }
    if token_ids is None:
        return observed
    return observed, {name: {k: torch.cat(v) for k, v in d.items()} for name, d in per_token.items()}


def _batch_ids(batch) -> torch.Tensor:
    """(B, S) token ids of a batch (a dict with ``input_ids`` and maybe ``attention_mask``, or an id tensor), -1 at
    padding."""
    ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
    ids = torch.as_tensor(ids).long().cpu()
    ids = ids[None] if ids.dim() == 1 else ids
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return ids if mask is None else torch.where(torch.as_tensor(mask).cpu().bool(), ids, -1)


def _log_tokens(per_token: dict, log: list, ids: torch.Tensor, label: int, position_bucket: int, layers: set) -> None:
    """Append one batch's logged gates (the layers of the report only) and per-token variables to ``per_token``."""
    ids = torch.as_tensor(ids).long().cpu()
    variables = token_variables(ids, position_bucket)
    keep = variables["token"] >= 0
    b, t = ids.shape
    for entry in log:
        for name, gates in entry.items():
            if name not in layers:
                continue
            g = gates.detach().float().cpu()
            if g.shape[0] == b and t != 1:  # one gate per sample (a sequence-level router): every token of the sample
                g = g.repeat_interleave(t, 0)
            if g.shape[0] != b * t:
                raise ValueError(
                    f"Layer {name} routed {g.shape[0]} tokens but the batch's token_ids are {tuple(ids.shape)} = {b * t}: "
                    "give token_ids in the order and padding the layers see (B, S, sample-major)."
                )
            d = per_token.setdefault(name, {k: [] for k in ("gates", *TOKEN_VARIABLES, "category")})
            d["gates"].append(g[keep])
            for k in TOKEN_VARIABLES:
                d[k].append(variables[k][keep])
            d["category"].append(torch.full((int(keep.sum()),), label, dtype=torch.long))


def layer_heads(layer, adapter: str) -> torch.Tensor:
    """The B heads of ``adapter`` on a HydraLoRA layer as (out, N, r)."""
    return layer.hydra_B[adapter].weight.unflatten(1, (layer.num_experts[adapter], -1))


def report_from_observation(
    model, observed: Mapping[str, Mapping[Hashable, Mapping[str, Any]]], adapter_name: Optional[str] = None,
    labelled: bool = True, dead_fraction: float = DEAD_HEAD_FRACTION,
    per_token: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None, shuffles: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """The routing report (see :func:`routing_report`) from what :func:`observe_routing` returned (with
    ``per_token``, its per-token part: the token / target / position figures of :func:`token_information`)."""
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
    for name, d in (per_token or {}).items():
        if name in layers:
            layers[name].update(token_information(d["gates"], {k: d[k] for k in TOKEN_VARIABLES},
                                                   groups=d["category"] if labelled else None, shuffles=shuffles))
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
    token_routing: bool = False,
    shuffles: int = 8,
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
        token_routing: also what the gates track token by token (:func:`token_information`: the input token id, the
            target token id, the position in buckets of 8; each against its shuffled baseline, and beyond the
            category when labelled); the token ids come from the batches (padding from ``attention_mask``).
        shuffles: the permutations of the shuffled baseline.

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
    observed = observe_routing(model, batches, labels, adapter_name, token_ids="auto" if token_routing else None)
    observed, per_token = observed if token_routing else (observed, None)
    return report_from_observation(model, observed, adapter_name, labelled=labels is not None,
                                   dead_fraction=dead_fraction, per_token=per_token, shuffles=shuffles)  # fmt: skip


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
        *(f"| MI {v}/head (/ log N): plug-in - shuffled = excess | {f(s.get(f'{v}_mi_median'))} - "
          f"{f(s.get(f'{v}_mi_shuffled_median'))} = {f(s.get(f'{v}_mi_excess_median'))} | "
          f"{f(s.get(f'{v}_mi_excess_max'))} |" for v in TOKEN_VARIABLES if s.get(f"{v}_mi_median") is not None),
        *(f"| MI {v}/head beyond the category, excess over shuffled (/ log N) | "
          f"{f(s.get(f'{v}_mi_given_category_excess_median'))} | {f(s.get(f'{v}_mi_given_category_excess_max'))} |"
          for v in TOKEN_VARIABLES if s.get(f"{v}_mi_given_category_excess_median") is not None),
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
