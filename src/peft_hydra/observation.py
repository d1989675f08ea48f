"""The routers of a HydraLoRA model, observed on request: statistics, a log, the balance loss.

The layers keep no statistics. Whoever wants to see the routing asks the model, which then registers forward hooks on
the routers (and removes them when nobody asks any more):

- router statistics (mean gate per head, gate entropy, tokens; summed on the device): ``reset_router_stats``,
  ``stop_router_stats``, ``collect_router_stats``, ``router_stats``;
- a log of every forward's gates, as X-LoRA's scalings log: ``enable_router_logging``, ``get_router_log``,
  ``clear_router_log``, ``disable_router_logging``;
- the Switch load-balancing loss (``router_aux_loss_coef > 0``): in training the model's forward adds
  ``coef * balance loss`` to ``outputs.loss`` when the model computed one (labels given), as transformers' Mixtral
  adds its router loss, so it works in every training loop; ``hydra_aux_loss`` returns it for loops that compute
  their own loss.

A hook records only inside the wrapped model's forward (``generate()`` included; ``observation_window`` for code
that runs parts of the model directly): a gradient-checkpointing recompute inside ``backward()`` runs outside it and
is not counted twice.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch

from . import functional as HF

REENTRANT_CHECKPOINTING = (
    "The HydraLoRA router balance loss (router_aux_loss_coef={coef}) has no gradient in this forward: the routers ran "
    "without autograd, which is what reentrant gradient checkpointing does (use_reentrant=True; the default of some "
    "frameworks), so the loss would not train the routers. Use non-reentrant checkpointing: "
    'model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}}) or '
    'TrainingArguments(gradient_checkpointing_kwargs={{"use_reentrant": False}}).'
)



class RouterObservation:
    """The router-observation part of ``HydraLoraModel`` (a mixin of the tuner: ``self.model``, ``peft_config``,
    ``active_adapters``, ``_hydra_layers`` and ``_known_adapter`` come from it)."""

    def _init_observation(self) -> None:
        self._hooks: list = []
        self._loss_adapters: set[str] = set()  # adapters whose routers are hooked for the balance loss
        self._stats: Optional[dict] = None  # (adapter, layer) -> [gate and entropy sums (2N,), tokens (1,)]
        self._stats_on = False
        self._logging = False
        self._log: list[dict] = []  # per forward: {layer: gates (T, N)}
        self._losses: Optional[list] = None  # this forward's (adapter, top_k, probs, gates) for the balance loss
        self._in_forward = 0
        self._warned_reentrant = False
        self._aux_pending = False  # a training forward without a loss left a balance term nobody read yet
        self._warned_unused = False
        self.aux_loss_step: Optional[int] = None  # optimizer steps done: for router_aux_loss_warmup_steps
        self.last_aux_loss: Optional[torch.Tensor] = None  # the balance term of the last training forward (detached)

    def _sync_hooks(self) -> None:
        """Hooks on the learned routers while anything observes them; none otherwise."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._loss_adapters = {name for name, c in self.peft_config.items() if c.router_aux_loss_coef > 0}
        if not (self._stats_on or self._logging or self._loss_adapters):
            return
        for name, layer in self._hydra_layers():
            for adapter, router in layer.hydra_router.items():
                if router.learned:  # partial, not a closure: a deep copy of the model gets hooks on the copy
                    self._hooks.append(router.register_forward_hook(partial(_router_hook, self, name, adapter)))
        # the window in which the routers are observed: the wrapped model's forward (PeftModel without a task type and
        # generate() call it directly); a gradient-checkpointing recompute inside backward() runs outside it
        model = self.model
        self._hooks.append(model.register_forward_pre_hook(partial(_enter_hook, self), with_kwargs=True))
        self._hooks.append(model.register_forward_hook(partial(_exit_hook, self), with_kwargs=True, always_call=True))

    def _observe(self, layer_name: str, adapter: str, router, x: torch.Tensor, gates: torch.Tensor) -> None:
        probs = None
        balance = self.peft_config[adapter].router_aux_loss_coef > 0 and router.training
        if balance and torch.is_grad_enabled():
            # also in a gradient-checkpointing recompute: it must save the same tensors for backward as the forward
            probs = router.probs(x, gates)
        if balance and self._in_forward and self._losses is not None:
            # (without grad here: reentrant checkpointing, which hydra_aux_loss warns about)
            probs = router.probs(x, gates) if probs is None else probs
            self._losses.append((adapter, router.top_k, probs, gates))
        if not self._in_forward or not (self._stats_on or self._logging):
            return  # outside the model's forward: a recompute inside backward(), seen already
        with torch.no_grad():
            g = gates.detach().reshape(-1, gates.shape[-1])
            if self._logging and self._log:
                self._log[-1][layer_name] = g
            if self._stats_on:
                p = (probs if probs is not None else router.probs(x, gates)).detach().reshape(g.shape)
                dtype = torch.float32 if g.device.type == "mps" else torch.float64  # exact token sums; MPS has none
                sums = torch.cat([g, torch.special.entr(p)], -1).sum(0, dtype=dtype)  # on the device, no host sync
                acc = self._stats.setdefault((adapter, layer_name), [0, 0])
                acc[0], acc[1] = sums + acc[0], acc[1] + g.shape[0]

    @contextmanager
    def observation_window(self):
        """Observe the routers in code that runs parts of the model directly (the model's forward, ``generate()``
        included, opens this window itself; outside it nothing is recorded)."""
        self._enter({})
        try:
            yield
        finally:
            self._exit({}, None)

    def enable_router_logging(self) -> None:
        """Keep every forward's gates, ``{layer_name: (tokens, N)}`` per forward (read with :meth:`get_router_log`)."""
        self._logging = True
        self._sync_hooks()

    def disable_router_logging(self) -> None:
        """Stop logging (what was logged stays readable until :meth:`clear_router_log`)."""
        self._logging = False
        self._sync_hooks()

    def get_router_log(self) -> list[dict[str, torch.Tensor]]:
        """The gates (detached) of every forward since logging was enabled, one ``{layer_name: gates}`` per forward."""
        return [entry for entry in self._log if entry]

    def clear_router_log(self) -> None:
        self._log = []

    def reset_router_stats(self) -> None:
        """Clear the router statistics and start collecting (off by default: a forward then does no statistics work)."""
        self._stats, self._stats_on = {}, True
        self._sync_hooks()

    def stop_router_stats(self) -> None:
        """Stop collecting; what was collected stays readable with :meth:`router_stats`."""
        self._stats_on = False
        self._sync_hooks()

    @property
    def router_stats_enabled(self) -> bool:
        return self._stats_on

    @contextmanager
    def collect_router_stats(self):
        """Collect router statistics from scratch inside the block (read :meth:`router_stats` there), then restore the
        previous collection state and statistics."""
        saved = (self._stats, self._stats_on)
        self.reset_router_stats()
        try:
            yield self
        finally:
            self._stats, self._stats_on = saved
            self._sync_hooks()

    def router_stats(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """``{"layers": {name: {"mean_gate": [N], "entropy": nats, "tokens": int}}, "mean_gate": [N] (mean over
        layers), "entropy": float}`` since the last :meth:`reset_router_stats`; empty layers and None when nothing was
        collected. Reading syncs with the device once per layer."""
        adapter_name = self._known_adapter(adapter_name)
        layers = {}
        for (adapter, name), (sums, tokens) in (self._stats or {}).items():
            if adapter == adapter_name and tokens:
                mean = (sums / tokens).tolist()
                n = len(mean) // 2
                layers[name] = {"mean_gate": mean[:n], "entropy": float(sum(mean[n:])), "tokens": int(tokens)}
        if not layers:
            return {"layers": {}, "mean_gate": None, "entropy": None}
        mean_gate = torch.tensor([s["mean_gate"] for s in layers.values()]).mean(0).tolist()
        return {"layers": layers, "mean_gate": mean_gate, "entropy": sum(s["entropy"] for s in layers.values()) / len(layers)}

    # ----------------------------------------------------------------------------------- balance loss
    def _enter(self, kwargs: dict) -> None:
        """Before the wrapped model's forward (every path: PeftModel, PeftModelForCausalLM, generate())."""
        if not self._in_forward:
            if self._logging:
                self._log.append({})
            coef_on = any(self.peft_config[a].router_aux_loss_coef > 0 for a in self.active_adapters
                          if a in self.peft_config)  # fmt: skip
            self._losses = [] if coef_on and self.training and torch.is_grad_enabled() else None
            if self._losses is not None and self._aux_pending and not self._warned_unused:
                self._warned_unused = True
                warnings.warn(
                    "The HydraLoRA router balance loss (router_aux_loss_coef > 0) was not used in the last training "
                    "forward: the model computed no loss (no labels), and model.base_model.hydra_aux_loss() was not "
                    "called before this forward. Pass labels so that it joins outputs.loss, or add "
                    "model.base_model.hydra_aux_loss(step=optimizer_steps_done) to the loss you compute.",
                    UserWarning,
                )
        self._in_forward += 1

    def _exit(self, kwargs: dict, outputs: Any) -> Any:
        """After it: the balance loss joins ``outputs.loss`` when the model computed one (training with labels)."""
        self._in_forward = max(self._in_forward - 1, 0)
        if self._in_forward or self._losses is None:
            return None
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if loss is None:  # no labels: the loop computes its own loss, and should add hydra_aux_loss(step=...)
            self._aux_pending = True
            return None
        aux = self.hydra_aux_loss(step=self.aux_loss_step)
        self.last_aux_loss = aux.detach()
        if not aux.requires_grad:
            return None
        share = 1.0
        labels, num_items = kwargs.get("labels"), kwargs.get("num_items_in_batch")
        if num_items is not None and isinstance(labels, torch.Tensor):
            # the LM loss is summed over this micro-batch's label tokens and divided by the whole accumulated batch's
            # (the Trainer then does not divide by the accumulation steps): the balance term gets the same share
            counted = kwargs.get("shift_labels")
            counted = labels[..., 1:] if counted is None else counted
            share = counted.ne(-100).sum().to(aux.dtype) / torch.as_tensor(num_items, device=aux.device)
        outputs["loss"] = loss + (aux * share).to(loss.dtype)
        log_probs, label_mask = outputs.get("log_probs"), outputs.get("label_mask")
        if log_probs is not None and label_mask is not None:
            # TRL's fused LM head (SFTTrainer): the trainer sums -log_probs over the label tokens itself and never reads
            # outputs.loss; the balance term per label token gives its sum the same share as the loss above
            outputs["log_probs"] = log_probs - aux.to(log_probs.dtype) * label_mask
        return outputs

    def hydra_aux_loss(self, adapter_name: Optional[str] = None, step: Optional[int] = None) -> torch.Tensor:
        """``router_aux_loss_coef`` x the mean Switch balance loss over the routed layers of the last training forward
        (a 0-dim tensor; 0 when the coefficient is 0 or nothing was routed). The model's forward already adds it to
        ``outputs.loss`` when the model computes a loss: call this only in a loop that computes its own loss.
        ``step`` (optimizer steps done) drives ``router_aux_loss_warmup_steps``."""
        adapter_name = self._known_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        self._aux_pending = False
        if config.router_aux_loss_coef > 0 and adapter_name not in self._loss_adapters:
            raise ValueError(
                f"router_aux_loss_coef of adapter '{adapter_name}' was set to {config.router_aux_loss_coef} after the "
                "adapter was created, so its routers are not observed for the balance loss. Set router_aux_loss_coef "
                "in the HydraLoraConfig passed to get_peft_model (a HydraLoraCallback also picks it up at train())."
            )
        if config.router_aux_loss_coef > 0 and self._losses is None and self.training and torch.is_grad_enabled():
            raise ValueError(
                "hydra_aux_loss() found no training forward of the model to take the routers' outputs from. The "
                "routers are observed inside the forward of the wrapped model; code that runs parts of it directly "
                "(e.g. decoder layers) must open that window itself: `with model.base_model.observation_window(): ...`."
            )
        coef = HF.aux_loss_warmup_coef(config.router_aux_loss_coef, step, config.router_aux_loss_warmup_steps)
        outs = [(k, p, g) for a, k, p, g in self._losses or () if a == adapter_name]
        if coef == 0 or not outs:
            return torch.zeros((), device=next((p.device for p in self.parameters()), None))
        if not any(p.requires_grad for _, p, _ in outs) and self.training and not self._warned_reentrant:
            if any(p.requires_grad for n, p in self.named_parameters() if ".hydra_A." in n):
                self._warned_reentrant = True
                warnings.warn(REENTRANT_CHECKPOINTING.format(coef=config.router_aux_loss_coef), UserWarning)
        groups: dict[tuple, list] = {}  # the layers' losses in a handful of batched kernels per shape
        for top_k, probs, gates in outs:
            n = probs.shape[-1]
            groups.setdefault((probs.numel(), top_k, probs.device), []).append((probs.reshape(-1, n), gates.reshape(-1, n)))
        losses = [
            HF.load_balancing_loss(torch.stack([p for p, _ in group]), torch.stack([g for _, g in group]), key[1]).float()
            for key, group in groups.items()
        ]
        return coef * torch.cat(losses).mean()



def _router_hook(tuner: RouterObservation, layer_name: str, adapter: str, router, args, gates) -> None:
    tuner._observe(layer_name, adapter, router, args[0], gates)


def _enter_hook(tuner: RouterObservation, module, args, kwargs) -> None:
    tuner._enter(kwargs)


def _exit_hook(tuner: RouterObservation, module, args, kwargs, outputs):
    return tuner._exit(kwargs, outputs)

