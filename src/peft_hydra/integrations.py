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

If you subclass the Trainer yourself, :func:`hydra_compute_loss` is the same loss as a helper for your
``compute_loss``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["prepare_trainer", "hydra_compute_loss", "router_metrics", "unwrap_hydra_tuner"]

_PATCHED = "_peft_hydra_prepared"


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


def prepare_trainer(trainer, *, aux_loss: bool = True, log_router_stats: bool = True):
    """Make ``trainer`` (a ``transformers.Trainer`` or a subclass such as TRL's ``SFTTrainer``) HydraLoRA-aware.

    Adds the router balance loss to the training loss (``aux_loss``, only matters with ``router_aux_loss_coef > 0``)
    and logs router statistics as Trainer metrics (``log_router_stats``). It wraps ``trainer.compute_loss`` and
    ``trainer.log`` on this instance only; calling it twice is an error. Returns ``trainer``.
    """
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

    if log_router_stats:
        original_log = trainer.log

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            is_eval = any(k.startswith("eval_") for k in logs)
            is_train = "loss" in logs
            if is_eval or is_train:
                prefix = "eval_" if is_eval else ""
                logs.update(router_metrics(trainer.model, prefix=prefix))
                aux = trainer.__dict__.pop("_peft_hydra_aux", None)
                if is_train and aux:
                    logs["router_aux_loss"] = round(float(torch.stack(aux).float().mean()), 6)
            return original_log(logs, *args, **kwargs)

        trainer.log = log
    setattr(trainer, _PATCHED, True)
    return trainer
