"""`HydraLoraModel`: HydraLoRA as a PEFT ``BaseTuner``."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from . import _compat
from ._compat import BaseTuner, BaseTunerLayer, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_pattern_key
from .config import (
    LLAMA_LIKE_MODEL_TYPES,
    LLAMA_LIKE_TARGET_MODULES,
    PREFIX,
    GatesArg,
    HydraLoraConfig,
    check_gate_layers,
    no_exact_merge_message,
)
from . import functional as HF
from . import hub
from .layer import HydraLoraLayer, Linear

TARGET_MODULE_MAPPING = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    **{model_type: list(LLAMA_LIKE_TARGET_MODULES) for model_type in LLAMA_LIKE_MODEL_TYPES},
}


class HydraLoraModel(BaseTuner):
    """Wraps a model with HydraLoRA layers. Use it through PEFT::

        import peft_hydra
        from peft import get_peft_model
        model = get_peft_model(base, peft_hydra.HydraLoraConfig(r=8, lora_alpha=16, num_experts=3))

    Beyond PEFT's tuner API it offers :meth:`hydra_aux_loss` (the load-balancing loss of the last forward),
    :meth:`router_stats` / :meth:`reset_router_stats` (mean gate per head and entropy per layer), and
    ``merge_and_unload(gates=...)`` / ``merge_adapter(gates=...)`` for merging with fixed gates.
    """

    prefix: str = PREFIX
    tuner_layer_cls = HydraLoraLayer
    target_module_mapping = TARGET_MODULE_MAPPING

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        # The Hub card: tags through transformers' add_model_tags (read by PEFT's card writer); the usage snippet
        # and a card-keeping push_to_hub on the PeftModel that wraps this tuner only (see peft_hydra.hub).
        hub.tag_model(self.model)
        hub.attach_to_peft_model(self)

    def _create_and_replace(
        self,
        config: HydraLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        r_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        r = config.rank_pattern.get(r_key, config.r)
        alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
        if isinstance(target, HydraLoraLayer):
            target.update_layer(adapter_name, r, alpha, config, layer_name=current_key)
            return
        new_module = self._create_new_module(config, adapter_name, target, r=r, lora_alpha=alpha, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: HydraLoraConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        from .bnb import dispatch_bnb, refuse_unsupported_quantized

        new_module = dispatch_bnb(target, adapter_name, config, **kwargs)  # bitsandbytes 8-bit / 4-bit (QLoRA)
        if new_module is not None:
            return new_module
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        refuse_unsupported_quantized(base)  # any other quantized layer: a TypeError naming it and the fix
        if isinstance(base, nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True but the target is nn.Linear: setting fan_in_fan_out=False.")
                config.fan_in_fan_out = False
            return Linear(target, adapter_name, config, fan_in_fan_out=False, **kwargs)
        if isinstance(base, Conv1D):
            if not config.fan_in_fan_out:
                warnings.warn("The target is a transformers Conv1D (GPT-2 style): setting fan_in_fan_out=True.")
                config.fan_in_fan_out = True
            return Linear(target, adapter_name, config, fan_in_fan_out=True, **kwargs)
        raise TypeError(
            f"HydraLoRA cannot adapt module {type(base).__name__}: supported are torch.nn.Linear and "
            "transformers.pytorch_utils.Conv1D. Remove it from target_modules (or use exclude_modules)."
        )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        layers = [n for n, m in model.named_modules() if isinstance(m, HydraLoraLayer) and adapter_name in m.hydra_A]
        check_gate_layers(self.peft_config[adapter_name].fixed_gates, layers, "HydraLoraConfig.fixed_gates")

    def _check_new_adapter_config(self, config: HydraLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        config.validate()

    # ------------------------------------------------------------------------------- mixed adapter batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode: call model.eval().")
        known = set(self.peft_config) | {"__base__"}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(f"Unknown adapter name(s) {unknown} in `adapter_names`; known: {sorted(known)}.")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]

        def pre_hook(module, args, kw):
            kw["adapter_names"] = adapter_names
            return args, kw

        handles = [
            m.register_forward_pre_hook(pre_hook, with_kwargs=True)
            for m in self.modules()
            if isinstance(m, HydraLoraLayer)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------------------------------ merging
    def merge_adapter(
        self,
        adapter_names: Optional[list[str]] = None,
        safe_merge: bool = False,
        gates: GatesArg = None,
    ) -> None:
        """Merge into the base weights. ``gates`` (``"uniform"``, N numbers, or ``{layer_name: N numbers}`` as
        :func:`peft_hydra.measure_mean_gates` returns) is needed when the adapter has a learned router; it merges
        ``sum_i g_i B_i A``, the model with those gates fixed. Without ``gates`` only N = 1 / fixed-gate adapters
        merge (exactly)."""
        self._check_merge_allowed()
        if gates is None:
            self._check_exact_merge(adapter_names)
        check_gate_layers(gates, [name for name, _ in self._hydra_layers()])
        for name, module in self._hydra_layers():
            module.merge(safe_merge=safe_merge, adapter_names=adapter_names, gates=gates, layer_name=name)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        gates: GatesArg = None,
    ) -> nn.Module:
        """Merge and return the base model. Exact for N = 1 or fixed gates; with a learned router, ``gates``
        (``"uniform"``, N numbers, or the per-layer mean gates of :func:`peft_hydra.measure_mean_gates`) must be
        given and the result is the model with those gates fixed, an approximation of the routed model."""
        if gates is None:
            self._check_exact_merge(adapter_names)
            return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge, gates=gates)
        return self.unload()

    def _check_exact_merge(self, adapter_names: Optional[list[str]]) -> None:
        for name in adapter_names or self.active_adapters:
            config = self.peft_config[name]
            if config.has_router:
                raise ValueError(no_exact_merge_message(name, config.num_experts))

    # ------------------------------------------------------------------------------ router loss and stats
    def _known_adapter(self, adapter_name: Optional[str]) -> str:
        if adapter_name is None:
            return self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter '{adapter_name}'; this model has {sorted(self.peft_config)}.")
        return adapter_name

    def _hydra_layers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, HydraLoraLayer)]

    def hydra_aux_loss(self, adapter_name: Optional[str] = None, step: Optional[int] = None) -> torch.Tensor:
        """``router_aux_loss_coef`` x the mean Switch balance loss over the routed layers, from the last forward.

        Returns a 0-dim tensor (0 when the coefficient is 0 or nothing was routed). Add it to the task loss before
        ``backward()``; ``peft_hydra.integrations`` does it for ``transformers.Trainer``. With gradient
        checkpointing use ``use_reentrant=False`` (transformers' default): the reentrant variant runs the forward
        without grad, so the loss would carry no gradient to the routers.

        ``step``: the number of optimizer steps done so far; needed (and only used) with
        ``router_aux_loss_warmup_steps`` > 0, which ramps the coefficient linearly from 0 at step 0 to its full
        value at that step (``functional.aux_loss_warmup_coef``).
        """
        adapter_name = self._known_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        coef = config.router_aux_loss_coef
        layers = [m for _, m in self._hydra_layers() if adapter_name in m.hydra_router]
        if coef > 0 and any(not m._keep_router_out.get(adapter_name, False) for m in layers):
            raise ValueError(
                f"router_aux_loss_coef of adapter '{adapter_name}' was set to {coef} after the adapter was created: "
                "its layers do not keep the router outputs the balance loss needs. Set router_aux_loss_coef in the "
                "HydraLoraConfig passed to get_peft_model."
            )
        coef = HF.aux_loss_warmup_coef(coef, step, config.router_aux_loss_warmup_steps)
        # the layers' router outputs grouped by shape, each group's losses computed in one batch (same values as
        # the per-layer HydraLoraLayer.aux_loss, a handful of kernels per group instead of per layer)
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for m in layers:
            out = m._router_out.get(adapter_name)
            if out is not None:
                groups.setdefault((out[0].shape, out[0].device, m.top_k[adapter_name]), []).append(out)
        if coef == 0 or not groups:
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        losses = []
        for (shape, _, top_k), outs in groups.items():
            n = shape[-1]
            probs = torch.stack([p.reshape(-1, n) for p, _ in outs])
            gates = torch.stack([g.reshape(-1, n) for _, g in outs]) if top_k is not None else probs
            losses.append(HF.load_balancing_losses(probs, gates, top_k).float())
        return coef * (losses[0] if len(losses) == 1 else torch.cat(losses)).mean()

    def router_stats(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """Router statistics since the last :meth:`reset_router_stats`: ``{"layers": {name: {"mean_gate": [N],
        "entropy": float, "tokens": int}}, "mean_gate": [N] (averaged over layers), "entropy": float}``.

        Collection is OFF by default, so that a forward does no statistics work: switch it on with
        :meth:`reset_router_stats` (clears and starts; :meth:`stop_router_stats` stops) or for a block with
        ``with model.base_model.collect_router_stats(): ...``. With nothing collected the result is
        ``{"layers": {}, "mean_gate": None, "entropy": None}``. Reading syncs with the device once per layer."""
        adapter_name = self._known_adapter(adapter_name)
        layers = {}
        for name, module in self._hydra_layers():
            stats = module.router_stats(adapter_name)
            if stats is not None:
                layers[name] = stats
        if not layers:
            return {"layers": {}, "mean_gate": None, "entropy": None}
        mean_gate = torch.tensor([s["mean_gate"] for s in layers.values()]).mean(0).tolist()
        entropy = sum(s["entropy"] for s in layers.values()) / len(layers)
        return {"layers": layers, "mean_gate": mean_gate, "entropy": entropy}

    def reset_router_stats(self) -> None:
        """Clear the router statistics and switch their collection on (it is off by default). While on, every
        routed forward adds a few sums on the device (no host sync); :meth:`router_stats` reduces them on read."""
        for _, module in self._hydra_layers():
            module.reset_router_stats()

    def stop_router_stats(self) -> None:
        """Switch router-statistics collection off (what was collected stays readable with :meth:`router_stats`)."""
        for _, module in self._hydra_layers():
            module.stop_router_stats()

    @property
    def router_stats_enabled(self) -> bool:
        """True while router statistics are being collected (see :meth:`reset_router_stats`)."""
        return any(module._collect_stats for _, module in self._hydra_layers())

    @contextmanager
    def collect_router_stats(self):
        """Collect router statistics from scratch inside the block, then restore the previous collection state and
        statistics (read :meth:`router_stats` inside the block)::

            with model.base_model.collect_router_stats():
                model(**batch)
                gates = model.base_model.router_stats()["mean_gate"]
        """
        saved = [(module, module._router_stats_state()) for _, module in self._hydra_layers()]
        try:
            for module, _ in saved:
                module.reset_router_stats()
            yield self
        finally:
            for module, state in saved:
                module._restore_router_stats_state(state)

    # ------------------------------------------------------------------------- saving and strict loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft >= 0.21 calls this on every adapter load: the strict check runs here."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_state_dict(model, config, adapter_name, remapped)
        return remapped

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """peft < 0.21 never calls the tuner on load: the strict check runs when ``set_peft_model_state_dict``
        (every ``from_pretrained`` / ``load_adapter``) loads this tuner's part of the PeftModel."""
        loading = _compat.enclosing_peft_load()
        if loading is not None:
            model, adapter_name = loading
            config = getattr(model, "peft_config", {}).get(adapter_name)
            if isinstance(config, HydraLoraConfig) and getattr(model, "base_model", None) is self:
                check_adapter_state_dict(model, config, adapter_name, state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """peft < 0.20 saves every adapter's tensors into each adapter's file: while ``get_peft_model_state_dict``
        reads the state dict for one adapter, leave the other adapters' tensors out (what peft >= 0.20 does)."""
        result = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        saving = _compat.enclosing_peft_save()
        if saving is not None and getattr(saving[0], "base_model", None) is self:
            others = [name for name in self.peft_config if name != saving[1]]
            drop = set()
            for other in others:
                drop |= {prefix + p for p in _compat.tuner_state_dict_key_prefixes(self, adapter_name=other)}
            for key in [k for k in result if k.startswith(prefix)]:
                if any(key == p or key.startswith(p + ".") for p in drop):
                    del result[key]
        return result

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT upcasts fp16/bf16 adapter weights to fp32 here; peft 0.21.1+ re-creates ParameterDict entries
        (``hydra_B``) as new, trainable Parameters. Every tensor keeps its ``requires_grad``, so that an adapter
        loaded for inference, or added inactive, stays frozen."""
        layers = [m for _, m in self._hydra_layers()]
        before = [{n: p.requires_grad for n, p in m.named_parameters()} for m in layers]
        super()._cast_adapter_dtype(adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for module, flags in zip(layers, before):
            for name, param in module.named_parameters():
                if name in flags and param.requires_grad != flags[name]:
                    param.requires_grad_(flags[name])


def check_adapter_state_dict(model: nn.Module, config: HydraLoraConfig, adapter_name: str, state_dict: dict) -> None:
    """Refuse a partial or wrongly shaped HydraLoRA checkpoint with an error that says what is wrong.

    PEFT loads adapters with ``strict=False`` and only warns about missing keys; the authors' fork loaded silently
    non-strict. Here every ``hydra_`` tensor of the adapter must be present with the right shape, and no unknown
    ``hydra_`` tensor may be left over.
    """
    prefixes = _compat.tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    expected = {
        k: v.shape
        for k, v in model.state_dict().items()
        if f".{PREFIX}" in k and any(k.startswith(p + ".") or k == p for p in prefixes)
    }
    strip = "base_model.model."
    requires_prefix = any(k.startswith(strip) for k in expected)
    got = {}
    for k, v in state_dict.items():
        if f".{PREFIX}" not in k and not k.startswith(PREFIX):
            continue
        key = k if requires_prefix or not k.startswith(strip) else k[len(strip) :]
        got[key] = tuple(v.shape)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != got[k])
    if not (missing or unexpected or mismatched):
        return
    def file_key(key: str) -> str:  # the key as stored in adapter_model.safetensors (adapter name stripped)
        return _compat.remove_adapter_name_from_key(HydraLoraModel, key, adapter_name)

    lines = [f"The HydraLoRA checkpoint for adapter '{adapter_name}' does not match its config:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"- {len(keys)} {title} tensor(s), e.g. " + ", ".join(file_key(k) for k in keys[:3]))
    if mismatched:
        lines.append(f"- {len(mismatched)} tensor(s) with another shape, e.g.:")
    for k in mismatched[:3]:
        lines.append(f"  {file_key(k)}: shape {got[k]} in the checkpoint, {tuple(expected[k])} from the config")
    lines.append(
        f"The config says r={config.r}, num_experts={config.num_experts}, share_a={config.share_a}, "
        f"router_input={config.router_input!r}, fixed_gates={config.fixed_gates!r}, "
        f"target_modules={sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules}."
        " Load the adapter with the adapter_config.json it was saved with, on the same base model architecture."
    )
    raise ValueError("\n".join(lines))
