"""`transformers.Trainer` / TRL integration: the balance loss and router metrics in one line.

A HydraLoRA model trains unchanged under ``transformers.Trainer`` and TRL's ``SFTTrainer``. Two things need the
trainer's cooperation, and :func:`prepare_trainer` adds both::

    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=ds)   # or transformers.Trainer
    peft_hydra.prepare_trainer(trainer)                                     # the one line
    trainer.train()

1. The auxiliary load-balancing loss (``router_aux_loss_coef > 0``) is added to the loss of every training step,
   scaled the way the Trainer scales its own loss (gradient accumulation, token-averaging across processes), so
   that its gradient is ``coef * mean(balance loss)`` over the micro-batches and processes.
2. Router statistics are logged as Trainer metrics with every training log (and every evaluation):
   ``router_entropy``, ``router_gate_<i>`` (mean gate of head i, averaged over layers), ``router_aux_loss``
   (the mean balance loss term over the logging window, when the coefficient is > 0); evaluation logs get the same
   keys with the ``eval_`` prefix. The statistics are those of this process (rank 0 is the one that reports).
3. With those statistics, a warning (once per condition and trainer, from ``router_warnings_after_steps`` optimizer
   steps on) when the routers stay uniform or collapse onto one head, with the figures and the remedies
   (:func:`router_health`; thresholds :data:`UNIFORM_ENTROPY` and :data:`COLLAPSE_GATE`). Measure whether the
   routing carries information about your tasks with :func:`peft_hydra.routing_report` (docs/routing.md).

If you subclass the Trainer yourself, :func:`hydra_compute_loss` is the same loss as a helper for your
``compute_loss``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Mapping

import torch

__all__ = ["prepare_trainer", "hydra_compute_loss", "router_health", "router_metrics", "unwrap_hydra_tuner"]

_PATCHED = "_peft_hydra_prepared"

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


def _loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Mirror of the rule in ``Trainer.training_step``: True when the Trainer will NOT divide the loss by the
    number of gradient-accumulation steps (it was normalised over the whole accumulated batch instead)."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    return bool(
        (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        or getattr(trainer, "compute_loss_func", None) is not None
    )


def hydra_compute_loss(trainer, model, inputs, return_outputs: bool = False, num_items_in_batch=None, *, compute_loss=None):
    """``trainer.compute_loss`` plus ``coef * balance loss`` of the same forward (training only).

    ``compute_loss`` is the original loss function (default: ``type(trainer).compute_loss`` bound to ``trainer``).
    The term is divided by the gradient-accumulation steps when the Trainer will not do it itself, so that
    accumulated micro-batches contribute their mean; it is not multiplied by the number of processes (DDP averages
    the gradients of the per-process terms, which is the mean over processes).
    """
    if compute_loss is None:
        compute_loss = functools.partial(type(trainer).compute_loss, trainer)
    # return_outputs is passed through: TRL's SFTTrainer runs an extra no-grad forward for it, which would replace the
    # router outputs that the balance loss is computed from.
    result = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    loss, outputs = result if return_outputs else (result, None)
    tuner = unwrap_hydra_tuner(model)
    coef = tuner.peft_config[tuner.active_adapters[0]].router_aux_loss_coef
    if coef > 0 and model.training and torch.is_grad_enabled():
        state = getattr(trainer, "state", None)
        aux = tuner.hydra_aux_loss(step=getattr(state, "global_step", None))  # optimizer steps done: the warm-up
        if aux.requires_grad:
            state = trainer.__dict__.setdefault("_peft_hydra_aux", [])
            state.append(aux.detach())
            if _loss_is_scaled_for_ga(trainer, num_items_in_batch):
                aux = aux / max(int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1), 1)
            loss = loss + aux.to(loss.dtype)
    return (loss, outputs) if return_outputs else loss


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


def prepare_trainer(
    trainer,
    *,
    aux_loss: bool = True,
    log_router_stats: bool = True,
    router_warnings: bool = True,
    router_warnings_after_steps: int = 50,
):
    """Make ``trainer`` (a ``transformers.Trainer`` or a subclass such as TRL's ``SFTTrainer``) HydraLoRA-aware.

    Adds the router balance loss to the training loss (``aux_loss``, only matters with ``router_aux_loss_coef > 0``;
    its warm-up follows ``trainer.state.global_step``), logs router statistics as Trainer metrics
    (``log_router_stats``) and warns once per condition when the routers stay uniform or collapse onto one head,
    judged on the statistics of each training log window from ``router_warnings_after_steps`` optimizer steps on
    (``router_warnings``). It wraps ``trainer.compute_loss`` and ``trainer.log`` on this instance only; calling it
    twice is an error. Returns ``trainer``.
    """
    if isinstance(router_warnings_after_steps, bool) or not isinstance(router_warnings_after_steps, int) or (
        router_warnings_after_steps < 0
    ):
        raise ValueError(f"router_warnings_after_steps must be an integer >= 0, got {router_warnings_after_steps!r}.")
    if not (hasattr(trainer, "compute_loss") and hasattr(trainer, "log") and hasattr(trainer, "model")):
        raise TypeError(f"prepare_trainer expects a transformers.Trainer, got {type(trainer).__name__}.")
    if getattr(trainer, _PATCHED, False):
        raise ValueError("prepare_trainer was already called on this trainer.")
    tuner = unwrap_hydra_tuner(trainer.model)
    tuner.reset_router_stats()

    if aux_loss:
        original_compute_loss = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            call = functools.partial(original_compute_loss, **kwargs) if kwargs else original_compute_loss
            return hydra_compute_loss(
                trainer, model, inputs, return_outputs, num_items_in_batch, compute_loss=call
            )

        trainer.compute_loss = compute_loss

    if log_router_stats or router_warnings:
        original_log = trainer.log
        warned: set[str] = set()

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            is_eval = any(k.startswith("eval_") for k in logs)
            is_train = "loss" in logs
            if router_warnings and is_train:
                step = int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0)
                if step >= router_warnings_after_steps:
                    found = router_health(unwrap_hydra_tuner(trainer.model).router_stats()["layers"])
                    for condition, message in found.items():
                        if condition not in warned:
                            warned.add(condition)
                            warnings.warn(f"{message} (training step {step})", UserWarning, stacklevel=2)
            if is_eval or is_train:
                prefix = "eval_" if is_eval else ""
                metrics = router_metrics(trainer.model, prefix=prefix)  # reads and resets the statistics
                if log_router_stats:
                    logs.update(metrics)
                aux = trainer.__dict__.pop("_peft_hydra_aux", None)
                if log_router_stats and is_train and aux:
                    logs["router_aux_loss"] = round(float(torch.stack(aux).float().mean()), 6)
            return original_log(logs, *args, **kwargs)

        trainer.log = log
    setattr(trainer, _PATCHED, True)
    return trainer
