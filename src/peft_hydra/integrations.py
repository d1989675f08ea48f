"""`transformers.Trainer` / TRL integration: router metrics and warnings in the Trainer's logs, through a callback.

A HydraLoRA model trains unchanged under ``transformers.Trainer``, TRL's ``SFTTrainer``, accelerate or a plain loop:
the router balance loss (``router_aux_loss_coef > 0``) joins ``outputs.loss`` inside the model's forward. What a
Trainer can add is :class:`HydraLoraCallback` (no Trainer method is replaced)::

    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=ds, callbacks=[peft_hydra.HydraLoraCallback()])
    # or, on a built trainer: peft_hydra.prepare_trainer(trainer)

1. Router statistics as Trainer metrics with every training log (and every evaluation): ``router_entropy``,
   ``router_gate_<i>`` (mean gate of head i, averaged over layers), ``router_aux_loss`` (the balance term of the last
   training forward, when the coefficient is > 0); evaluation logs get the same keys with the ``eval_`` prefix. The
   statistics are those of this process (rank 0 is the one that reports).
2. A warning (once per condition, from ``router_warnings_after_steps`` optimizer steps on) when the routers stay
   uniform or collapse onto one head, with the figures and the remedies (:func:`router_health`; thresholds
   :data:`UNIFORM_ENTROPY` and :data:`COLLAPSE_GATE`). Measure whether the routing carries information about your
   tasks with :func:`peft_hydra.routing_report` (docs/routing.md).
3. The optimizer step for ``router_aux_loss_warmup_steps`` (``model.base_model.aux_loss_step``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["router_health", "router_metrics", "unwrap_hydra_tuner"]

#: Training-time warning: the gates "stay uniform" when the per-token entropy, divided by log N, is at least this
#: (median over layers); 0.98 of log N is e.g. gates (0.26, 0.32, 0.42) on every token for N = 3.
UNIFORM_ENTROPY = 0.98
#: Training-time warning: the routing "collapses onto one head" when one head's mean gate is at least this
#: (median over layers of the largest mean gate).
COLLAPSE_GATE = 0.9


def median(values) -> float:
    """The median (the mean of the two middle values for an even count)."""
    v = sorted(values)
    mid = len(v) // 2
    return float(v[mid]) if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def router_health(
    layers: Mapping[str, Mapping[str, Any]],
    uniform_entropy: float = UNIFORM_ENTROPY,
    collapse_gate: float = COLLAPSE_GATE,
) -> dict[str, str]:
    """The training-time checks on router statistics ``{layer: {"mean_gate": [N], "entropy": nats}}`` (what
    ``HydraLoraModel.router_stats()["layers"]`` returns): ``{"uniform" | "collapse": message}`` for each condition
    that holds (median over layers), each message with the figures and the remedy."""
    if not layers:
        return {}
    stats = list(layers.values())
    n = len(stats[0]["mean_gate"])
    token_entropy = median(s["entropy"] / math.log(n) for s in stats)
    top_gate = median(max(s["mean_gate"]) for s in stats)
    found = {}
    if token_entropy >= uniform_entropy:
        found["uniform"] = (
            f"HydraLoRA routers stay uniform: the per-token gate entropy is {token_entropy:.3f} of log N (median over "
            f"{len(stats)} layers, N={n}; 1 = every token gets gates 1/N), so the {n} heads are mixed equally and "
            "cannot specialise. With the default zero-initialised heads the router gets no gradient until the heads "
            "differ (the cold start). Remedies: head_init='centered' or 'orthogonal' in HydraLoraConfig (non-zero "
            "heads, initial output still zero), router_init_std (e.g. 0.01), and a balance loss no stronger than "
            "router_aux_loss_coef=1e-3 (0.01 is reported to pin the gates to uniform), with "
            "router_aux_loss_warmup_steps. Measure specialisation with peft_hydra.routing_report (docs/routing.md)."
        )
    if top_gate >= collapse_gate:
        found["collapse"] = (
            f"HydraLoRA routers collapse onto one head: the largest mean gate is {top_gate:.3f} (median over "
            f"{len(stats)} layers, N={n}), so the other heads get almost no tokens and the adapter is one LoRA. "
            "Remedies: a load-balancing loss (router_aux_loss_coef=1e-3 in HydraLoraConfig, with "
            "router_aux_loss_warmup_steps), a smaller learning rate, or router_temperature > 1. See "
            "peft_hydra.routing_report (docs/routing.md)."
        )
    return found


def unwrap_hydra_tuner(model: torch.nn.Module):
    """The :class:`~peft_hydra.HydraLoraModel` inside ``model`` (a PeftModel, possibly wrapped by DDP / FSDP /
    DeepSpeed / ``torch.compile``); raises a ValueError when there is none."""
    from .model import HydraLoraModel

    seen = model
    for _ in range(8):
        if isinstance(seen, HydraLoraModel):
            return seen
        base = getattr(seen, "base_model", None)
        if isinstance(base, HydraLoraModel):
            return base
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            break
        seen = inner
    raise ValueError(
        f"{type(model).__name__} holds no HydraLoRA adapter: wrap the model with "
        "`peft.get_peft_model(model, peft_hydra.HydraLoraConfig(...))` before passing it to the trainer."
    )


def router_metrics(model: torch.nn.Module, prefix: str = "", reset: bool = True) -> dict[str, float]:
    """Router statistics accumulated since the last reset, as flat Trainer metrics:
    ``{prefix}router_entropy`` and ``{prefix}router_gate_<i>`` (empty when nothing was routed)."""
    tuner = unwrap_hydra_tuner(model)
    stats = tuner.router_stats()
    if reset:
        tuner.reset_router_stats()
    if stats["mean_gate"] is None:
        return {}
    metrics = {f"{prefix}router_entropy": round(float(stats["entropy"]), 6)}
    for i, g in enumerate(stats["mean_gate"]):
        metrics[f"{prefix}router_gate_{i}"] = round(float(g), 6)
    return metrics
