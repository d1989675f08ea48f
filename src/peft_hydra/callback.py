"""`HydraLoraCallback` and `prepare_trainer`: router metrics and warnings in a ``transformers.Trainer``'s logs (see
``peft_hydra.integrations``). A module of its own because it subclasses ``transformers.TrainerCallback``, whose import
pulls in the Trainer's modules: ``import peft_hydra`` loads it only when the name is used."""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from .integrations import router_health, router_metrics, unwrap_hydra_tuner

__all__ = ["HydraLoraCallback", "prepare_trainer"]


class HydraLoraCallback(TrainerCallback):
    """Router metrics and warnings in a Trainer's logs, and the step of the balance loss's warm-up (see the module
    docstring). ``log_router_stats``: add the metrics to the logs; ``router_warnings``: warn on uniform or collapsed
    routing from ``router_warnings_after_steps`` optimizer steps on."""

    def __init__(self, *, log_router_stats: bool = True, router_warnings: bool = True,
                 router_warnings_after_steps: int = 50) -> None:  # fmt: skip
        steps = router_warnings_after_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"router_warnings_after_steps must be an integer >= 0, got {steps!r}.")
        self.log_router_stats, self.router_warnings, self.after_steps = log_router_stats, router_warnings, steps
        self.warned: set[str] = set()
        self.tuner = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tuner = unwrap_hydra_tuner(model)
        self.tuner._sync_hooks()  # a router_aux_loss_coef changed in the config since the model was built
        self.tuner.aux_loss_step = state.global_step
        if self.log_router_stats or self.router_warnings:
            self.tuner.reset_router_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.tuner is not None:
            self.tuner.aux_loss_step = state.global_step  # optimizer steps done: the balance loss's warm-up

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.tuner is None and model is not None:  # evaluate() without train()
            self.tuner = unwrap_hydra_tuner(model)
            self.tuner.reset_router_stats()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tuner is None or logs is None:
            return
        is_train, is_eval = "loss" in logs, any(k.startswith("eval_") for k in logs)
        if not (is_train or is_eval):
            return
        if self.router_warnings and is_train and state.global_step >= self.after_steps:
            for condition, message in router_health(self.tuner.router_stats()["layers"]).items():
                if condition not in self.warned:
                    self.warned.add(condition)
                    warnings.warn(f"{message} (training step {state.global_step})", UserWarning, stacklevel=2)
        metrics = router_metrics(self.tuner, prefix="eval_" if is_eval else "")  # reads and resets the statistics
        if is_train and self.tuner.last_aux_loss is not None:
            metrics["router_aux_loss"] = round(float(self.tuner.last_aux_loss), 6)
        if self.log_router_stats and metrics:
            logs.update(metrics)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(metrics)  # the Trainer appended its copy of the logs before on_log


def prepare_trainer(trainer, *, log_router_stats: bool = True, router_warnings: bool = True,
                    router_warnings_after_steps: int = 50):  # fmt: skip
    """Add a :class:`~peft_hydra.HydraLoraCallback` to ``trainer`` (a ``transformers.Trainer`` or a subclass such as TRL's
    ``SFTTrainer``) and return it. The callback goes first in the trainer's callback list, so that the loggers and
    progress printers that follow see the router metrics. The balance loss needs nothing here: the model's forward
    adds it to the loss. Calling it twice is an error."""
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not hasattr(trainer, "model"):
        raise TypeError(f"prepare_trainer expects a transformers.Trainer, got {type(trainer).__name__}.")
    if any(isinstance(cb, HydraLoraCallback) for cb in handler.callbacks):
        raise ValueError("prepare_trainer was already called on this trainer (it has a HydraLoraCallback).")
    unwrap_hydra_tuner(trainer.model)  # a clear error now, not at train()
    handler.callbacks.insert(0, HydraLoraCallback(log_router_stats=log_router_stats, router_warnings=router_warnings,
                                                  router_warnings_after_steps=router_warnings_after_steps))  # fmt: skip
    return trainer
